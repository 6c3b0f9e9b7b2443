"""Curvature approximations: one registered class each, declaring what fitting it needs and how it
preconditions.

A :class:`CurvatureApproximation` says which passes its factors are built from
(``needs_covariances``: the covariances ``A``, ``S`` and their eigenbases; ``needs_correction_pass``:
squared per-example gradients, in that eigenbasis if there is one, else in the layer's
coordinates), whether its preconditioner is diagonal in a Kronecker eigenbasis (``has_eigenbasis``:
scoring then rotates into it and divides), whether its layers may be spread over processes
(``can_shard``) and whether it has any curvature at all (``has_curvature``: no damping, no tensors).
Its methods turn one layer's statistics into the tensors it keeps (:meth:`~CurvatureApproximation.layer_factors`)
and apply ``(G_ℓ + λ I)⁻¹`` from them. :class:`~lightning_influence.engine.factors.Factors` holds one,
and everything else asks it instead of comparing strategy names.

Built-ins: ``ekfac``, ``kfac``, ``diagonal``, ``identity``. A new one is a subclass registered with
:func:`register_approximation`; its name is then a ``strategy`` everywhere (``fit_factors``, the
callback's settings, saved factors).
"""

from __future__ import annotations

from typing import ClassVar, Dict, Mapping, Optional, Tuple, Type, Union

import torch
from torch import Tensor

from lightning_influence.engine.example_gradients import (
    blockwise,
    chunk_ranges,
    example_gradient_blocks,
    left_multiply,
    per_example_gradients,
    stored_transposed,
)
from lightning_influence.engine.tracking import TrackedLayer

LayerFactors = Dict[str, Tensor]


class CurvatureApproximation:
    """How one strategy approximates a layer's curvature block ``G_ℓ`` and applies ``(G_ℓ + λ I)⁻¹``.

    The default methods serve a preconditioner that is diagonal in some basis: the Kronecker
    eigenbasis ``q_s ⊗ q_a`` (``has_eigenbasis``: the layer's tensors hold ``q_s`` and ``q_a``) or
    the layer's own coordinates, with the eigenvalues :meth:`eigenvalues` gives (``[d_out, d_in]``;
    by default the tensor ``"eigenvalues"``). Other preconditioners override :meth:`precondition`
    and :meth:`quadratic_form`.
    """

    name: ClassVar[str] = ""
    needs_covariances: ClassVar[bool] = False
    needs_correction_pass: ClassVar[bool] = False
    has_eigenbasis: ClassVar[bool] = False
    can_shard: ClassVar[bool] = False
    has_curvature: ClassVar[bool] = True

    # -- fitting --------------------------------------------------------------------------------
    def layer_factors(self, layer: TrackedLayer, basis: Optional[Mapping[str, Tensor]],
                      corrected: Optional[Tensor]) -> LayerFactors:
        """The tensors kept for ``layer`` (saved by name; shapes as the layer's): from ``basis``, the
        eigendecomposition ``q_a, eig_a, q_s, eig_s`` of its covariances (with ``needs_covariances``),
        and ``corrected``, the mean squared per-example gradients ``[d_out, d_in]`` in that basis or
        in the layer's coordinates (with ``needs_correction_pass``)."""
        raise NotImplementedError

    def factor_bytes(self, d_out: int, d_in: int, eigenbasis_bytes: int) -> Tuple[int, int]:
        """Bytes of what :meth:`layer_factors` keeps for a ``[d_out, d_in]`` layer, as ``(input side,
        the layer's own)``: the input side (``q_a``) is what layers reading one input share (the
        memory planner counts it once). Default: the bases with ``needs_covariances``, float64
        ``[d_out, d_in]`` eigenvalues with ``needs_correction_pass``."""
        basis = eigenbasis_bytes if self.needs_covariances else 0
        return d_in * d_in * basis, d_out * d_out * basis + (d_out * d_in * 8 if self.needs_correction_pass else 0)

    # -- eigenvalues and damping ----------------------------------------------------------------
    def eigenvalues(self, parts: LayerFactors) -> Optional[Tensor]:
        """The approximation's own eigenvalues of the layer's curvature block, ``[d_out, d_in]``."""
        return parts.get("eigenvalues")

    def eigenvalue_mean(self, parts: LayerFactors) -> Tuple[float, int]:
        """Mean and number of the layer's eigenvalues (what the damping heuristic needs)."""
        return float(parts["eigenvalues"].mean()), parts["eigenvalues"].numel()

    def smallest_eigenvalue(self, parts: LayerFactors) -> float:
        return float(parts["eigenvalues"].min())

    def damped_eigenvalues(self, parts: LayerFactors, damping: float, device: torch.device) -> Optional[Tensor]:
        eigenvalues = self.eigenvalues(parts)
        return None if eigenvalues is None else (eigenvalues + damping).to(device)

    # -- preconditioning ------------------------------------------------------------------------
    def precondition(self, parts: LayerFactors, grads: Tensor, damping: float) -> Tensor:
        """``(G_ℓ + λ I)⁻¹`` applied to layer gradients ``[N, d_out, d_in]`` (float64 inside, dtype kept)."""
        if self.has_eigenbasis:
            rotated = self.precondition_in_eigenbasis(parts, rotate_to_eigenbasis(parts, grads.double()), damping,
                                                      in_place=True)
            return rotate_from_eigenbasis(parts, rotated).to(grads.dtype)
        return (grads.double() / self.damped_eigenvalues(parts, damping, grads.device)).to(grads.dtype)

    def precondition_in_eigenbasis(self, parts: LayerFactors, rotated: Tensor, damping: float,
                                   in_place: bool = False) -> Tensor:
        """Preconditioning of gradients given in the eigenbasis, result in the eigenbasis and in
        ``rotated``'s dtype (see :meth:`~lightning_influence.engine.factors.Factors.precondition_in_eigenbasis`)."""
        damped = self.damped_eigenvalues(parts, damping, rotated.device).to(rotated.dtype)
        if in_place and stored_transposed(rotated):  # divide in the storage's order (strided: 6x slower)
            rotated.transpose(1, 2).div_(damped.T.contiguous())
            return rotated
        return rotated.div_(damped) if in_place else rotated / damped

    def quadratic_form(self, parts: LayerFactors, acts: Tensor, grads: Tensor, damping: float) -> Tensor:
        """``vec(ΔW_n)ᵀ (G_ℓ + λ I)⁻¹ vec(ΔW_n)`` per example ``[N]`` float64 (see
        :meth:`~lightning_influence.engine.factors.Factors.example_quadratic_form`)."""
        out = torch.zeros(acts.shape[0], dtype=torch.float64, device=acts.device)
        damped = self.damped_eigenvalues(parts, damping, acts.device)
        rotates_matrices = self.has_eigenbasis and not rotates_tokens(parts, acts.shape[1])
        if self.has_eigenbasis and not rotates_matrices:  # from here on, per-example gradients are in the eigenbasis
            acts, grads = tokens_in_eigenbasis(parts, acts, grads, acts.dtype)
        if blockwise(acts, grads) and not rotates_matrices:
            inverse = None if damped is None else damped.reciprocal().to(acts.dtype)
            for example, rows, block in example_gradient_blocks(acts, grads):
                squares = block.square_() if inverse is None else block.square_().mul_(inverse[rows])
                out[example] += squares.sum(dtype=torch.float64)
            return out
        for start, stop in chunk_ranges(acts.shape[0], grads.shape[-1] * acts.shape[-1]):
            if rotates_matrices:
                example = example_gradients_in_eigenbasis(parts, acts[start:stop], grads[start:stop], acts.dtype)
            else:
                example = per_example_gradients(acts[start:stop], grads[start:stop])
            squares = example.double().square()
            out[start:stop] = (squares if damped is None else squares / damped).sum((1, 2))
        return out

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


# -- the Kronecker eigenbasis (layers of approximations with ``has_eigenbasis``) -------------------
def eigenbasis(parts: LayerFactors) -> Tuple[Tensor, Tensor]:
    """``(q_s, q_a)``: the layer's eigenbasis, ``ΔW = q_s ΔW̃ q_aᵀ``."""
    return parts["q_s"], parts["q_a"]


def rotate_to_eigenbasis(parts: LayerFactors, grads: Tensor) -> Tensor:
    """``q_sᵀ ΔW q_a`` for ``grads [N, d_out, d_in]``."""
    q_s, q_a = (basis.to(grads) for basis in eigenbasis(parts))
    return left_multiply(q_s.T, grads @ q_a)


def rotate_from_eigenbasis(parts: LayerFactors, rotated: Tensor, output_side: bool = True,
                           input_side: bool = True) -> Tensor:
    """``q_s ΔW̃ q_aᵀ`` (only on the output / input side where the other flag is ``False``); a batch
    stored transposed (see :func:`~lightning_influence.engine.example_gradients.stored_transposed`) is
    rotated in that orientation and returned stored transposed."""
    q_s, q_a = (basis.to(rotated) for basis in eigenbasis(parts))
    if stored_transposed(rotated):
        # (q_s ΔW̃ q_aᵀ)ᵀ = q_a (ΔW̃ᵀ q_sᵀ): one [N·d_in, d_out] x [d_out, d_out] product and a batched one,
        # no transposing copy (1.1-1.3x faster than the other orientation on GPT layers, one CPU thread).
        flipped = rotated.transpose(1, 2)
        flipped = flipped @ q_s.T if output_side else flipped
        return (torch.matmul(q_a, flipped) if input_side else flipped).transpose(1, 2)
    rotated = rotated @ q_a.T if input_side else rotated
    return left_multiply(q_s, rotated) if output_side else rotated


def example_gradients_in_eigenbasis(parts: LayerFactors, acts: Tensor, grads: Tensor,
                                    dtype: torch.dtype = torch.float64, transposed: bool = False) -> Tensor:
    """``q_sᵀ (Σ_t g_t a_tᵀ) q_a`` per example, in ``dtype`` (tokens rotated first where cheaper)."""
    if rotates_tokens(parts, acts.shape[1]):
        acts, grads = tokens_in_eigenbasis(parts, acts, grads, dtype)
        return per_example_gradients(grads, acts).transpose(1, 2) if transposed else per_example_gradients(acts, grads)
    q_s, q_a = (basis.to(acts.device, dtype) for basis in eigenbasis(parts))
    return left_multiply(q_s.T, per_example_gradients(acts, grads).to(dtype) @ q_a)


def tokens_in_eigenbasis(parts: LayerFactors, acts: Tensor, grads: Tensor, dtype: torch.dtype) -> Tuple[Tensor, Tensor]:
    """``(acts q_a, grads q_s)`` in ``dtype``: token vectors whose per-example gradients are in the eigenbasis."""
    q_s, q_a = (basis.to(acts.device, dtype) for basis in eigenbasis(parts))
    return acts.to(dtype) @ q_a, grads.to(dtype) @ q_s


def rotates_tokens(parts: LayerFactors, tokens: int) -> bool:
    """Whether rotating ``tokens`` token vectors into the eigenbasis costs less than rotating the
    formed per-example gradient."""
    q_s, q_a = eigenbasis(parts)
    d_out, d_in = q_s.shape[0], q_a.shape[0]
    return tokens * (d_out ** 2 + d_in ** 2 + d_out * d_in) < d_out * d_in * (d_out + d_in)


# -- the registry ----------------------------------------------------------------------------------
_REGISTRY: Dict[str, CurvatureApproximation] = {}


def register_approximation(cls: Type[CurvatureApproximation]) -> Type[CurvatureApproximation]:
    """Make ``cls`` (a :class:`CurvatureApproximation` subclass with a ``name``) a strategy; usable
    as a class decorator. Registering a name again replaces the earlier class."""
    if not (isinstance(cls, type) and issubclass(cls, CurvatureApproximation)) or not cls.name:
        raise TypeError(f"{cls!r} is not a CurvatureApproximation subclass with a name")
    _REGISTRY[cls.name] = cls()
    return cls


def unregister_approximation(name: str) -> None:
    """Remove a registered strategy (for tests and plugins that register one for a while)."""
    _REGISTRY.pop(name, None)


def approximation(strategy: Union[str, CurvatureApproximation]) -> CurvatureApproximation:
    """The registered approximation called ``strategy`` (an approximation is returned as it is)."""
    if isinstance(strategy, CurvatureApproximation):
        return strategy
    found = _REGISTRY.get(strategy) if isinstance(strategy, str) else None
    if found is None:
        raise ValueError(f"unknown strategy {strategy!r}; choose one of {', '.join(approximation_names())}")
    return found


def approximation_names() -> Tuple[str, ...]:
    """The registered strategies' names, the built-ins first."""
    return tuple(_REGISTRY)


# -- the built-ins ---------------------------------------------------------------------------------
@register_approximation
class EKFAC(CurvatureApproximation):
    """EK-FAC: the K-FAC eigenbasis with eigenvalues corrected to the mean squared per-example
    gradients in it (``q_a``, ``q_s``, ``eigenvalues`` ``[d_out, d_in]``)."""

    name = "ekfac"
    needs_covariances = True
    needs_correction_pass = True
    has_eigenbasis = True
    can_shard = True

    def layer_factors(self, layer, basis, corrected):
        return {"q_a": basis["q_a"], "q_s": basis["q_s"], "eigenvalues": corrected}


@register_approximation
class KFAC(CurvatureApproximation):
    """K-FAC: ``A ⊗ S`` in its eigenbasis (``q_a``, ``eig_a``, ``q_s``, ``eig_s``); damping is added
    to the products of the factor eigenvalues, never as ``(A+√λ)⊗(S+√λ)``."""

    name = "kfac"
    needs_covariances = True
    has_eigenbasis = True
    can_shard = True

    def layer_factors(self, layer, basis, corrected):
        return dict(basis)

    def eigenvalues(self, parts):
        return torch.outer(parts["eig_s"], parts["eig_a"])

    def eigenvalue_mean(self, parts):  # of the outer product, without forming it
        return float(parts["eig_s"].mean() * parts["eig_a"].mean()), parts["eig_s"].numel() * parts["eig_a"].numel()

    def smallest_eigenvalue(self, parts):
        return float(parts["eig_s"].min() * parts["eig_a"].min())

    def factor_bytes(self, d_out, d_in, eigenbasis_bytes):  # the bases and both factors' float64 eigenvalues
        return d_in * d_in * eigenbasis_bytes + d_in * 8, d_out * d_out * eigenbasis_bytes + d_out * 8


@register_approximation
class Diagonal(CurvatureApproximation):
    """The diagonal of the Fisher, ``eigenvalues`` ``[d_out, d_in]``: mean squared per-example gradients."""

    name = "diagonal"
    needs_correction_pass = True

    def layer_factors(self, layer, basis, corrected):
        return {"eigenvalues": corrected}


@register_approximation
class Identity(CurvatureApproximation):
    """No curvature: plain gradient dot products (no tensors, damping unused)."""

    name = "identity"
    has_curvature = False

    def layer_factors(self, layer, basis, corrected):
        return {}

    def precondition(self, parts, grads, damping):
        return grads
