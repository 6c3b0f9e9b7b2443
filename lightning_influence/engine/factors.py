"""Curvature statistics and the preconditioners built from them.

Per tracked layer, with ``a`` its input (a constant 1 appended for the bias) and ``g`` the gradient
of an example's token-summed loss w.r.t. its output:

* ``CovarianceStatistics`` keeps ``Σ a aᵀ`` and ``Σ g gᵀ`` as float32 sums with counts (real tokens
  for ``A``, examples for ``S``, so that ``A ⊗ S`` has the scale of the per-example Fisher); sums
  merge across steps, processes and resumed runs;
* ``EigenvalueCorrection`` keeps ``Σ_n (Q_Sᵀ ΔW_n Q_A)∘²`` (EK-FAC), or ``Σ_n ΔW_n∘²`` (diagonal);
* ``Factors`` is the fitted preconditioner ``(G + λI)⁻¹`` of one strategy, saved and loaded without
  pickle.
"""

from __future__ import annotations

import math
import numbers
import os
import shutil
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from lightning_influence._io import (
    META_FILE,
    TENSOR_FILE,
    FormatError,
    PathLike,
    atomic_directory,
    load_tensor_subset,
    load_tensors,
    read_meta,
    read_tensor_shapes,
    save_tensors,
    write_json,
)
from lightning_influence.engine import distributed
from lightning_influence.engine import freshness
from lightning_influence.engine import passes
from lightning_influence.engine.tracking import LayerTracker, TrackedLayer, layers_by_name, select_layers

STRATEGIES = ("ekfac", "kfac", "diagonal", "identity")
FISHER_KINDS = ("true", "empirical", "exact")
FACTORS_FORMAT = "lightning-influence/factors"
DEFAULT_DAMPING_FACTOR = 0.1  # the paper's heuristic: λ_ℓ = 0.1 × mean eigenvalue of layer ℓ
# Floors of the heuristic, so that a layer with zero curvature (a LoRA adapter at initialisation)
# never divides 0 by 0: a fraction of the model-wide heuristic (0.1 × the mean eigenvalue over all
# layers), and an absolute minimum for a model without any curvature, far below measured λ values
# yet large enough that a float32 gradient divided by it stays finite.
RELATIVE_DAMPING_FLOOR = 1e-3
ABSOLUTE_DAMPING_FLOOR = 1e-10
# Bound on the elements of one intermediate tensor (per-example gradients [chunk, d_out, d_in] here,
# the direct contraction in scoring).
CHUNK_ELEMENTS = 2**24
# On the CPU, per-example gradients reduced right away (squared sums) are formed one block of rows
# of one example at a time, small enough to stay in a core's L2 cache (512 KiB in float32): forming
# a batch's [N, d_out, d_in] first and reducing it afterwards runs at memory speed (2.5-3.3x slower
# measured on GPT-sized layers, 16 examples of 64 tokens). Below ``BLOCKWISE_MIN_ELEMENTS`` per
# example the Python loop costs more than the memory traffic it saves.
EXAMPLE_BLOCK_ELEMENTS = 2**17
BLOCKWISE_MIN_ELEMENTS = 2**12
Damping = Union[None, float, Mapping[str, float]]


def check_strategy(strategy: str) -> str:
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    return strategy


def check_fisher(fisher: str) -> str:
    if fisher not in FISHER_KINDS:
        raise ValueError(f"unknown fisher {fisher!r}; choose one of {', '.join(FISHER_KINDS)}")
    return fisher


# Above this a damping is effectively infinite: every score shrinks towards zero and loses its precision.
MAX_DAMPING = 1e30


def check_damping(value: Any, what: str = "damping") -> float:
    """The one check of an absolute λ, wherever one is given (the callback's settings, the command
    line, ``compute_influence``): a number from 0 to :data:`MAX_DAMPING`."""
    if not (isinstance(value, numbers.Real) and not isinstance(value, bool) and 0 <= value <= MAX_DAMPING):
        raise ValueError(f"{what} must be a number from 0 to {MAX_DAMPING:g} (above, it is effectively infinite: "
                         f"every score shrinks towards zero), or None for the per-layer heuristic; got {value!r}")
    return float(value)


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


def squared_example_gradients(acts: Tensor, grads: Tensor) -> Tensor:
    """``Σ_n (Σ_t g_nt a_ntᵀ)∘²`` for ``acts [N,T,d_in]``, ``grads [N,T,d_out]`` -> ``[d_out, d_in]``."""
    if acts.shape[1] == 1:
        return grads[:, 0].square().T @ acts[:, 0].square()
    total = grads.new_zeros(grads.shape[-1], acts.shape[-1])
    if blockwise(acts, grads):
        for _, rows, block in example_gradient_blocks(acts, grads):
            total[rows].addcmul_(block, block)
        return total
    for start, stop in chunk_ranges(acts.shape[0], grads.shape[-1] * acts.shape[-1]):
        gradients = per_example_gradients(acts[start:stop], grads[start:stop])
        total += torch.einsum("noi,noi->oi", gradients, gradients)  # no squared copy: 1.3-1.9x faster
    return total


def blockwise(acts: Tensor, grads: Tensor) -> bool:
    """Whether per-example gradients are best reduced block by block (:func:`example_gradient_blocks`)."""
    return acts.device.type == "cpu" and grads.shape[-1] * acts.shape[-1] >= BLOCKWISE_MIN_ELEMENTS


def example_gradient_blocks(acts: Tensor, grads: Tensor) -> Iterator[Tuple[int, slice, Tensor]]:
    """Each example's gradient ``Σ_t g_t a_tᵀ`` as ``(example, rows, block)``, ``EXAMPLE_BLOCK_ELEMENTS``
    at a time, for a caller that reduces each block before the next is formed (see the constant)."""
    step = max(1, EXAMPLE_BLOCK_ELEMENTS // acts.shape[-1])
    d_out = grads.shape[-1]
    for example in range(acts.shape[0]):
        example_grads, example_acts = grads[example].T, acts[example]
        for start in range(0, d_out, step):
            rows = slice(start, min(d_out, start + step))
            yield example, rows, example_grads[rows] @ example_acts


def per_example_gradients(acts: Tensor, grads: Tensor) -> Tensor:
    """``ΔW_n = Σ_t g_nt a_ntᵀ``: ``[N, d_out, d_in]``."""
    return torch.einsum("nto,nti->noi", grads, acts)


def stored_transposed(batch: Tensor) -> bool:
    """Whether ``batch [N, m, n]`` is the transposed view of a contiguous ``[N, n, m]`` (how dense
    preconditioned queries are kept: the rotation back to the layer's coordinates is faster in
    that orientation, and a copy to the other would cost as much as the gain)."""
    return batch.dim() == 3 and not batch.is_contiguous() and batch.transpose(1, 2).is_contiguous()


def left_multiply(matrix: Tensor, batch: Tensor) -> Tensor:
    """``matrix @ batch[n]`` for every n as one ``[m, k] x [k, N·n]`` product: a broadcast ``matrix @ batch``
    runs N smaller products (measured 1.5x slower on ``[2048, 2048] x [8, 2048, 513]``)."""
    count, rows, columns = batch.shape
    folded = batch.transpose(0, 1).reshape(rows, count * columns)
    return (matrix @ folded).view(matrix.shape[0], count, columns).transpose(0, 1)


def chunk_ranges(total: int, elements_per_item: int) -> Iterable[tuple]:
    """``(start, stop)`` slices of ``total`` items with at most ``CHUNK_ELEMENTS`` elements each, of
    equal sizes (16 GPT queries of 2048x513 as 8 and 8, not 15 and a lone one that runs every batched
    product again for a single matrix)."""
    most = max(1, CHUNK_ELEMENTS // max(1, elements_per_item))
    step = -(-total // -(-total // most)) if total else most  # ceil(total / number of chunks)
    for start in range(0, total, step):
        yield start, min(total, start + step)


class Factors:
    """A fitted curvature approximation: everything needed to apply ``(G + λI)⁻¹`` per layer.

    Per-layer tensors by strategy: ``ekfac``: ``q_a``, ``q_s``, ``eigenvalues`` (the corrected
    ``Λ``, ``[d_out, d_in]``); ``kfac``: ``q_a``, ``eig_a``, ``q_s``, ``eig_s``; ``diagonal``:
    ``eigenvalues`` (the diagonal of the Fisher, ``[d_out, d_in]``); ``identity``: nothing (plain
    gradient dot products, damping unused).

    Sharded across processes (``owners`` given: layer -> rank), ``layers`` holds this process's
    layers only, and ``summaries`` the ``(mean, count, min)`` of every other layer's eigenvalues:
    all the damping heuristic needs of them.
    """

    def __init__(self, strategy: str, layers: Dict[str, Dict[str, Tensor]], meta: Optional[Dict[str, Any]] = None,
                 owners: Optional[Dict[str, int]] = None,
                 summaries: Optional[Mapping[str, Sequence[float]]] = None) -> None:
        self.strategy = check_strategy(strategy)
        self.layers = layers
        self.meta = dict(meta or {})
        self.owners = owners
        self.summaries = {name: tuple(value) for name, value in (summaries or {}).items()}

    @property
    def layer_names(self) -> List[str]:
        """Every layer the factors describe (with sharding, also those held by other processes)."""
        return list(self.owners) if self.owners is not None else list(self.layers)

    @property
    def is_sharded(self) -> bool:
        return self.owners is not None

    @property
    def has_eigenbasis(self) -> bool:
        """Whether the preconditioner is diagonal in a Kronecker eigenbasis (K-FAC, EK-FAC)."""
        return self.strategy in ("kfac", "ekfac")

    def eigenbasis(self, name: str) -> Tuple[Tensor, Tensor]:
        """``(q_s, q_a)``: the layer's eigenbasis, ``ΔW = q_s ΔW̃ q_aᵀ`` (K-FAC, EK-FAC only)."""
        parts = self.layers[name]
        return parts["q_s"], parts["q_a"]

    def eigenvalues(self, name: str) -> Optional[Tensor]:
        """The strategy's own eigenvalues of the layer's curvature block, ``[d_out, d_in]``."""
        parts = self.layers[name]
        if self.strategy == "kfac":
            return torch.outer(parts["eig_s"], parts["eig_a"])
        return parts.get("eigenvalues")

    def eigenvalue_summary(self, name: str) -> Tuple[float, int, float]:
        """Mean, number and minimum of the layer's eigenvalues (held here, or summarised by its owner)."""
        if name not in self.layers:
            return self.summaries[name]
        mean, count = self._eigenvalue_mean(name)
        smallest = self.layers[name]["eig_s"].min() * self.layers[name]["eig_a"].min() if self.strategy == "kfac" \
            else self.layers[name]["eigenvalues"].min()
        return mean, count, float(smallest)

    def _eigenvalue_mean(self, name: str) -> Tuple[float, int]:
        """Mean and number of the layer's eigenvalues (K-FAC: of the outer product, without forming it)."""
        if name not in self.layers:
            return tuple(self.summaries[name][:2])
        parts = self.layers[name]
        if self.strategy == "kfac":
            return float(parts["eig_s"].mean() * parts["eig_a"].mean()), parts["eig_s"].numel() * parts["eig_a"].numel()
        return float(parts["eigenvalues"].mean()), parts["eigenvalues"].numel()

    def damping_per_layer(self, damping: Damping = None) -> Dict[str, float]:
        """λ_ℓ for every layer, checked; scoring builds it once per call.

        Args:
            damping: an absolute λ for every layer, a dict ``{layer: λ}``, or ``None`` for the
                paper's heuristic ``0.1 × mean eigenvalue`` of each layer, floored at
                ``RELATIVE_DAMPING_FLOOR ×`` the model-wide heuristic (0.1 × the mean eigenvalue over
                all layers) and at ``ABSOLUTE_DAMPING_FLOOR``: a layer without curvature (a LoRA
                adapter at initialisation) would otherwise get λ = 0 and scores 0/0.

        Raises:
            ValueError: for a λ that is negative or not finite, a dict that misses layers, or λ = 0
                on a layer whose curvature has a zero eigenvalue (no inverse exists).
        """
        if damping is None:
            return self._heuristic_damping()
        if isinstance(damping, Mapping):
            missing = [name for name in self.layer_names if name not in damping]
            if missing:
                raise ValueError(f"the damping dict has no value for layers {missing[:5]}; give one per layer "
                                 f"({self.layer_names}) or a single float")
            lambdas = {name: check_damping(damping[name], f"damping[{name!r}]") for name in self.layer_names}
        else:
            value = check_damping(damping)
            lambdas = {name: value for name in self.layer_names}
        if self.strategy != "identity":
            singular = [name for name, value in lambdas.items()
                        if value == 0 and self.eigenvalue_summary(name)[2] <= 0]
            if singular:
                raise ValueError(f"damping 0 on layers {singular[:5]}, whose curvature has a zero eigenvalue, "
                                 "has no inverse; pass damping=None (the heuristic) or a positive damping")
        return lambdas

    def _heuristic_damping(self) -> Dict[str, float]:
        """0.1 × each layer's mean eigenvalue, with the floors (see :meth:`damping_per_layer`)."""
        if self.strategy == "identity":
            return {name: 0.0 for name in self.layer_names}
        means = {name: self._eigenvalue_mean(name) for name in self.layer_names}
        total = sum(mean * count for mean, count in means.values())
        count = sum(count for _, count in means.values())
        floor = max(RELATIVE_DAMPING_FLOOR * DEFAULT_DAMPING_FACTOR * total / max(count, 1), ABSOLUTE_DAMPING_FLOOR)
        return {name: max(DEFAULT_DAMPING_FACTOR * mean, floor) for name, (mean, _) in means.items()}

    def damping(self, name: str, damping: Damping = None) -> float:
        """λ for one layer (see :meth:`damping_per_layer`, which gives every layer's at once)."""
        return self.damping_per_layer(damping)[name]

    def _damped_eigenvalues(self, name: str, damping: float, device: torch.device) -> Tensor:
        return (self.eigenvalues(name) + damping).to(device)

    def precondition(self, name: str, grads: Tensor, damping: float) -> Tensor:
        """``(G_ℓ + λ I)⁻¹`` applied to layer gradients ``[N, d_out, d_in]`` (float64 inside, dtype kept)."""
        if self.strategy == "identity":
            return grads
        if self.has_eigenbasis:
            rotated = self.precondition_in_eigenbasis(name, self.rotate_to_eigenbasis(name, grads.double()), damping,
                                                     in_place=True)
            return self.rotate_from_eigenbasis(name, rotated).to(grads.dtype)
        return (grads.double() / self._damped_eigenvalues(name, damping, grads.device)).to(grads.dtype)

    def precondition_in_eigenbasis(self, name: str, rotated: Tensor, damping: float, in_place: bool = False) -> Tensor:
        """Preconditioning of gradients given in the eigenbasis (see :meth:`example_gradients_in_eigenbasis`),
        result also in the eigenbasis and in ``rotated``'s dtype (float32 overflow shows as inf): for
        callers that truncate before rotating back. ``in_place`` divides ``rotated`` itself (a fresh
        [N, d_out, d_in] result costs more in page faults than the division: 8x on 64 MiB)."""
        damped = self._damped_eigenvalues(name, damping, rotated.device).to(rotated.dtype)
        if in_place and stored_transposed(rotated):  # divide in the storage's order (strided: 6x slower)
            rotated.transpose(1, 2).div_(damped.T.contiguous())
            return rotated
        return rotated.div_(damped) if in_place else rotated / damped

    def rotate_to_eigenbasis(self, name: str, grads: Tensor) -> Tensor:
        """``q_sᵀ ΔW q_a`` for ``grads [N, d_out, d_in]``."""
        q_s, q_a = (basis.to(grads) for basis in self.eigenbasis(name))
        return left_multiply(q_s.T, grads @ q_a)

    def rotate_from_eigenbasis(self, name: str, rotated: Tensor, output_side: bool = True,
                               input_side: bool = True) -> Tensor:
        """``q_s ΔW̃ q_aᵀ``: back to the layer's own coordinates (only on the output / input side
        where the other flag is ``False``). A batch stored transposed (see :func:`stored_transposed`)
        is rotated in that orientation and returned stored transposed."""
        q_s, q_a = (basis.to(rotated) for basis in self.eigenbasis(name))
        if stored_transposed(rotated):
            # (q_s ΔW̃ q_aᵀ)ᵀ = q_a (ΔW̃ᵀ q_sᵀ): one [N·d_in, d_out] x [d_out, d_out] product and a batched one,
            # no transposing copy (1.1-1.3x faster than the other orientation on GPT layers, one CPU thread).
            flipped = rotated.transpose(1, 2)
            flipped = flipped @ q_s.T if output_side else flipped
            return (torch.matmul(q_a, flipped) if input_side else flipped).transpose(1, 2)
        rotated = rotated @ q_a.T if input_side else rotated
        return left_multiply(q_s, rotated) if output_side else rotated

    def example_gradients_in_eigenbasis(self, name: str, acts: Tensor, grads: Tensor,
                                        dtype: torch.dtype = torch.float64, transposed: bool = False) -> Tensor:
        """``q_sᵀ (Σ_t g_t a_tᵀ) q_a`` per example, in ``dtype``, for ``acts [N,T,d_in]``, ``grads [N,T,d_out]``;
        with ``transposed``, stored transposed (see :func:`stored_transposed`) where tokens are rotated.

        Rotating the ``T`` token vectors first costs ``T·d²`` per example instead of the ``d³`` of
        rotating the formed gradient: much cheaper whenever ``T`` is small (one token: ``d²``)."""
        if self.rotates_tokens(name, acts.shape[1]):
            acts, grads = self.tokens_in_eigenbasis(name, acts, grads, dtype)
            return per_example_gradients(grads, acts).transpose(1, 2) if transposed else per_example_gradients(acts, grads)
        q_s, q_a = (basis.to(acts.device, dtype) for basis in self.eigenbasis(name))
        return left_multiply(q_s.T, per_example_gradients(acts, grads).to(dtype) @ q_a)

    def tokens_in_eigenbasis(self, name: str, acts: Tensor, grads: Tensor, dtype: torch.dtype) -> Tuple[Tensor, Tensor]:
        """``(acts q_a, grads q_s)`` in ``dtype``: token vectors whose per-example gradients are in the eigenbasis."""
        q_s, q_a = (basis.to(acts.device, dtype) for basis in self.eigenbasis(name))
        return acts.to(dtype) @ q_a, grads.to(dtype) @ q_s

    def rotates_tokens(self, name: str, tokens: int) -> bool:
        """Whether rotating ``tokens`` token vectors into the eigenbasis costs less than rotating
        the formed per-example gradient."""
        q_s, q_a = self.eigenbasis(name)
        d_out, d_in = q_s.shape[0], q_a.shape[0]
        return tokens * (d_out ** 2 + d_in ** 2 + d_out * d_in) < d_out * d_in * (d_out + d_in)

    def example_quadratic_form(self, name: str, acts: Tensor, grads: Tensor, damping: float) -> Tensor:
        """``vec(ΔW_n)ᵀ (G_ℓ + λ I)⁻¹ vec(ΔW_n)`` for each example's gradient ``ΔW_n = Σ_t g_t a_tᵀ``,
        from its activations ``[N,T,d_in]`` and output gradients ``[N,T,d_out]`` -> ``[N]`` float64: the rotation in
        the inputs' dtype (tokens first when cheaper), sums in float64 (on the CPU, of float32 blocks of
        squares divided by the eigenvalues: :func:`example_gradient_blocks`). Self-influence
        then costs about one product per token instead of two float64 ``d³`` rotations per example."""
        out = torch.zeros(acts.shape[0], dtype=torch.float64, device=acts.device)
        damped = None if self.strategy == "identity" else self._damped_eigenvalues(name, damping, acts.device)
        rotates_matrices = self.has_eigenbasis and not self.rotates_tokens(name, acts.shape[1])
        if self.has_eigenbasis and not rotates_matrices:  # from here on, per-example gradients are in the eigenbasis
            acts, grads = self.tokens_in_eigenbasis(name, acts, grads, acts.dtype)
        if blockwise(acts, grads) and not rotates_matrices:
            inverse = None if damped is None else damped.reciprocal().to(acts.dtype)
            for example, rows, block in example_gradient_blocks(acts, grads):
                squares = block.square_() if inverse is None else block.square_().mul_(inverse[rows])
                out[example] += squares.sum(dtype=torch.float64)
            return out
        for start, stop in chunk_ranges(acts.shape[0], grads.shape[-1] * acts.shape[-1]):
            if rotates_matrices:
                example = self.example_gradients_in_eigenbasis(name, acts[start:stop], grads[start:stop], acts.dtype)
            else:
                example = per_example_gradients(acts[start:stop], grads[start:stop])
            squares = example.double().square()
            out[start:stop] = (squares if damped is None else squares / damped).sum((1, 2))
        return out

    def to(self, device: Union[str, torch.device]) -> "Factors":
        layers = _shared_map(self.layers, lambda key, value: value.to(device))
        return Factors(self.strategy, layers, self.meta, self.owners, self.summaries)

    def held_bytes(self) -> int:
        """Bytes of the factor tensors this process holds."""
        unique = {id(v): v for parts in self.layers.values() for v in parts.values()}  # shared bases once
        return sum(v.numel() * v.element_size() for v in unique.values())

    # -- persistence ---------------------------------------------------------------------------
    def save(self, path: PathLike, overwrite: bool = False) -> None:
        """Write atomically to the directory ``path`` (safetensors + JSON).

        ``path`` may be new or an empty directory; factors or a result saved there before are
        replaced only with ``overwrite=True``; anything else there is refused (``FileExistsError``).
        Sharded factors are saved collectively (call on every process; ``path`` on a file system
        they share): one file per owner, which :func:`load_factors` reads on any number of processes.
        """
        if self.is_sharded:
            self.stage_shards(path)
        if distributed.rank() == 0 or not self.is_sharded:
            with atomic_directory(path, overwrite=overwrite) as tmp:
                self.write_into(tmp)
        if self.is_sharded:
            distributed.barrier()

    def stage_shards(self, path: PathLike) -> None:
        """Every process writes its layers next to ``path``, where :meth:`write_into` on process 0
        moves them into the saved directory (collective; no process sends another its factors)."""
        staging = _staging_dir(path)
        staging.mkdir(parents=True, exist_ok=True)
        save_tensors(staging / _shard_file(distributed.rank()),
                     _state_to_flat(self.layers) or {"_empty": torch.zeros(0)})
        distributed.barrier()
        self._staged = staging

    def write_into(self, directory: PathLike) -> None:
        """Write the factors' files into ``directory`` (non-atomic; :meth:`save` is the atomic form).
        Sharded factors move in the files :meth:`stage_shards` wrote."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        header = {"format": FACTORS_FORMAT, "version": 1, "strategy": self.strategy,
                  "layer_names": self.layer_names, "meta": self.meta}
        if self.is_sharded:
            staging = getattr(self, "_staged", None)
            if staging is None:
                raise RuntimeError("sharded factors are written collectively: call Factors.save on every process, "
                                   "or stage_shards(path) on every process before writing on process 0")
            shards: Dict[str, List[str]] = {}
            for name, owner in self.owners.items():
                shards.setdefault(_shard_file(owner), []).append(name)
            for file in shards:
                os.replace(staging / file, directory / file)
            shutil.rmtree(staging, ignore_errors=True)
            header.update(shards=shards, summaries={n: list(self.eigenvalue_summary(n)) for n in self.layer_names})
        else:
            save_tensors(directory / TENSOR_FILE, _state_to_flat(self.layers) or {"_empty": torch.zeros(0)})
        write_json(directory / META_FILE, header)

    def __repr__(self) -> str:
        held = f", held here={len(self.layers)}" if self.is_sharded else ""
        return f"Factors(strategy={self.strategy!r}, layers={len(self.layer_names)}{held})"


def _shard_file(owner: int) -> str:
    return f"shard-{owner:05d}.safetensors"


def _staging_dir(path: PathLike) -> Path:
    """Where processes write their shards before process 0 moves them into ``path`` (same on every process)."""
    path = Path(path)
    return path.parent / f".{path.name}.factor-shards"


def load_factors(path: PathLike, device: Union[str, torch.device] = "cpu", shard: bool = False) -> Factors:
    """Load factors saved by :meth:`Factors.save` (or with a callback result: ``<result>/factors``).

    Factors saved sharded (one file per owner) load whole by default, on one process. With
    ``shard=True`` in a process group each process reads only the layers it owns for the current
    number of processes (balanced as when fitting), whatever number saved them (collective-free)."""
    meta = read_meta(path, FACTORS_FORMAT)
    names = meta.get("layer_names", [])
    files = meta.get("shards") or {TENSOR_FILE: names}
    if shard and distributed.world_size() > 1 and meta.get("strategy") in ("kfac", "ekfac"):
        return _load_owned(path, meta, files, device)
    flat: Dict[str, Tensor] = {}
    for file in files:
        flat.update(load_tensors(f"{path}/{file}", device=device))
    state = _flat_to_state({k: v for k, v in flat.items() if k != "_empty"})
    if meta.get("strategy") != "identity" and sorted(state) != sorted(names):
        raise FormatError(f"{path}: factor tensors do not match the layers listed in {META_FILE}")
    return Factors(meta["strategy"], {n: state.get(n, {}) for n in names}, meta.get("meta", {}))


def _load_owned(path: PathLike, meta: Dict[str, Any], files: Mapping[str, Sequence[str]],
                device: Union[str, torch.device]) -> Factors:
    """This process's layers of saved K-FAC / EK-FAC factors, and the others' eigenvalue summaries."""
    where: Dict[str, Tuple[str, List[str]]] = {}  # layer -> (its file, its tensors' names)
    shapes: Dict[str, Dict[str, Tuple[int, ...]]] = {}
    for file in files:
        for key, shape in read_tensor_shapes(f"{path}/{file}").items():
            layer, _, part = key.rpartition("/")
            where.setdefault(layer, (file, []))[1].append(part)
            shapes.setdefault(layer, {})[part] = shape
    names = meta["layer_names"]
    if sorted(where) != sorted(names):
        raise FormatError(f"{path}: factor tensors do not match the layers listed in {META_FILE}")
    owners = distributed.assign_owners({n: distributed.factor_cost(shapes[n]["q_s"][0], shapes[n]["q_a"][0])
                                        for n in names})
    here = distributed.rank()
    layers, summaries = {}, dict(meta.get("summaries") or {})
    for name in names:
        file, parts = where[name]
        if owners[name] != here and name in summaries:
            continue
        tensors = load_tensor_subset(f"{path}/{file}", [f"{name}/{part}" for part in parts], device)
        held = Factors(meta["strategy"], {name: {k.rpartition("/")[2]: v for k, v in tensors.items()}})
        if owners[name] == here:
            layers[name] = held.layers[name]
        else:  # saved whole: summarise a layer held elsewhere, one layer at a time
            summaries[name] = held.eigenvalue_summary(name)
    return Factors(meta["strategy"], layers, meta.get("meta", {}), owners, summaries)


# -- fitting ---------------------------------------------------------------------------------------
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
                            training: CovarianceStatistics, *, strategy: str, refresh: str,
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
    correct_first = strategy == "ekfac" and refresh != "always"
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
    if strategy == "ekfac":
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
                reduce: Optional[Callable[[List[Tensor]], None]] = None,
                statistics_device: Union[None, str, torch.device] = None,
                eigenbasis_dtype: torch.dtype = torch.float64,
                refresh: str = "never") -> Factors:
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
        statistics_device: where the covariance sums are accumulated and decomposed (e.g.
            ``"cpu"``: off the GPU, which then holds one layer's ``d x d`` product at a time);
            default: the model's device. The bases are moved to the model's device afterwards.
        eigenbasis_dtype: dtype the eigenbases are kept in (float64 default; float32 or bfloat16
            halve or quarter the factors' memory: see the README for the accuracy cost).
        refresh: with ``covariances`` (K-FAC / EK-FAC, e.g. collected while the weights moved):
            ``"auto"`` refits from ``data``'s covariances the eigenbasis of each layer where they
            describe the current weights better (:mod:`~lightning_influence.engine.freshness`), ``"always"``
            every layer's, ``"never"`` none (EK-FAC still measures their staleness);
            ``meta["curvature"]`` records it.

    Returns:
        :class:`Factors`, to pass to ``compute_influence`` or ``save``. Examples with non-finite
        values (NaN/inf, or squares overflowing ``dtype``) are left out of the statistics, reported
        in a warning, and counted in ``meta["nonfinite_examples"]``; ``meta["timings"]`` holds the
        seconds of each stage (covariances, eigendecomposition, correction).
    """
    check_strategy(strategy)
    check_fisher(fisher)
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    if covariances is not None:
        chosen = layers_by_name(model, list(covariances.state))
    else:
        chosen = select_layers(model, layers, exclude, max_layer_bytes, memory_budget_bytes)
    left_out: List[int] = []
    kwargs = dict(fisher=fisher, num_samples=num_samples, batch_size=batch_size, max_batches=max_batches,
                  dtype=dtype, show_progress=show_progress, left_out=left_out)
    timings: Dict[str, float] = {}
    bases, correction, curvature = None, None, {}
    started = time.perf_counter()
    if strategy in ("kfac", "ekfac") and covariances is not None:  # collected elsewhere: maybe stale
        bases, correction, curvature = curvature_at_checkpoint(
            model, task, [(data, seed + 1)], chosen, covariances, strategy=strategy, refresh=refresh,
            eigenbasis_dtype=eigenbasis_dtype, reduce=reduce, **kwargs)
        timings["correction"] = time.perf_counter() - started
    elif strategy in ("kfac", "ekfac"):
        into = CovarianceStatistics(chosen, dtype, statistics_device) if statistics_device is not None else None
        covariances = accumulate_covariances(model, task, data, chosen, seed=seed, into=into, **kwargs)
        if reduce is not None:
            reduce(covariances.tensors())
        timings["covariances"] = time.perf_counter() - started
        started = time.perf_counter()
        bases = stored_bases(covariances.eigendecompose(), eigenbasis_dtype, passes.model_device(model))
        timings["eigendecomposition"] = time.perf_counter() - started
    if strategy == "diagonal" or (strategy == "ekfac" and correction is None):
        started = time.perf_counter()
        correction = accumulate_eigenvalue_correction(model, task, data, chosen, bases if strategy == "ekfac" else None,
                                                      seed=seed + 1, **kwargs)
        if reduce is not None:
            reduce(correction.tensors())
        timings["correction"] = time.perf_counter() - started
    _warn_left_out(left_out)
    meta = {"fisher": fisher, "num_samples": num_samples, "layers": [l.name for l in chosen],
            "nonfinite_examples": len(set(left_out)), "timings": timings}
    if covariances is not None:
        meta["tokens_seen"] = curvature.pop("tokens_seen", None) or {
            n: float(p["a_count"]) for n, p in covariances.state.items()}
    if curvature:
        meta["curvature"] = curvature
    return factors_from_statistics(strategy, chosen, bases, correction, meta)
