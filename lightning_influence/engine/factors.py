"""``Factors``: a fitted preconditioner ``(G + λI)⁻¹`` of one curvature approximation per tracked
layer, its damping, and its storage (safetensors + JSON, never pickle; sharded across processes
where the approximation allows it).

The statistics it is built from are in :mod:`~lightning_influence.engine.statistics`, the passes that
collect them in :mod:`~lightning_influence.engine.curvature_passes`, fitting in
:mod:`~lightning_influence.engine.fitting`, and what each strategy keeps and how it preconditions in
:mod:`~lightning_influence.engine.approximations`.
"""

from __future__ import annotations

import numbers
import os
import shutil
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

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
from lightning_influence.engine.approximations import (
    CurvatureApproximation,
    approximation,
    eigenbasis,
    example_gradients_in_eigenbasis,
    rotate_from_eigenbasis,
    rotate_to_eigenbasis,
    rotates_tokens,
    tokens_in_eigenbasis,
)
from lightning_influence.engine.statistics import _flat_to_state, _shared_map, _state_to_flat

FISHER_KINDS = ("true", "empirical", "exact")
FACTORS_FORMAT = "lightning-influence/factors"
DEFAULT_DAMPING_FACTOR = 0.1  # the paper's heuristic: λ_ℓ = 0.1 × mean eigenvalue of layer ℓ
# Floors of the heuristic, so that a layer with zero curvature (a LoRA adapter at initialisation)
# never divides 0 by 0: a fraction of the model-wide heuristic (0.1 × the mean eigenvalue over all
# layers), and an absolute minimum for a model without any curvature, far below measured λ values
# yet large enough that a float32 gradient divided by it stays finite.
RELATIVE_DAMPING_FLOOR = 1e-3
ABSOLUTE_DAMPING_FLOOR = 1e-10
Damping = Union[None, float, Mapping[str, float]]


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


class Factors:
    """A fitted curvature approximation: everything needed to apply ``(G + λI)⁻¹`` per layer.

    ``approximation`` (:mod:`~lightning_influence.engine.approximations`, registered under the name
    ``strategy``) says what the per-layer tensors are and applies them. Built-ins: ``ekfac``: ``q_a``,
    ``q_s``, ``eigenvalues`` (the corrected ``Λ``, ``[d_out, d_in]``); ``kfac``: ``q_a``, ``eig_a``,
    ``q_s``, ``eig_s``; ``diagonal``: ``eigenvalues`` (the diagonal of the Fisher, ``[d_out, d_in]``);
    ``identity``: nothing (plain gradient dot products, damping unused).

    Sharded across processes (``owners`` given: layer -> rank), ``layers`` holds this process's
    layers only, and ``summaries`` the ``(mean, count, min)`` of every other layer's eigenvalues:
    all the damping heuristic needs of them.
    """

    def __init__(self, strategy: Union[str, CurvatureApproximation], layers: Dict[str, Dict[str, Tensor]],
                 meta: Optional[Dict[str, Any]] = None, owners: Optional[Dict[str, int]] = None,
                 summaries: Optional[Mapping[str, Sequence[float]]] = None) -> None:
        self.approximation = approximation(strategy)
        self.strategy = self.approximation.name
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
        return self.approximation.has_eigenbasis

    def eigenbasis(self, name: str) -> Tuple[Tensor, Tensor]:
        """``(q_s, q_a)``: the layer's eigenbasis, ``ΔW = q_s ΔW̃ q_aᵀ`` (K-FAC, EK-FAC only)."""
        return eigenbasis(self.layers[name])

    def eigenvalues(self, name: str) -> Optional[Tensor]:
        """The strategy's own eigenvalues of the layer's curvature block, ``[d_out, d_in]``."""
        return self.approximation.eigenvalues(self.layers[name])

    def eigenvalue_summary(self, name: str) -> Tuple[float, int, float]:
        """Mean, number and minimum of the layer's eigenvalues (held here, or summarised by its owner)."""
        if name not in self.layers:
            return self.summaries[name]
        mean, count = self._eigenvalue_mean(name)
        return mean, count, self.approximation.smallest_eigenvalue(self.layers[name])

    def _eigenvalue_mean(self, name: str) -> Tuple[float, int]:
        """Mean and number of the layer's eigenvalues (K-FAC: of the outer product, without forming it)."""
        if name not in self.layers:
            return tuple(self.summaries[name][:2])
        return self.approximation.eigenvalue_mean(self.layers[name])

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
        if self.approximation.has_curvature:
            singular = [name for name, value in lambdas.items()
                        if value == 0 and self.eigenvalue_summary(name)[2] <= 0]
            if singular:
                raise ValueError(f"damping 0 on layers {singular[:5]}, whose curvature has a zero eigenvalue, "
                                 "has no inverse; pass damping=None (the heuristic) or a positive damping")
        return lambdas

    def _heuristic_damping(self) -> Dict[str, float]:
        """0.1 × each layer's mean eigenvalue, with the floors (see :meth:`damping_per_layer`)."""
        if not self.approximation.has_curvature:
            return {name: 0.0 for name in self.layer_names}
        means = {name: self._eigenvalue_mean(name) for name in self.layer_names}
        total = sum(mean * count for mean, count in means.values())
        count = sum(count for _, count in means.values())
        floor = max(RELATIVE_DAMPING_FLOOR * DEFAULT_DAMPING_FACTOR * total / max(count, 1), ABSOLUTE_DAMPING_FLOOR)
        return {name: max(DEFAULT_DAMPING_FACTOR * mean, floor) for name, (mean, _) in means.items()}

    def damping(self, name: str, damping: Damping = None) -> float:
        """λ for one layer (see :meth:`damping_per_layer`, which gives every layer's at once)."""
        return self.damping_per_layer(damping)[name]

    def precondition(self, name: str, grads: Tensor, damping: float) -> Tensor:
        """``(G_ℓ + λ I)⁻¹`` applied to layer gradients ``[N, d_out, d_in]`` (float64 inside, dtype kept)."""
        return self.approximation.precondition(self.layers[name], grads, damping)

    def precondition_in_eigenbasis(self, name: str, rotated: Tensor, damping: float, in_place: bool = False) -> Tensor:
        """Preconditioning of gradients given in the eigenbasis (see :meth:`example_gradients_in_eigenbasis`),
        result also in the eigenbasis and in ``rotated``'s dtype (float32 overflow shows as inf): for
        callers that truncate before rotating back. ``in_place`` divides ``rotated`` itself (a fresh
        [N, d_out, d_in] result costs more in page faults than the division: 8x on 64 MiB)."""
        return self.approximation.precondition_in_eigenbasis(self.layers[name], rotated, damping, in_place)

    def rotate_to_eigenbasis(self, name: str, grads: Tensor) -> Tensor:
        """``q_sᵀ ΔW q_a`` for ``grads [N, d_out, d_in]``."""
        return rotate_to_eigenbasis(self.layers[name], grads)

    def rotate_from_eigenbasis(self, name: str, rotated: Tensor, output_side: bool = True,
                               input_side: bool = True) -> Tensor:
        """``q_s ΔW̃ q_aᵀ``: back to the layer's own coordinates (only on the output / input side
        where the other flag is ``False``). A batch stored transposed (see
        :func:`~lightning_influence.engine.example_gradients.stored_transposed`) is rotated in that
        orientation and returned stored transposed."""
        return rotate_from_eigenbasis(self.layers[name], rotated, output_side, input_side)

    def example_gradients_in_eigenbasis(self, name: str, acts: Tensor, grads: Tensor,
                                        dtype: torch.dtype = torch.float64, transposed: bool = False) -> Tensor:
        """``q_sᵀ (Σ_t g_t a_tᵀ) q_a`` per example, in ``dtype``, for ``acts [N,T,d_in]``, ``grads [N,T,d_out]``;
        with ``transposed``, stored transposed where tokens are rotated.

        Rotating the ``T`` token vectors first costs ``T·d²`` per example instead of the ``d³`` of
        rotating the formed gradient: much cheaper whenever ``T`` is small (one token: ``d²``)."""
        return example_gradients_in_eigenbasis(self.layers[name], acts, grads, dtype, transposed)

    def tokens_in_eigenbasis(self, name: str, acts: Tensor, grads: Tensor, dtype: torch.dtype) -> Tuple[Tensor, Tensor]:
        """``(acts q_a, grads q_s)`` in ``dtype``: token vectors whose per-example gradients are in the eigenbasis."""
        return tokens_in_eigenbasis(self.layers[name], acts, grads, dtype)

    def rotates_tokens(self, name: str, tokens: int) -> bool:
        """Whether rotating ``tokens`` token vectors into the eigenbasis costs less than rotating
        the formed per-example gradient."""
        return rotates_tokens(self.layers[name], tokens)

    def example_quadratic_form(self, name: str, acts: Tensor, grads: Tensor, damping: float) -> Tensor:
        """``vec(ΔW_n)ᵀ (G_ℓ + λ I)⁻¹ vec(ΔW_n)`` for each example's gradient ``ΔW_n = Σ_t g_t a_tᵀ``,
        from its activations ``[N,T,d_in]`` and output gradients ``[N,T,d_out]`` -> ``[N]`` float64: the rotation in
        the inputs' dtype (tokens first when cheaper), sums in float64 (on the CPU, of float32 blocks of
        squares divided by the eigenvalues: :func:`~lightning_influence.engine.example_gradients.example_gradient_blocks`).
        Self-influence then costs about one product per token instead of two float64 ``d³`` rotations per example."""
        return self.approximation.quadratic_form(self.layers[name], acts, grads, damping)

    def to(self, device: Union[str, torch.device]) -> "Factors":
        layers = _shared_map(self.layers, lambda key, value: value.to(device))
        return Factors(self.approximation, layers, self.meta, self.owners, self.summaries)

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
    kind = approximation(meta.get("strategy"))
    if shard and distributed.world_size() > 1 and kind.can_shard:
        return _load_owned(path, meta, files, device)
    flat: Dict[str, Tensor] = {}
    for file in files:
        flat.update(load_tensors(f"{path}/{file}", device=device))
    state = _flat_to_state({k: v for k, v in flat.items() if k != "_empty"})
    if kind.has_curvature and sorted(state) != sorted(names):
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

