"""Query gradients preconditioned once per layer, ``(G_ℓ + λ_ℓ I)⁻¹ ∇f(q)``, kept dense or as a
rank-r factorisation (exact or randomised truncation), for :mod:`~lightning_influence.engine.scoring`
to stream training examples against.
"""

from __future__ import annotations

from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from lightning_influence.engine import passes
from lightning_influence.engine.example_gradients import chunk_ranges, left_multiply, per_example_gradients, stored_transposed
from lightning_influence.engine.factors import Factors
from lightning_influence.engine.tracking import LayerTracker, TrackedLayer
from lightning_influence.tasks import Task


class PreconditionedQueries:
    """``(G_ℓ + λ_ℓ I)⁻¹ ∇ℓ(q)`` per layer, dense ``[Q, d_out, d_in]`` or as a rank-r factorisation
    ``left [Q, d_out, r] @ right [Q, d_in, r]ᵀ``. A dense layer may be kept in its eigenbasis on
    one side or both (``pool_bases``): a training example's token vectors are then rotated into
    that basis before they meet the queries (:meth:`in_query_basis`)."""

    def __init__(self, dense: Dict[str, Tensor], rank: Optional[int] = None,
                 low_rank: Optional[Dict[str, Tuple[Tensor, Tensor]]] = None,
                 pool_bases: Optional[Dict[str, Tuple[Optional[Tensor], Optional[Tensor]]]] = None) -> None:
        """``dense`` per layer ``[Q, d_out, d_in]``; with ``rank``, a layer whose factorisation is
        smaller is truncated (exact, float64). ``low_rank``: layers already factorised.
        ``pool_bases``: per dense layer with a side in the eigenbasis, ``(q_s, q_a)``, each ``None``
        where that side of the queries is in the layer's own coordinates, else that eigenbasis."""
        self.rank = rank
        self.pool_bases = dict(pool_bases or {})
        self.dense: Dict[str, Tensor] = {}
        self.low_rank: Dict[str, Tuple[Tensor, Tensor]] = dict(low_rank or {})
        self._layouts: Dict[Tuple[str, str, torch.dtype], Tensor] = {}
        for name, grads in dense.items():
            if rank is None or rank >= min(grads.shape[1:]):
                self.dense[name] = grads  # the factorisation would not be smaller: keep it exact
            else:
                self.low_rank[name] = tuple(f.to(grads.dtype) for f in truncate(grads, rank))

    @property
    def num_queries(self) -> int:
        for grads in self.dense.values():
            return grads.shape[0]
        for left, _ in self.low_rank.values():
            return left.shape[0]
        return 0

    def rows_transposed(self, name: str) -> bool:
        """Whether layer ``name``'s ``"rows"`` layout runs over ``[d_in, d_out]`` (the dense queries are
        stored transposed: a row layout in the other order would copy them)."""
        return stored_transposed(self.dense[name])

    def in_query_basis(self, name: str, acts: Tensor, grads: Tensor) -> Tuple[Tensor, Tensor]:
        """A batch's activations and output gradients in the basis layer ``name``'s queries are kept in."""
        q_s, q_a = self.pool_bases.get(name, (None, None))
        return (acts if q_a is None else acts @ q_a.to(acts)), (grads if q_s is None else grads @ q_s.to(grads))

    def dense_for(self, name: str) -> Tensor:
        """Layer ``name``'s queries ``[Q, d_out, d_in]`` in the layer's own coordinates."""
        if name in self.dense:
            q_s, q_a = self.pool_bases.get(name, (None, None))
            dense = self.dense[name] if q_a is None else self.dense[name] @ q_a.T.to(self.dense[name])
            return dense if q_s is None else q_s.to(dense) @ dense
        left, right = self.low_rank[name]
        return left @ right.transpose(1, 2)

    def layout(self, name: str, kind: str, dtype: torch.dtype) -> Tensor:
        """The queries in the layout a contraction multiplies with, built once per layer and dtype:
        ``"rows"`` ``[Q, d_out·d_in]``, or ``[Q, d_in·d_out]`` for queries stored transposed (see
        :meth:`rows_transposed`); ``"columns"`` ``[d_out, Q·d_in]``; ``"left"`` / ``"right"``
        ``[d_out or d_in, Q·r]`` (query-major columns, so a slice of columns is a slice of queries)."""
        key = (name, kind, dtype)
        if key not in self._layouts:
            if kind == "rows":
                dense = self.dense[name]
                value = (dense.transpose(1, 2) if self.rows_transposed(name) else dense).flatten(1)
            elif kind == "columns":
                value = self.dense[name].permute(1, 0, 2).reshape(self.dense[name].shape[1], -1)
            else:
                factor = self.low_rank[name][0 if kind == "left" else 1]
                value = factor.permute(1, 0, 2).reshape(factor.shape[1], -1)
            self._layouts[key] = value.to(dtype).contiguous()
        return self._layouts[key]


def truncate(matrices: Tensor, rank: int) -> Tuple[Tensor, Tensor]:
    """Best rank-r approximation ``left @ rightᵀ`` of each matrix ``[Q, m, n]`` (float64).

    Equal to the truncated SVD: with ``U_r`` the top-r eigenvectors of the smaller Gram matrix
    ``M Mᵀ``, ``U_r U_rᵀ M`` is that approximation; ``left = U_r``, ``right = Mᵀ U_r`` (no division
    by singular values, so rank-deficient queries stay exact). A symmetric eigensolver on the
    Gram matrix costs well under half of a full SVD (measured 1.7x faster on 512x513 matrices).
    """
    matrices = matrices.double()
    transposed = matrices.shape[1] > matrices.shape[2]
    if transposed:
        matrices = matrices.transpose(1, 2)
    _, vectors = torch.linalg.eigh(matrices @ matrices.transpose(1, 2))
    top = vectors[:, :, -rank:].flip(-1)  # eigh sorts ascending
    projected = matrices.transpose(1, 2) @ top
    return (projected, top) if transposed else (top, projected)


# Randomised truncation (Halko, Martinsson & Tropp 2011, algorithm 4.4): extra sampled directions
# and subspace iterations. The default: query gradients of a trained GPT have singular values that
# fall slowly past r (σ_r/σ_r+1 ≈ 1.02 in benchmarks/lm_scale.py), so convergence is bought with a
# wide sample (3r directions, whose gap σ_r/σ_3r is large) rather than with many iterations: relative
# Frobenius error against the exact truncation ≤ 4e-5 on those queries (10 directions and 3 iterations
# gave up to 2e-1), at about half the exact eigensolver's time.
RANDOMIZED_ITERATIONS = 4
# Subspace iteration stops early once an iteration adds less than this share to the squared norm each
# query's rank-r approximation captures: a trained GPT's queries stop after two or three iterations,
# power-law spectra i^-0.75 run all four; on i^-0.75 to i^-1.7 spectra the result stays within 2.5e-4
# of the exact truncation (tests/engine/test_query_memory.py). Below ~5e-7 the float32 estimate is noise.
CONVERGED_ENERGY = 1e-6
TRUNCATIONS = ("randomized", "exact")


def randomized_width(rank: int) -> int:
    """Sampled directions for a rank-r truncation: the rank plus twice as many, at least 10 extra."""
    return rank + max(10, 2 * rank)


def randomized_truncate(matrices: Tensor, rank: int, seed: int = 0) -> Tuple[Tensor, Tensor]:
    """``left @ rightᵀ`` close to the best rank-r approximation of each ``[Q, m, n]`` matrix, in
    float32: a randomised range finder with subspace iteration instead of an eigensolver on the
    ``m x m`` Gram matrix (``O(m·n·r)`` instead of ``O(m²·n + m³)``, and float32 instead of float64).
    Same output form as :func:`truncate` (``left`` orthonormal when ``m <= n``); exact when
    ``min(m, n) <= randomized_width(rank)``, where it defers to :func:`truncate`."""
    transposed = matrices.shape[1] > matrices.shape[2]
    if transposed:
        matrices = matrices.transpose(1, 2)
    width = randomized_width(rank)
    if matrices.shape[1] <= width:
        left, right = truncate(matrices, rank)
        left, right = left.float(), right.float()
    else:
        matrices = matrices.float()
        generator = torch.Generator(matrices.device).manual_seed(seed)
        probe = torch.randn(matrices.shape[0], matrices.shape[2], width, generator=generator,
                            device=matrices.device, dtype=matrices.dtype)
        basis = torch.linalg.qr(matrices @ probe).Q  # [Q, m, k]
        captured = None
        for iteration in range(RANDOMIZED_ITERATIONS + 1):
            projected = matrices.transpose(1, 2) @ basis  # [Q, n, k] = (basisᵀ M)ᵀ
            if iteration == RANDOMIZED_ITERATIONS:
                break
            # Squared norm of the best rank-r approximation within the basis' span (its top Ritz values):
            # it only grows as the iteration converges; stop once no query's grows by CONVERGED_ENERGY.
            energy = torch.linalg.eigvalsh(projected.transpose(1, 2) @ projected)[:, -rank:].sum(-1)
            if captured is not None and bool((energy - captured <= CONVERGED_ENERGY * energy).all()):
                break
            captured = energy
            # M (Mᵀ basis) without orthonormalising Mᵀ basis first: same span, one QR of the long
            # [n, k] side fewer (a quarter of an iteration's time); as accurate on the tests' spectra.
            basis = torch.linalg.qr(matrices @ projected).Q
        small = projected.transpose(1, 2)  # [Q, k, n]: M ≈ basis @ small
        _, vectors = torch.linalg.eigh(small @ small.transpose(1, 2))
        top = vectors[:, :, -rank:].flip(-1)
        left = basis @ top
        right = small.transpose(1, 2) @ top  # = Mᵀ left (basis orthonormal) without another pass over M
    return (right, left) if transposed else (left, right)


def _example_gradient_batches(model: nn.Module, task: Task, data: Any, tracker: LayerTracker, batch_size: int,
                              use_measurement: bool, desc: str, show_progress: bool
                              ) -> Iterator[Tuple[Any, List[Tensor], List[Tensor]]]:
    """Per batch: ``(batch, activations, output gradients)`` per tracked layer, of each example's
    loss (training data) or of minus its measurement (queries). The caller holds
    ``passes.evaluation_mode(model)`` and the attached ``tracker`` around the loop."""
    for batch, counted in passes.iterate_batches(data, batch_size, passes.model_device(model), desc, show_progress):
        with tracker.capture(task.token_mask(batch)), passes.autocast_forward(model):
            target = -task.measurement(model, batch) if use_measurement else task.loss(model, batch)
        tracker.check_single_calls()
        acts = [acts for _, acts in passes.layer_activations(tracker)]
        grads = passes.layer_gradients(target.sum(), tracker)
        tracker.reset()  # drop the batch's recorded outputs before the caller works on it
        if counted:
            yield batch, acts, grads


def precondition_queries(model: nn.Module, task: Task, query_data: Any, factors: Factors,
                         layers: Sequence[TrackedLayer], damping: Dict[str, float], query_rank: Optional[int] = None,
                         batch_size: int = 32, show_progress: bool = False, truncation: str = "randomized",
                         pool_examples: Optional[int] = None,
                         reach: Sequence[TrackedLayer] = ()) -> Tuple[PreconditionedQueries, Tensor]:
    """Gradients of minus each query's measurement, preconditioned layer by layer with ``damping``
    (λ per layer), and which queries' preconditioned gradients are not finite in the gradients'
    dtype ``[Q]`` (they are zeroed, so they cannot disturb the truncation or other queries).

    Built one query batch and one layer at a time, each truncated to ``query_rank`` as soon as it
    is ready: the float64 preconditioning only ever holds one layer of one chunk of queries, and
    memory grows with the kept queries (``Q·r·(d_out + d_in)`` per layer at rank r).
    ``truncation``: ``"randomized"`` (default, float32 subspace iteration, :func:`randomized_truncate`:
    faster, approximate) or ``"exact"`` (float64 eigensolver, :func:`truncate`).

    ``pool_examples``: how many training examples the queries will be scored against, when known
    and the queries are only used for that (as inside :func:`compute_influence`). A side of a dense
    layer whose rotation back from the eigenbasis costs more for all queries than rotating the
    pool's token vectors into it (see :func:`_sides_kept_in_eigenbasis`) is then left in the
    eigenbasis, and the result's :meth:`PreconditionedQueries.in_query_basis` rotates the pool.
    The backward passes also reach the outputs of ``reach`` (see :class:`LayerTracker`)."""
    if truncation not in TRUNCATIONS:
        raise ValueError(f"unknown truncation {truncation!r}; choose one of {', '.join(TRUNCATIONS)}")
    tracker = LayerTracker(layers, reach=reach)
    kept: Dict[str, List[Any]] = {layer.name: [] for layer in layers}
    in_eigenbasis: Dict[str, Tuple[bool, bool]] = {}
    num_queries = passes.example_count(query_data)
    unusable: List[Tensor] = []
    with passes.evaluation_mode(model), tracker:
        for batch, acts, grads in _example_gradient_batches(model, task, query_data, tracker, batch_size, True,
                                                            "query gradients", show_progress):
            with torch.no_grad():
                batch_unusable = torch.zeros(task.batch_size(batch), dtype=torch.bool,
                                             device=passes.model_device(model))
                for layer, act, grad in zip(layers, acts, grads):
                    if layer.name not in in_eigenbasis:
                        in_eigenbasis[layer.name] = _sides_kept_in_eigenbasis(
                            layer, num_queries, pool_examples, act.shape[1], factors.has_eigenbasis and query_rank is None)
                    parts, part_unusable = zip(*(
                        _prepare_query_chunk(factors, layer.name, act[start:stop], grad[start:stop],
                                             damping[layer.name], query_rank, truncation, in_eigenbasis[layer.name])
                        for start, stop in chunk_ranges(grad.shape[0], layer.d_out * layer.d_in)))
                    batch_unusable |= torch.cat(part_unusable)
                    kept[layer.name].extend(parts)
                unusable.append(batch_unusable)
    bad = torch.cat(unusable)
    dense: Dict[str, Tensor] = {}
    low_rank: Dict[str, Tuple[Tensor, Tensor]] = {}
    for name, parts in kept.items():
        if isinstance(parts[0], tuple):
            left, right = (torch.cat(side) for side in zip(*parts))
            low_rank[name] = (left.masked_fill_(bad[:, None, None], 0.0), right.masked_fill_(bad[:, None, None], 0.0))
        else:
            dense[name] = _concatenate(parts).masked_fill_(bad[:, None, None], 0.0)
        parts.clear()  # the chunks are copied into the concatenation: let them go layer by layer
    pool_bases = {}
    for name, sides in in_eigenbasis.items():
        if name in dense and any(sides):
            q_s, q_a = factors.eigenbasis(name)
            pool_bases[name] = tuple(basis.to(dense[name]) if side else None for basis, side in zip((q_s, q_a), sides))
    return PreconditionedQueries(dense, query_rank, low_rank, pool_bases), bad


# Rotating the pool's tokens runs batch by batch, on products a tenth the size of the queries' rotation
# and into fresh tensors: at equal FLOPs it measured slower (GPT layers, one CPU thread), so a side is
# only left in the eigenbasis when the pool's rotation costs at most 1 / POOL_ROTATION_MARGIN of it.
POOL_ROTATION_MARGIN = 2


def _sides_kept_in_eigenbasis(layer: TrackedLayer, num_queries: Optional[int], pool_examples: Optional[int],
                              tokens: int, applies: bool) -> Tuple[bool, bool]:
    """``(output side, input side)``: which sides of a layer's dense queries to leave in the eigenbasis.

    Rotating the output side back costs ``Q·d_out²·d_in`` for the queries; leaving it costs
    ``N·T·d_out²`` for the pool's output gradients (``N`` examples of ``T`` tokens, taken to be as
    long as the queries). A side is left when the pool's cost is at most half the queries'
    (``POOL_ROTATION_MARGIN``): the output side when ``2·N·T ≤ Q·d_in``, the input side when
    ``2·N·T ≤ Q·d_out``. Pools of a few hundred sequences scored against dozens of queries are
    where this pays."""
    if not applies or num_queries is None or pool_examples is None:
        return False, False
    pool_cost = POOL_ROTATION_MARGIN * pool_examples * tokens
    return pool_cost <= num_queries * layer.d_in, pool_cost <= num_queries * layer.d_out


def _concatenate(parts: Sequence[Tensor]) -> Tensor:
    """Chunks of dense queries ``[q, d_out, d_in]`` as one, stored transposed if they are (see
    :func:`~lightning_influence.engine.example_gradients.stored_transposed`); a single chunk as it is (no copy)."""
    if len(parts) == 1:
        return parts[0]
    if all(stored_transposed(part) for part in parts):
        return torch.cat([part.transpose(1, 2) for part in parts]).transpose(1, 2)
    return torch.cat(parts)


def _prepare_query_chunk(factors: Factors, name: str, acts: Tensor, grads: Tensor, damping: float,
                         rank: Optional[int], truncation: str,
                         in_eigenbasis: Tuple[bool, bool] = (False, False)) -> Tuple[Any, Tensor]:
    """One layer's preconditioned gradients of a chunk of queries: dense in the gradients' dtype,
    or truncated to ``rank`` — in the eigenbasis, rotating only the factors back (saves a
    ``[d_out, d_out] x [d_out, d_in]`` product per query). Also which are not finite in that dtype
    (zeroed). The rotations and the division by the eigenvalues run in the gradients'
    dtype (the rotation back of a dense query, ``d_out·d_in·(d_out + d_in)`` per query, is the
    largest cost of preparation), except before an ``"exact"`` truncation, float64 throughout.
    ``in_eigenbasis``: the sides of dense queries not rotated back (see :func:`_sides_kept_in_eigenbasis`)."""
    dtype = grads.dtype
    truncated = rank is not None and rank < min(grads.shape[-1], acts.shape[-1])
    rotation_dtype = torch.float64 if truncated and truncation == "exact" else dtype
    if factors.has_eigenbasis:
        preconditioned = factors.precondition_in_eigenbasis(
            name, factors.example_gradients_in_eigenbasis(name, acts, grads, rotation_dtype, transposed=not truncated),
            damping, in_place=True)
        if not truncated:
            output_kept, input_kept = in_eigenbasis
            preconditioned = factors.rotate_from_eigenbasis(name, preconditioned, not output_kept, not input_kept)
    else:
        preconditioned = factors.precondition(name, per_example_gradients(acts, grads).double(), damping)
    lowered = preconditioned.to(dtype)  # float32 overflow shows as inf here
    unusable = _not_finite(lowered)
    if not truncated or truncation == "randomized":
        preconditioned = lowered
    if unusable.any():
        preconditioned.masked_fill_(unusable[:, None, None], 0.0)
    if not truncated:
        return preconditioned, unusable
    left, right = (randomized_truncate(preconditioned, rank) if truncation == "randomized"
                   else truncate(preconditioned, rank))
    if factors.has_eigenbasis:
        q_s, q_a = factors.eigenbasis(name)
        left, right = left_multiply(q_s.to(left), left), left_multiply(q_a.to(right), right)
    return (left.to(dtype), right.to(dtype)), unusable


def _not_finite(matrices: Tensor) -> Tensor:
    """Which of ``[N, m, n]`` hold a NaN or inf: a sum per matrix (one read, no mask of every
    element) flags candidates, confirmed element-wise since finite values can overflow a sum."""
    suspects = ~torch.isfinite(matrices.sum((1, 2)))
    for index in suspects.nonzero().flatten().tolist():
        suspects[index] = not bool(torch.isfinite(matrices[index]).all())
    return suspects
