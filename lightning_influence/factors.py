"""Curvature statistics and the preconditioners built from them.

Per tracked layer (see ``design.md`` for the normalisation):

* ``CovarianceStatistics`` keeps ``Σ a aᵀ`` and ``Σ g gᵀ`` as float32 sums with counts, so they
  merge across steps, processes and resumed runs;
* ``EigenvalueCorrection`` keeps ``Σ_n (Q_Sᵀ ΔW_n Q_A)∘²`` (EK-FAC), or ``Σ_n ΔW_n∘²`` (diagonal);
* ``Factors`` is the fitted preconditioner ``(G + λI)⁻¹`` of one strategy, saved and loaded without
  pickle.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor

from lightning_influence._io import (
    META_FILE,
    TENSOR_FILE,
    FormatError,
    PathLike,
    atomic_directory,
    load_tensors,
    read_meta,
    save_tensors,
    write_json,
)
from lightning_influence import passes
from lightning_influence.tracking import LayerTracker, TrackedLayer, layers_by_name, select_layers

STRATEGIES = ("ekfac", "kfac", "diagonal", "identity")
FISHER_KINDS = ("true", "empirical", "exact")
FACTORS_FORMAT = "lightning-influence/factors"
DEFAULT_DAMPING_FACTOR = 0.1  # the paper's heuristic: λ_ℓ = 0.1 × mean eigenvalue of layer ℓ
# Per-example gradients [chunk, d_out, d_in] are formed in chunks of at most this many elements.
_CHUNK_ELEMENTS = 2**24


def check_strategy(strategy: str) -> str:
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    return strategy


def check_fisher(fisher: str) -> str:
    if fisher not in FISHER_KINDS:
        raise ValueError(f"unknown fisher {fisher!r}; choose one of {', '.join(FISHER_KINDS)}")
    return fisher


def _state_to_flat(state: Mapping[str, Mapping[str, Tensor]]) -> Dict[str, Tensor]:
    return {f"{layer}/{key}": value for layer, parts in state.items() for key, value in parts.items()}


def _flat_to_state(flat: Mapping[str, Tensor]) -> Dict[str, Dict[str, Tensor]]:
    state: Dict[str, Dict[str, Tensor]] = {}
    for key, value in flat.items():
        layer, _, part = key.rpartition("/")
        state.setdefault(layer, {})[part] = value
    return state


class _LayerSums:
    """Named per-layer float sums that merge by addition (the shape of every statistic here)."""

    def __init__(self, state: Dict[str, Dict[str, Tensor]]) -> None:
        self.state = state

    def merge_(self, other: "_LayerSums") -> "_LayerSums":
        """Add another accumulator's sums (from more steps, another process, a resumed run)."""
        if set(other.state) != set(self.state):
            raise ValueError(
                f"cannot merge statistics over different layers: {sorted(self.state)} vs {sorted(other.state)}"
            )
        for name, parts in self.state.items():
            for key, value in parts.items():
                incoming = other.state[name][key]
                if incoming.shape != value.shape:
                    raise ValueError(f"cannot merge {name}/{key}: shape {tuple(incoming.shape)} vs {tuple(value.shape)}")
                value.add_(incoming.to(value.device, value.dtype))
        return self

    def tensors(self) -> List[Tensor]:
        """Every sum and count, for an in-place ``all_reduce(SUM)`` across processes."""
        return [value for parts in self.state.values() for value in parts.values()]

    def scale_(self, factor: float) -> None:
        """Multiply sums and counts alike (exponential moving averages keep ratios unchanged)."""
        for value in self.tensors():
            value.mul_(factor)

    def zero_(self) -> None:
        for value in self.tensors():
            value.zero_()

    def state_dict(self) -> Dict[str, Tensor]:
        return {k: v.detach().clone().cpu() for k, v in _state_to_flat(self.state).items()}

    def load_state_dict(self, flat: Mapping[str, Tensor]) -> None:
        incoming = _flat_to_state(flat)
        expected = {k: tuple(v.shape) for k, v in _state_to_flat(self.state).items()}
        found = {k: tuple(v.shape) for k, v in flat.items()}
        if expected != found:
            missing = sorted(set(expected) - set(found))
            extra = sorted(set(found) - set(expected))
            raise ValueError(
                "saved statistics do not match the tracked layers "
                f"(missing: {missing[:5]}, unexpected: {extra[:5]}, or different shapes); "
                "they come from another model or configuration"
            )
        for name, parts in self.state.items():
            for key, value in parts.items():
                value.copy_(incoming[name][key])


class CovarianceStatistics(_LayerSums):
    """Sums ``Σ m a aᵀ`` and ``Σ g gᵀ`` with their counts (tokens and examples), per layer."""

    def __init__(self, layers: Sequence[TrackedLayer], dtype: torch.dtype = torch.float32,
                 device: Optional[torch.device] = None) -> None:
        super().__init__({
            layer.name: {
                "a_sum": torch.zeros(layer.d_in, layer.d_in, dtype=dtype, device=device),
                "s_sum": torch.zeros(layer.d_out, layer.d_out, dtype=dtype, device=device),
                "a_count": torch.zeros((), dtype=torch.float64, device=device),
                "s_count": torch.zeros((), dtype=torch.float64, device=device),
            }
            for layer in layers
        })

    def add_activations(self, name: str, acts: Tensor, num_tokens: float) -> None:
        """``acts``: ``[B, T, d_in]`` with padded positions already zeroed; ``num_tokens`` real ones."""
        parts = self.state[name]
        flat = acts.reshape(-1, acts.shape[-1]).to(parts["a_sum"].dtype)
        parts["a_sum"].addmm_(flat.T, flat)
        parts["a_count"] += num_tokens

    def add_gradients(self, name: str, grads: Tensor, num_examples: float, weight: float = 1.0) -> None:
        """``grads``: ``[B, T, d_out]`` gradients of each example's token-summed loss."""
        parts = self.state[name]
        flat = grads.reshape(-1, grads.shape[-1]).to(parts["s_sum"].dtype)
        parts["s_sum"].addmm_(flat.T, flat, alpha=weight)
        parts["s_count"] += num_examples

    def is_empty(self) -> bool:
        return any(parts["a_count"] == 0 or parts["s_count"] == 0 for parts in self.state.values())

    def eigendecompose(self) -> Dict[str, Dict[str, Tensor]]:
        """Per layer, ``q_a, eig_a, q_s, eig_s`` of ``A = Σ a aᵀ / tokens`` and ``S = Σ g gᵀ / examples``,
        in float64 (negative round-off eigenvalues clipped to 0)."""
        empty = [n for n, p in self.state.items() if p["a_count"] == 0 or p["s_count"] == 0]
        if empty:
            raise ValueError(f"no statistics were collected for layers {empty[:5]}; nothing to decompose")
        bases = {}
        for name, parts in self.state.items():
            eig_a, q_a = torch.linalg.eigh(parts["a_sum"].double() / parts["a_count"])
            eig_s, q_s = torch.linalg.eigh(parts["s_sum"].double() / parts["s_count"])
            bases[name] = {"q_a": q_a, "eig_a": eig_a.clamp_min(0), "q_s": q_s, "eig_s": eig_s.clamp_min(0)}
        return bases


class EigenvalueCorrection(_LayerSums):
    """Sums of squared per-example gradients in a fixed basis: ``Σ_n (Q_Sᵀ ΔW_n Q_A)∘²``.

    With ``bases=None`` the basis is the identity and the result is the diagonal Fisher. The
    per-example gradient ``ΔW_n = Σ_t g_t a_tᵀ`` is never rotated as a matrix: activations and
    gradients are rotated first (cost ``N·T·d²``), and without a token axis the square of the
    rank-one ``g̃ ãᵀ`` is the product of squares, a single matrix multiplication.
    """

    def __init__(self, layers: Sequence[TrackedLayer], bases: Optional[Mapping[str, Mapping[str, Tensor]]] = None,
                 dtype: torch.dtype = torch.float32, device: Optional[torch.device] = None) -> None:
        super().__init__({
            layer.name: {
                "sum": torch.zeros(layer.d_out, layer.d_in, dtype=dtype, device=device),
                "count": torch.zeros((), dtype=torch.float64, device=device),
            }
            for layer in layers
        })
        self.bases = bases

    def add(self, name: str, acts: Tensor, grads: Tensor, num_examples: float, weight: float = 1.0) -> None:
        """Add the examples of one backward: ``acts [B,T,d_in]``, ``grads [B,T,d_out]`` (masked)."""
        parts = self.state[name]
        if self.bases is not None:
            basis = self.bases[name]
            acts = acts @ basis["q_a"].to(acts.dtype)
            grads = grads @ basis["q_s"].to(grads.dtype)
        parts["sum"].add_(squared_example_gradients(acts, grads).to(parts["sum"].dtype), alpha=weight)
        parts["count"] += num_examples

    def mean(self, name: str) -> Tensor:
        parts = self.state[name]
        if parts["count"] == 0:
            raise ValueError(f"no examples were seen for layer {name!r}; cannot correct its eigenvalues")
        return parts["sum"].double() / parts["count"]


def squared_example_gradients(acts: Tensor, grads: Tensor) -> Tensor:
    """``Σ_n (Σ_t g_nt a_ntᵀ)∘²`` for ``acts [N,T,d_in]``, ``grads [N,T,d_out]`` -> ``[d_out, d_in]``."""
    if acts.shape[1] == 1:
        return grads[:, 0].square().T @ acts[:, 0].square()
    total = grads.new_zeros(grads.shape[-1], acts.shape[-1])
    for start, stop in _chunks(acts.shape[0], grads.shape[-1] * acts.shape[-1]):
        total += per_example_gradients(acts[start:stop], grads[start:stop]).square().sum(0)
    return total


def per_example_gradients(acts: Tensor, grads: Tensor) -> Tensor:
    """``ΔW_n = Σ_t g_nt a_ntᵀ``: ``[N, d_out, d_in]``."""
    return torch.einsum("nto,nti->noi", grads, acts)


def _chunks(total: int, elements_per_item: int) -> Iterable[tuple]:
    step = max(1, _CHUNK_ELEMENTS // max(1, elements_per_item))
    for start in range(0, total, step):
        yield start, min(total, start + step)


class Factors:
    """A fitted curvature approximation: everything needed to apply ``(G + λI)⁻¹`` per layer.

    Per-layer tensors by strategy: ``ekfac``: ``q_a``, ``q_s``, ``eigenvalues`` (the corrected
    ``Λ``, ``[d_out, d_in]``); ``kfac``: ``q_a``, ``eig_a``, ``q_s``, ``eig_s``; ``diagonal``:
    ``eigenvalues`` (the diagonal of the Fisher, ``[d_out, d_in]``); ``identity``: nothing (plain
    gradient dot products, damping unused).
    """

    def __init__(self, strategy: str, layers: Dict[str, Dict[str, Tensor]], meta: Optional[Dict[str, Any]] = None) -> None:
        self.strategy = check_strategy(strategy)
        self.layers = layers
        self.meta = dict(meta or {})

    @property
    def layer_names(self) -> List[str]:
        return list(self.layers)

    def eigenvalues(self, name: str) -> Optional[Tensor]:
        """The strategy's own eigenvalues of the layer's curvature block, ``[d_out, d_in]``."""
        parts = self.layers[name]
        if self.strategy == "kfac":
            return torch.outer(parts["eig_s"], parts["eig_a"])
        return parts.get("eigenvalues")

    def damping(self, name: str, damping: Union[None, float, Mapping[str, float]] = None) -> float:
        """λ for one layer: the absolute ``damping`` given, or 0.1 × the mean eigenvalue."""
        if isinstance(damping, Mapping):
            return float(damping[name])
        if damping is not None:
            return float(damping)
        if self.strategy == "identity":
            return 0.0
        parts = self.layers[name]
        if self.strategy == "kfac":  # mean of the outer product without forming it
            mean = parts["eig_s"].mean() * parts["eig_a"].mean()
        else:
            mean = parts["eigenvalues"].mean()
        return DEFAULT_DAMPING_FACTOR * float(mean)

    def _damped_eigenvalues(self, name: str, damping) -> Tensor:
        return self.eigenvalues(name) + self.damping(name, damping)

    def precondition(self, name: str, grads: Tensor, damping=None, rotated: bool = False,
                     in_eigenbasis: bool = False) -> Tensor:
        """Apply ``(G_ℓ + λ_ℓ I)⁻¹`` to a batch of layer gradients ``[N, d_out, d_in]`` (float64 inside).

        With ``rotated=True`` (K-FAC, EK-FAC) the result stays in the eigenbasis, ``q_sᵀ P q_a``,
        and is returned in float64 (for callers that truncate it before rotating back). With
        ``in_eigenbasis=True`` the gradients are already rotated (see :meth:`example_gradients_in_eigenbasis`).
        """
        if self.strategy == "identity":
            return grads
        out_dtype = grads.dtype
        grads = grads.double()
        parts = self.layers[name]
        scale = self._damped_eigenvalues(name, damping).to(grads.device)
        if self.strategy == "diagonal":
            return (grads / scale).to(out_dtype)
        q_a, q_s = parts["q_a"].to(grads.device), parts["q_s"].to(grads.device)
        rotated_grads = (grads if in_eigenbasis else q_s.T @ grads @ q_a) / scale
        if rotated:
            return rotated_grads
        return (q_s @ rotated_grads @ q_a.T).to(out_dtype)

    def example_gradients_in_eigenbasis(self, name: str, acts: Tensor, grads: Tensor) -> Tensor:
        """``q_sᵀ (Σ_t g_t a_tᵀ) q_a`` per example, in float64, for ``acts [N,T,d_in]``, ``grads [N,T,d_out]``.

        Rotating the ``T`` token vectors first costs ``T·d²`` per example instead of the ``d³`` of
        rotating the formed gradient: much cheaper whenever ``T`` is small (one token: ``d²``)."""
        parts = self.layers[name]
        q_a, q_s = parts["q_a"].to(acts.device), parts["q_s"].to(acts.device)
        tokens, d_out, d_in = acts.shape[1], grads.shape[-1], acts.shape[-1]
        if tokens * (d_out ** 2 + d_in ** 2 + d_out * d_in) < d_out * d_in * (d_out + d_in):
            return per_example_gradients(acts.double() @ q_a, grads.double() @ q_s)
        return q_s.T @ per_example_gradients(acts, grads).double() @ q_a

    def quadratic_form(self, name: str, grads: Tensor, damping=None) -> Tensor:
        """``vec(ΔW_n)ᵀ (G_ℓ + λ_ℓ I)⁻¹ vec(ΔW_n)`` for ``grads [N, d_out, d_in]`` -> ``[N]``."""
        if self.strategy == "identity":
            return grads.double().square().sum((1, 2))
        grads = grads.double()
        scale = self._damped_eigenvalues(name, damping).to(grads.device)
        if self.strategy != "diagonal":
            parts = self.layers[name]
            grads = parts["q_s"].to(grads.device).T @ grads @ parts["q_a"].to(grads.device)
        return (grads.square() / scale).sum((1, 2))

    def to(self, device: Union[str, torch.device]) -> "Factors":
        layers = {n: {k: v.to(device) for k, v in parts.items()} for n, parts in self.layers.items()}
        return Factors(self.strategy, layers, self.meta)

    # -- persistence ---------------------------------------------------------------------------
    def save(self, path: PathLike, overwrite: bool = False) -> None:
        """Write atomically to the directory ``path`` (safetensors + JSON).

        ``path`` may be new or an empty directory; factors or a result saved there before are
        replaced only with ``overwrite=True``; anything else there is refused (``FileExistsError``).
        """
        with atomic_directory(path, overwrite=overwrite) as tmp:
            self.write_into(tmp)

    def write_into(self, directory: PathLike) -> None:
        """Write the factors' files into ``directory`` (non-atomic; :meth:`save` is the atomic form)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_tensors(directory / TENSOR_FILE, _state_to_flat(self.layers) or {"_empty": torch.zeros(0)})
        write_json(directory / META_FILE, {
            "format": FACTORS_FORMAT, "version": 1, "strategy": self.strategy,
            "layer_names": self.layer_names, "meta": self.meta,
        })

    def __repr__(self) -> str:
        return f"Factors(strategy={self.strategy!r}, layers={len(self.layers)})"


def load_factors(path: PathLike, device: Union[str, torch.device] = "cpu") -> Factors:
    """Load factors saved by :meth:`Factors.save` (or with a callback result: ``<result>/factors``)."""
    meta = read_meta(path, FACTORS_FORMAT)
    flat = load_tensors(f"{path}/{TENSOR_FILE}", device=device)
    state = _flat_to_state({k: v for k, v in flat.items() if k != "_empty"})
    names = meta.get("layer_names", [])
    if meta.get("strategy") != "identity" and sorted(state) != sorted(names):
        raise FormatError(f"{path}: factor tensors do not match the layers listed in {META_FILE}")
    return Factors(meta["strategy"], {n: state.get(n, {}) for n in names}, meta.get("meta", {}))


# -- fitting ---------------------------------------------------------------------------------------
def _curvature_passes(model, task, data, tracker: LayerTracker, *, fisher: str, num_samples: int, batch_size: int,
                      max_batches: Optional[int], seed: int, desc: str, show_progress: bool):
    """The passes every curvature statistic is built from. Per batch: the number of examples, each
    layer's activations and real-token count, and the Fisher samples ``(weight, example share,
    per-layer gradients)`` of :func:`passes.fisher_gradients` (consume them before the next batch).
    The caller holds ``passes.evaluation_mode(model)`` and the attached ``tracker`` around the loop."""
    device = passes.model_device(model)
    generator = torch.Generator(device).manual_seed(seed)
    for batch in passes.iterate_batches(data, batch_size, device, desc, show_progress, max_batches):
        outputs = passes.forward(model, task, batch, tracker)
        acts = [acts for _, acts in passes.layer_activations(tracker)]
        tokens = [passes.token_count(act, tracker.token_mask) for act in acts]
        yield task.batch_size(batch), acts, tokens, passes.fisher_gradients(
            outputs, task, batch, tracker, fisher, generator, num_samples)


@passes.outside_inference_mode
def accumulate_covariances(model, task, data, layers: Sequence[TrackedLayer], *, fisher: str = "true",
                           num_samples: int = 1, batch_size: int = 32, max_batches: Optional[int] = None,
                           seed: int = 0, dtype: torch.dtype = torch.float32, show_progress: bool = False,
                           into: Optional[CovarianceStatistics] = None) -> CovarianceStatistics:
    """One pass over ``data`` accumulating ``Σ a aᵀ`` and ``Σ g gᵀ`` (into ``into`` if given)."""
    stats = into if into is not None else CovarianceStatistics(layers, dtype=dtype, device=passes.model_device(model))
    tracker = LayerTracker(layers)
    with passes.evaluation_mode(model), tracker:
        for count, acts, tokens, samples in _curvature_passes(
                model, task, data, tracker, fisher=fisher, num_samples=num_samples, batch_size=batch_size,
                max_batches=max_batches, seed=seed, desc="covariances", show_progress=show_progress):
            for layer, act, real_tokens in zip(layers, acts, tokens):
                stats.add_activations(layer.name, act, real_tokens)
            for weight, share, grads in samples:
                for layer, grad in zip(layers, grads):
                    stats.add_gradients(layer.name, grad, count * share, weight)
    return stats


@passes.outside_inference_mode
def accumulate_eigenvalue_correction(model, task, data, layers: Sequence[TrackedLayer], bases=None, *,
                                     fisher: str = "true", num_samples: int = 1, batch_size: int = 32,
                                     max_batches: Optional[int] = None, seed: int = 1,
                                     dtype: torch.dtype = torch.float32,
                                     show_progress: bool = False) -> EigenvalueCorrection:
    """One pass over ``data`` accumulating squared per-example gradients in ``bases`` (EK-FAC's Λ),
    or in the identity basis when ``bases`` is ``None`` (the diagonal Fisher)."""
    correction = EigenvalueCorrection(layers, bases, dtype=dtype, device=passes.model_device(model))
    tracker = LayerTracker(layers)
    desc = "eigenvalue correction" if bases is not None else "diagonal Fisher"
    with passes.evaluation_mode(model), tracker:
        for count, acts, _, samples in _curvature_passes(
                model, task, data, tracker, fisher=fisher, num_samples=num_samples, batch_size=batch_size,
                max_batches=max_batches, seed=seed, desc=desc, show_progress=show_progress):
            for weight, share, grads in samples:
                for layer, act, grad in zip(layers, acts, grads):
                    correction.add(layer.name, act, grad, count * share, weight)
    return correction


def factors_from_statistics(strategy: str, layers: Sequence[TrackedLayer],
                            bases: Optional[Mapping[str, Mapping[str, Tensor]]],
                            correction: Optional[EigenvalueCorrection],
                            meta: Optional[Dict[str, Any]] = None) -> Factors:
    """Assemble a strategy's ``Factors`` from the eigenbases of the covariances (K-FAC, EK-FAC)
    and the accumulated squared gradients (EK-FAC, diagonal)."""
    check_strategy(strategy)
    per_layer: Dict[str, Dict[str, Tensor]] = {}
    for layer in layers:
        if strategy == "kfac":
            per_layer[layer.name] = dict(bases[layer.name])
        elif strategy == "ekfac":
            basis = bases[layer.name]
            per_layer[layer.name] = {"q_a": basis["q_a"], "q_s": basis["q_s"],
                                     "eigenvalues": correction.mean(layer.name)}
        elif strategy == "diagonal":
            per_layer[layer.name] = {"eigenvalues": correction.mean(layer.name)}
        else:
            per_layer[layer.name] = {}
    return Factors(strategy, per_layer, meta)


@passes.outside_inference_mode
def fit_factors(model, task, data, strategy: str = "ekfac", fisher: str = "true", *,
                layers: Optional[Sequence[str]] = None, exclude: Sequence[str] = (),
                batch_size: int = 32, num_samples: int = 1, max_batches: Optional[int] = None,
                seed: int = 0, covariances: Optional[CovarianceStatistics] = None,
                max_layer_bytes: Optional[int] = None, memory_budget_bytes: Optional[int] = None,
                dtype: torch.dtype = torch.float32, show_progress: bool = False,
                reduce: Optional[Callable[[List[Tensor]], None]] = None) -> Factors:
    """Fit the curvature approximation of ``model`` on ``data``.

    Args:
        model: any ``nn.Module`` (its train/eval flags and buffers are restored afterwards).
        task: a :class:`~lightning_influence.tasks.Task` giving per-example losses.
        data: a map-style Dataset or a DataLoader.
        strategy: ``"ekfac"`` (default), ``"kfac"``, ``"diagonal"`` or ``"identity"``.
        fisher: ``"true"`` (targets sampled from the model, as in the paper), ``"empirical"``
            (the data's own targets) or ``"exact"`` (Gauss-Newton without sampling noise; one
            backward per output dimension, for small models and tests).
        layers: module names or glob patterns to track (default: every trackable layer).
        exclude: names or patterns to leave out.
        batch_size: batch size when ``data`` is a Dataset.
        num_samples: sampled targets per example for ``fisher="true"``.
        max_batches: use only the first batches of ``data`` (bounded fitting).
        seed: seed of the private generator used for sampled targets.
        covariances: statistics already accumulated (e.g. during training); skips that pass.
        max_layer_bytes: skip (with a warning) layers whose statistics exceed this.
        memory_budget_bytes: refuse a configuration whose statistics exceed this.
        dtype: accumulation dtype of the statistics (float32; float64 for exactness checks).
        show_progress: show progress bars.
        reduce: called in place on the sums this call accumulates (e.g. an all-reduce across
            processes, each of which passed its own share of ``data``) before they are used.

    Returns:
        :class:`Factors`, to pass to ``compute_influence`` or ``save``.
    """
    check_strategy(strategy)
    check_fisher(fisher)
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    if covariances is not None:
        chosen = layers_by_name(model, list(covariances.state))
    else:
        chosen = select_layers(model, layers, exclude, max_layer_bytes, memory_budget_bytes)
    kwargs = dict(fisher=fisher, num_samples=num_samples, batch_size=batch_size, max_batches=max_batches,
                  dtype=dtype, show_progress=show_progress)
    if strategy in ("kfac", "ekfac") and covariances is None:
        covariances = accumulate_covariances(model, task, data, chosen, seed=seed, **kwargs)
        if reduce is not None:
            reduce(covariances.tensors())
    bases = covariances.eigendecompose() if strategy in ("kfac", "ekfac") else None
    correction = None
    if strategy == "ekfac":
        correction = accumulate_eigenvalue_correction(model, task, data, chosen, bases, seed=seed + 1, **kwargs)
    elif strategy == "diagonal":
        correction = accumulate_eigenvalue_correction(model, task, data, chosen, None, seed=seed + 1, **kwargs)
    if correction is not None and reduce is not None:
        reduce(correction.tensors())
    meta = {"fisher": fisher, "num_samples": num_samples, "layers": [l.name for l in chosen]}
    if covariances is not None:
        meta["tokens_seen"] = {n: float(p["a_count"]) for n, p in covariances.state.items()}
    return factors_from_statistics(strategy, chosen, bases, correction, meta)
