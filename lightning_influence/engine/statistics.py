"""Curvature statistics as float sums with counts, per tracked layer, that merge by addition across
steps, processes and resumed runs.

Per tracked layer, with ``a`` its input (a constant 1 appended for the bias) and ``g`` the gradient
of an example's token-summed loss w.r.t. its output:

* ``CovarianceStatistics`` keeps ``Σ a aᵀ`` and ``Σ g gᵀ`` as float32 sums with counts (real tokens
  for ``A``, examples for ``S``, so that ``A ⊗ S`` has the scale of the per-example Fisher);
* ``EigenvalueCorrection`` keeps ``Σ_n (Q_Sᵀ ΔW_n Q_A)∘²`` (EK-FAC), or ``Σ_n ΔW_n∘²`` (diagonal).

The passes that fill them are in :mod:`~lightning_influence.engine.curvature_passes`.
"""

from __future__ import annotations

from typing import Dict, List, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor

from lightning_influence.engine.example_gradients import squared_example_gradients
from lightning_influence.engine.tracking import TrackedLayer


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
        _add_gram(parts["a_sum"], acts.reshape(-1, acts.shape[-1]))
        _add_count(parts["a_count"], num_tokens)

    def add_gradients(self, name: str, grads: Tensor, num_examples: float, weight: float = 1.0) -> None:
        """``grads``: ``[B, T, d_out]`` gradients of each example's token-summed loss."""
        parts = self.state[name]
        _add_gram(parts["s_sum"], grads.reshape(-1, grads.shape[-1]), weight)
        _add_count(parts["s_count"], num_examples)

    def is_empty(self) -> bool:
        return any(parts["a_count"] == 0 or parts["s_count"] == 0 for parts in self.state.values())

    def eigendecompose(self, names: Optional[Sequence[str]] = None) -> Dict[str, Dict[str, Tensor]]:
        """Per layer (of ``names``, default all), ``q_a, eig_a, q_s, eig_s`` of ``A = Σ a aᵀ / tokens``
        and ``S = Σ g gᵀ / examples``, in float64 (negative round-off eigenvalues clipped to 0)."""
        chosen = {name: self.state[name] for name in (names if names is not None else self.state)}
        empty = [n for n, p in chosen.items() if p["a_count"] == 0 or p["s_count"] == 0]
        if empty:
            raise ValueError(f"no statistics were collected for layers {empty[:5]}; nothing to decompose")
        bases = {}
        for name, parts in chosen.items():
            eig_a, q_a = torch.linalg.eigh(parts["a_sum"].double() / parts["a_count"])
            eig_s, q_s = torch.linalg.eigh(parts["s_sum"].double() / parts["s_count"])
            bases[name] = {"q_a": q_a, "eig_a": eig_a.clamp_min(0), "q_s": q_s, "eig_s": eig_s.clamp_min(0)}
        return bases


def _add_gram(total: Tensor, rows: Tensor, alpha: float = 1.0) -> None:
    """``total += alpha · rowsᵀ rows`` in ``total``'s dtype. Sums kept on another device than the
    rows (``statistics_device="cpu"``) receive the product computed where the rows are: only one
    layer's ``d x d`` product is ever in transit."""
    rows = rows.to(total.dtype)
    if rows.device == total.device:
        add_symmetric_gram_(total, rows, alpha)
    else:
        gram = rows.new_zeros(rows.shape[1], rows.shape[1])
        add_symmetric_gram_(gram, rows)
        total.add_(gram.to(total.device), alpha=alpha)


# Column blocks of a Gram product: the blocks below the diagonal are the transposes of those above,
# so k blocks cost (k + 1) / 2k of the full product. Narrower blocks run BLAS below its efficient
# size: 128 measured best on one CPU thread (d = 384 to 2,048: 22-25% less time than one product).
GRAM_BLOCK = 128


def add_symmetric_gram_(total: Tensor, rows: Tensor, alpha: float = 1.0) -> None:
    """``total += alpha · rowsᵀ rows``, computing only the blocks on and above the diagonal."""
    width = rows.shape[1]
    count = width // GRAM_BLOCK
    if count < 2:
        total.addmm_(rows.T, rows, alpha=alpha)
        return
    edges = [width * i // count for i in range(count + 1)]
    for start, stop in zip(edges[:-1], edges[1:]):
        block = rows[:, start:stop]
        total[start:stop, start:stop].addmm_(block.T, block, alpha=alpha)
        if stop < width:
            product = block.T @ rows[:, stop:]
            total[start:stop, stop:].add_(product, alpha=alpha)
            total[stop:, start:stop].add_(product.T, alpha=alpha)


def _add_count(count: Tensor, amount: Union[float, Tensor]) -> None:
    count += amount.to(count.device) if isinstance(amount, Tensor) else amount


def stored_bases(bases: Mapping[str, Mapping[str, Tensor]], dtype: torch.dtype,
                 device: Optional[torch.device]) -> Dict[str, Dict[str, Tensor]]:
    """Eigenbases as the factors keep them: ``q_a``, ``q_s`` in ``dtype`` (``eigenbasis_dtype``:
    float32 or bfloat16 halve or quarter the factors' largest tensors), eigenvalues in float64, all
    on ``device`` (the model's, when the statistics were decomposed on the CPU)."""
    return {name: {key: value.to(device, dtype if key.startswith("q_") else value.dtype)
                   for key, value in parts.items()}
            for name, parts in bases.items()}


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
            acts = acts @ basis["q_a"].to(acts)
            grads = grads @ basis["q_s"].to(grads)
        parts["sum"].add_(squared_example_gradients(acts, grads).to(parts["sum"].dtype), alpha=weight)
        parts["count"] += num_examples

    def mean(self, name: str) -> Tensor:
        parts = self.state[name]
        if parts["count"] == 0:
            raise ValueError(f"no examples were seen for layer {name!r}; cannot correct its eigenvalues")
        return parts["sum"].double() / parts["count"]


