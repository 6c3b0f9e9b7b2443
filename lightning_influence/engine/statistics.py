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

from typing import Callable, Dict, List, Mapping, Optional, Sequence, Union

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
        seen = set()  # a tensor several layers share (one input group's activation sums) is added once
        for name, parts in self.state.items():
            for key, value in parts.items():
                incoming = other.state[name][key]
                if incoming.shape != value.shape:
                    raise ValueError(f"cannot merge {name}/{key}: shape {tuple(incoming.shape)} vs {tuple(value.shape)}")
                if id(value) not in seen:
                    seen.add(id(value))
                    value.add_(incoming.to(value.device, value.dtype))
        return self

    def tensors(self) -> List[Tensor]:
        """Every sum and count (a tensor layers share listed once), for an in-place ``all_reduce(SUM)``
        across processes."""
        unique: Dict[int, Tensor] = {}
        for parts in self.state.values():
            for value in parts.values():
                unique.setdefault(id(value), value)
        return list(unique.values())

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
        self._leaders: Dict[str, str] = {}  # a layer sharing its input group's activation sums -> the group's first

    # -- input groups: layers reading the same input tensor share one activation covariance -----------
    @property
    def input_groups(self) -> List[List[str]]:
        """The groups of layers whose activation sums are one shared tensor (first layer first)."""
        groups: Dict[str, List[str]] = {}
        for name, leader in self._leaders.items():
            groups.setdefault(leader, [leader]).append(name)
        return list(groups.values())

    def share_inputs(self, groups: Sequence[Sequence[str]]) -> List[List[str]]:
        """Make each group's layers (those held here) share the first one's ``a_sum`` and ``a_count``:
        one Gram per batch and one ``d_in x d_in`` matrix for the group. Only layers not yet grouped,
        with equal sums so far (none yet, or the same activations), are grouped; the others keep their
        own. Returns the groups formed (apply the same to another accumulator merged with this one)."""
        formed = []
        for group in groups:
            names = [n for n in group if n in self.state and n not in self._leaders
                     and n not in self._leaders.values()]
            if len(names) < 2:
                continue
            first = self.state[names[0]]
            names = names[:1] + [n for n in names[1:] if self.state[n]["a_sum"].shape == first["a_sum"].shape
                                 and torch.equal(self.state[n]["a_sum"], first["a_sum"])
                                 and torch.equal(self.state[n]["a_count"], first["a_count"])]
            if len(names) < 2:
                continue
            for name in names[1:]:
                self.state[name]["a_sum"] = first["a_sum"]
                self.state[name]["a_count"] = first["a_count"]
                self._leaders[name] = names[0]
            formed.append(names)
        return formed

    def split_inputs(self, group: Sequence[str]) -> None:
        """Give the layers of ``group`` their own activation sums again (a copy of the shared ones:
        until now their activations were the same)."""
        for name in group:
            if self._leaders.pop(name, None) is not None:
                parts = self.state[name]
                parts["a_sum"], parts["a_count"] = parts["a_sum"].clone(), parts["a_count"].clone()

    def activations_of(self, name: str) -> str:
        """The layer whose activation sums hold ``name``'s: its input group's first layer, or itself."""
        return self._leaders.get(name, name)

    def load_state_dict(self, flat: Mapping[str, Tensor]) -> None:
        for group in self.input_groups:  # sums saved without the group's sharing (token subsets per layer)
            saved = [flat.get(f"{name}/a_sum") for name in group]
            if any(value is None or not torch.equal(value, saved[0]) for value in saved):
                self.split_inputs(group)
        super().load_state_dict(flat)

    def add_activations(self, name: str, acts: Tensor, num_tokens: float) -> None:
        """``acts``: ``[B, T, d_in]`` with padded positions already zeroed; ``num_tokens`` real ones.
        The layers of an input group (:meth:`share_inputs`) add their activations once, through the
        group's first layer: a call for another of its layers adds nothing."""
        if name in self._leaders:
            return
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
        bases, shared = {}, {}  # an input group's activation covariance is decomposed once, its basis shared
        for name, parts in chosen.items():
            if id(parts["a_sum"]) not in shared:
                eig_a, q_a = torch.linalg.eigh(parts["a_sum"].double() / parts["a_count"])
                shared[id(parts["a_sum"])] = (q_a, eig_a.clamp_min(0))
            q_a, eig_a = shared[id(parts["a_sum"])]
            eig_s, q_s = torch.linalg.eigh(parts["s_sum"].double() / parts["s_count"])
            bases[name] = {"q_a": q_a, "eig_a": eig_a, "q_s": q_s, "eig_s": eig_s.clamp_min(0)}
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
    return _shared_map(bases, lambda key, value: value.to(device, dtype if key.startswith("q_") else value.dtype))


def _shared_map(layers: Mapping[str, Mapping[str, Tensor]], convert: Callable[[str, Tensor], Tensor]
                ) -> Dict[str, Dict[str, Tensor]]:
    """``convert(key, tensor)`` on every tensor, once per tensor object: a basis layers share (one
    input group's ``q_a``) stays shared."""
    done: Dict[int, Tensor] = {}
    out: Dict[str, Dict[str, Tensor]] = {}
    for name, parts in layers.items():
        out[name] = {}  # a layer without tensors (identity factors) stays a layer
        for key, value in parts.items():
            if id(value) not in done:
                done[id(value)] = convert(key, value)
            out[name][key] = done[id(value)]
    return out


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


