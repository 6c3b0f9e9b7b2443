"""The passes over data that curvature statistics are built from, and the curvature at a checkpoint.

:func:`accumulate_covariances` sums ``Σ a aᵀ`` and ``Σ g gᵀ``, :func:`accumulate_eigenvalue_correction`
the squared per-example gradients in an eigenbasis (or in the layer's coordinates), both over one
pass of forward and backward passes that keep examples with non-finite values out
(:func:`_curvature_passes`). :func:`curvature_at_checkpoint` turns covariances collected during
training into bases and a correction at the current weights, refreshing the layers where they went
stale (:mod:`~lightning_influence.engine.freshness`).
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from lightning_influence.engine import distributed
from lightning_influence.engine import freshness
from lightning_influence.engine import passes
from lightning_influence.engine.approximations import CurvatureApproximation, approximation
from lightning_influence.engine.statistics import CovarianceStatistics, EigenvalueCorrection, stored_bases
from lightning_influence.engine.tracking import LayerTracker, TrackedLayer


def _example_norms(tensors: Sequence[Tensor], batch: int, dtype: torch.dtype) -> Tensor:
    """``[L, batch]``: the norm of each example's values in each layer's tensor, in the statistics'
    ``dtype`` (an overflow to inf there is what the caller looks for; a float64 copy of every
    activation cost 6% of a pass). A layer whose leading axis is not the batch (its input merges
    examples) gives its whole norm to every example."""
    def norms(t: Tensor) -> Tensor:
        within = torch.promote_types(t.dtype, dtype)
        if t.shape[0] == batch:
            return torch.linalg.vector_norm(t.flatten(1), dim=1, dtype=within).to(dtype)
        return torch.linalg.vector_norm(t, dtype=within).to(dtype).expand(batch)

    if not tensors:  # a process that tracks no layer of its own (sharded factors)
        return torch.zeros(0, batch, dtype=dtype)
    return torch.stack([norms(t) for t in tensors])


def _kept_examples(fits: Tensor, tensors: Sequence[Tensor]) -> Tensor:
    """``[B]`` bool from ``fits [L, B]``: examples that fit in every layer; none of the batch when one
    must go but a layer merges examples (its rows cannot be told apart)."""
    keep = fits.all(0)
    if not bool(keep.all()) and any(t.shape[0] != len(keep) for t in tensors):
        return torch.zeros_like(keep)
    return keep


def _rows(tensors: Sequence[Tensor], keep: Tensor) -> List[Tensor]:
    """The kept examples' rows of each layer's tensor (see :func:`_kept_examples`)."""
    if bool(keep.all()):
        return list(tensors)
    return [t[keep] if t.shape[0] == len(keep) else t[:0] for t in tensors]


def _curvature_passes(model, task, data, tracker: LayerTracker, *, fisher: str, batch_size: int, seed: int, desc: str,
                      dtype: torch.dtype, left_out: List[int], num_samples: int = 1, max_batches: Optional[int] = None,
                      show_progress: bool = False, first_example: int = 0, example_stride: int = 1,
                      ) -> Iterator[Tuple[List[Tensor], List[float], Iterator, Tensor, Tensor]]:
    """The passes every curvature statistic is built from. Per batch: each layer's activations of
    the examples kept, their real-token count, the Fisher samples ``(weight, examples, per-layer
    activations, per-layer gradients, examples kept)`` of :func:`passes.fisher_gradients` (consume
    them before the next batch), each example's place (``first_example + example_stride × its
    position in data``: its position among every process's examples) and which examples the
    activations kept.

    One NaN example would make every statistic NaN, so each example is kept out of what it would
    spoil: of everything when its activations are not finite in ``dtype`` (squares included: an
    input of 1e30 overflows float32), of a Fisher sample when its gradients, or its per-example
    weight gradient ``Σ_t g_t a_tᵀ`` (bounded by ``‖g‖‖a‖``), would not be. The dataset indices of
    examples left out of anything are appended to ``left_out`` (see :func:`passes.dataset_indices`). The caller holds
    ``passes.evaluation_mode(model)`` and the attached ``tracker`` around the loop."""
    device = passes.model_device(model)
    generator = torch.Generator(device).manual_seed(seed)
    limit = math.sqrt(torch.finfo(dtype).max)  # a norm above it has a square that overflows dtype
    position = 0
    for batch, counted in passes.iterate_batches(data, batch_size, device, desc, show_progress, max_batches):
        outputs = passes.forward(model, task, batch, tracker)
        size = task.batch_size(batch)
        places = first_example + example_stride * (position + torch.arange(size))
        acts = [acts for _, acts in passes.layer_activations(tracker)]
        act_norms = _example_norms(acts, size, dtype)
        finite = _kept_examples(act_norms <= limit, acts) & counted  # a filler's passes only keep step
        rejected = [~finite]

        def samples():
            for weight, share, grads in passes.fisher_gradients(outputs, task, batch, tracker, fisher, generator,
                                                                num_samples):
                grad_norms = _example_norms(grads, size, dtype)
                keep = finite & _kept_examples((grad_norms <= limit) & (grad_norms * act_norms <= limit), grads)
                rejected.append(~keep)
                yield weight, int(keep.sum()) * share, _rows(acts, keep), _rows(grads, keep), keep

        kept = _rows(acts, finite)
        yield kept, _token_counts(kept, tracker.token_mask, finite), samples(), places.to(finite.device), finite
        if counted:
            positions = (position + torch.nonzero(torch.stack(rejected).any(0)).flatten()).tolist()
            left_out.extend(passes.dataset_indices(data, positions))
            position += size


def _token_counts(acts: Sequence[Tensor], mask: Optional[Tensor], kept: Tensor) -> List[float]:
    """Real tokens in each layer's rows of the ``kept`` examples (``mask``: the batch's token mask)."""
    kept_mask = mask[kept] if mask is not None and not bool(kept.all()) else mask
    return [passes.token_count(act, kept_mask) for act in acts]


def _split_rows(tensors: Sequence[Tensor], rows_of: Tensor, member: Tensor) -> List[Tensor]:
    """Each layer's rows of the ``member`` examples among those whose rows ``tensors`` hold
    (``rows_of``); a layer whose rows merge examples goes whole to the group of the first one."""
    chosen = member[rows_of]
    whole = bool(chosen[0]) if len(chosen) else False
    return [t[chosen] if t.shape[0] == len(chosen) else (t if whole else t[:0]) for t in tensors]


def _group_rows(acts: Sequence[Tensor], rows_of: Tensor, member: Tensor, mask: Optional[Tensor],
                kept: Tensor) -> Tuple[List[Tensor], List[float]]:
    """The ``member`` examples' activation rows per layer, and their real-token counts."""
    rows = _split_rows(acts, rows_of, member)
    return rows, _token_counts(rows, mask, kept & member)


def _warn_left_out(left_out: Sequence[int]) -> None:
    indices = sorted(set(left_out))
    if indices:
        listing = ", ".join(map(str, indices[:20])) + (", ..." if len(indices) > 20 else "")
        warnings.warn(
            f"{len(indices)} example(s) with non-finite values (NaN/inf, or squares overflowing the float32 "
            f"statistics) left out of the curvature statistics; their dataset indices: [{listing}]"
        )


def _accumulate(model, task, data, layers: Sequence[TrackedLayer], *, desc: str, dtype: torch.dtype,
                covariances: Sequence[CovarianceStatistics] = (), correction: Optional["EigenvalueCorrection"] = None,
                left_out: Optional[List[int]] = None, reach: Sequence[TrackedLayer] = (), **pass_options: Any) -> None:
    """One pass over ``data``: covariances into ``covariances`` (the example at place ``p`` into
    ``covariances[p % len(covariances)]``: several split the examples, see
    :func:`_curvature_passes`' ``first_example``), squared per-example gradients into
    ``correction``. Examples with non-finite values are left out (see :func:`_curvature_passes`);
    their data positions are appended to ``left_out`` if given, else reported in a warning.
    The backward passes also reach the outputs of ``reach`` (see :class:`LayerTracker`)."""
    tracker = LayerTracker(layers, reach=reach)
    found: List[int] = []
    grouped: List[List[List[str]]] = []
    with passes.evaluation_mode(model), tracker:
        for acts, tokens, samples, places, finite in _curvature_passes(
                model, task, data, tracker, desc=desc, dtype=dtype, left_out=found, **pass_options):
            if not grouped:  # layers reading one input tensor: one activation sum (and Gram) per group
                grouped = [stats.share_inputs(tracker.input_groups()) for stats in covariances] or [[]]
            if len(covariances) == 1:
                groups = [(covariances[0], acts, tokens, None)]
            else:  # each statistic its own examples' rows
                members = [places % len(covariances) == group for group in range(len(covariances))]
                rows = torch.nonzero(finite).flatten()
                groups = [(stats, *_group_rows(acts, rows, member, tracker.token_mask, finite), member)
                          for stats, member in zip(covariances, members)]
            for stats, rows_kept, counts, _ in groups:
                for layer, act, real_tokens in zip(layers, rows_kept, counts):
                    stats.add_activations(layer.name, act, real_tokens)
            for weight, examples, sample_acts, grads, keep in samples:
                rows = torch.nonzero(keep).flatten()
                for stats, _, _, member in groups:
                    part = grads if member is None else _split_rows(grads, rows, member)
                    share = examples if member is None else examples * float(member[keep].sum()) / max(len(rows), 1)
                    for layer, grad in zip(layers, part):
                        stats.add_gradients(layer.name, grad, share, weight)
                if correction is not None:
                    for layer, act, grad in zip(layers, sample_acts, grads):
                        correction.add(layer.name, act, grad, examples, weight)
    _report_left_out(found, left_out)


@passes.outside_inference_mode
def accumulate_covariances(model, task, data, layers: Sequence[TrackedLayer], *, fisher: str = "true",
                           num_samples: int = 1, batch_size: int = 32, max_batches: Optional[int] = None,
                           seed: int = 0, dtype: torch.dtype = torch.float32, show_progress: bool = False,
                           into: Optional[CovarianceStatistics] = None,
                           left_out: Optional[List[int]] = None) -> CovarianceStatistics:
    """One pass over ``data`` accumulating ``Σ a aᵀ`` and ``Σ g gᵀ`` (into ``into`` if given).

    Examples with non-finite values are left out (see :func:`_curvature_passes`); their dataset
    indices are appended to ``left_out`` if given, else reported in a warning."""
    stats = into if into is not None else CovarianceStatistics(layers, dtype=dtype, device=passes.model_device(model))
    stats_dtype = stats.state[layers[0].name]["a_sum"].dtype if layers else dtype
    _accumulate(model, task, data, layers, desc="covariances", dtype=stats_dtype, covariances=[stats],
                left_out=left_out, fisher=fisher, num_samples=num_samples, batch_size=batch_size,
                max_batches=max_batches, seed=seed, show_progress=show_progress)
    return stats


@passes.outside_inference_mode
def accumulate_eigenvalue_correction(model, task, data, layers: Sequence[TrackedLayer], bases=None, *,
                                     fisher: str = "true", num_samples: int = 1, batch_size: int = 32,
                                     max_batches: Optional[int] = None, seed: int = 1,
                                     dtype: torch.dtype = torch.float32, show_progress: bool = False,
                                     left_out: Optional[List[int]] = None,
                                     covariances_into: Sequence[CovarianceStatistics] = (),
                                     first_example: int = 0, example_stride: int = 1,
                                     reach: Sequence[TrackedLayer] = ()) -> EigenvalueCorrection:
    """One pass over ``data`` accumulating squared per-example gradients in ``bases`` (EK-FAC's Λ),
    or in the identity basis when ``bases`` is ``None`` (the diagonal Fisher); also the same
    examples' covariances into ``covariances_into`` (the example at place ``p = first_example +
    example_stride × i`` into ``covariances_into[p % len]``): the fresh curvature at these weights that
    :func:`curvature_at_checkpoint` measures staleness against. The backward passes also reach
    the outputs of ``reach`` (see :class:`LayerTracker`).

    Examples with non-finite values are left out (see :func:`_curvature_passes`); their dataset
    indices are appended to ``left_out`` if given, else reported in a warning."""
    correction = EigenvalueCorrection(layers, bases, dtype=dtype, device=passes.model_device(model))
    _accumulate(model, task, data, layers, desc="eigenvalue correction" if bases is not None else "diagonal Fisher",
                dtype=dtype, covariances=covariances_into, correction=correction, first_example=first_example,
                example_stride=example_stride,
                left_out=left_out, fisher=fisher, reach=reach, num_samples=num_samples, batch_size=batch_size,
                max_batches=max_batches, seed=seed, show_progress=show_progress)
    return correction


def curvature_at_checkpoint(model, task, parts: Sequence[Tuple[Any, int]], layers: Sequence[TrackedLayer],
                            training: CovarianceStatistics, *, strategy: Union[str, CurvatureApproximation], refresh: str,
                            eigenbasis_dtype: torch.dtype, reduce: Optional[Callable[[List[Tensor]], None]],
                            any_process: Callable[[bool], bool] = bool,
                            **pass_options: Any) -> Tuple[Dict[str, Dict[str, Tensor]],
                                                          Optional[EigenvalueCorrection], Dict[str, Any]]:
    """K-FAC / EK-FAC bases and eigenvalue correction at the current weights from covariances
    collected in ``training``, refreshed where they went stale (:mod:`~lightning_influence.engine.freshness`).

    ``parts`` are ``(data, seed)`` of the correction examples: every process's share in rank order
    (a process correcting the others' shares too), or with ``reduce`` (which sums each statistic
    across processes, collectively) this process's own. ``pass_options`` (``fisher``,
    ``batch_size``, ``left_out``, ...) go to every pass over the examples. The first pass also
    gathers fresh covariances of its examples in two halves, the even and odd places in all shares
    in rank order: the same examples whatever the number of processes (a streaming pool's shares,
    of unknown size, are split on their own).
    ``refresh``: ``"auto"`` gives a layer the fresh covariances' eigenbasis (and corrects it again
    in that basis) when the basis of one half describes the other half better than the training
    basis does; ``"always"`` does so for every layer (one covariance pass, then one correction:
    the refit on the correction examples); ``"never"`` keeps the training statistics, and EK-FAC
    still measures their staleness (K-FAC then runs no pass at all).
    ``any_process(flag)``: whether ``flag`` holds on some process (collective), where processes
    measure different layers (sharded factors): every process then runs the stale layers' second
    correction pass when one needs it, as a sharded model's passes must run on every process.

    Returns the bases, the correction (EK-FAC) and ``meta["curvature"]`` (staleness per layer, the
    refreshed layers, and ``tokens_seen``: the tokens each layer's covariances were built from)."""
    freshness.check_refresh(refresh)
    device = passes.model_device(model)
    dtype = next((parts["a_sum"].dtype for parts in training.state.values()), torch.float32)  # none: sharded

    def keep_bases(decomposed):
        return stored_bases(decomposed, eigenbasis_dtype, device)

    def correct(bases, chosen, into=()):
        total = None
        for data, seed, (first, stride) in parts:
            part = accumulate_eigenvalue_correction(model, task, data, chosen, bases, seed=seed, covariances_into=into,
                                                    first_example=first, example_stride=stride, **pass_options)
            total = part if total is None else total.merge_(part)
        if reduce is not None:
            reduce(total.tensors() + [t for stats in into for t in stats.tensors()])
        return total

    decomposed = training.eigendecompose()
    corrects = approximation(strategy).needs_correction_pass
    correct_first = corrects and refresh != "always"
    if refresh == "never" and not correct_first:
        return keep_bases(decomposed), None, {}
    parts = [(data, seed, place) for (data, seed), place in zip(parts, _share_places(parts, reduce is not None))]
    halves = [CovarianceStatistics(layers, dtype=dtype, device=device) for _ in range(2)]
    correction = None
    if correct_first:
        correction = correct(keep_bases(decomposed), layers, into=halves)
    else:
        for data, seed, (first, stride) in parts:
            _accumulate(model, task, data, layers, desc="covariances", covariances=halves, seed=seed,
                        first_example=first, example_stride=stride, **{**pass_options, "dtype": dtype})
        if reduce is not None:
            reduce([t for stats in halves for t in stats.tensors()])
    fresh = CovarianceStatistics(layers, dtype=dtype, device=device)
    fresh.share_inputs(halves[0].input_groups)
    fresh.merge_(halves[0]).merge_(halves[1])
    measured = freshness.measure(decomposed, halves, fresh)
    stale = freshness.stale_layers(measured, refresh)
    if stale:
        decomposed.update(fresh.eigendecompose(stale))
    bases = keep_bases(decomposed)
    if corrects:
        if correction is None:
            correction = correct(bases, layers)
        elif any_process(bool(stale)):
            again = correct(bases, [layer for layer in layers if layer.name in stale])
            correction.state.update(again.state)
    report = freshness.staleness_report(measured, stale, refresh)
    report["tokens_seen"] = {name: float((fresh if name in stale else training).state[name]["a_count"])
                             for name in training.state}
    return bases, correction, report


def _share_places(parts: Sequence[Tuple[Any, int]], one_per_process: bool) -> List[Tuple[int, int]]:
    """Where each correction share's examples stand among every process's, as ``(first, stride)``:
    a map-style share is a contiguous range after the lower ranks' shares (``stride`` 1); a
    streaming pool's share, of unknown length, is every ``world``-th item from its rank (as
    :class:`~lightning_influence.checkpoint.pool.PoolStream` deals them). ``one_per_process``: ``parts``
    is this process's share (collective); else every process's, in rank order."""
    sizes = [passes.example_count(data.data if isinstance(data, passes.Lockstep) else data) for data, _ in parts]
    if one_per_process:
        here, world = distributed.rank(), distributed.world_size()
        sizes = [size for shares in distributed.gather_objects(sizes) for size in shares]
    else:
        here, world = None, len(parts)
    ranks = [here] if here is not None else list(range(world))
    return [(rank, world) if sizes[rank] is None else (sum(size or 0 for size in sizes[:rank]), 1) for rank in ranks]


def _report_left_out(found: List[int], left_out: Optional[List[int]]) -> None:
    if left_out is not None:
        left_out.extend(found)
    else:
        _warn_left_out(found)
