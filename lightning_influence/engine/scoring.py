"""Pairwise influence scores: precondition the query gradients once, then stream training batches.

For training example ``z`` and query ``q``: ``score = -∇f(q)ᵀ (G + λI)⁻¹ ∇ℓ(z)`` for the query
measurement ``f`` (by default its log-likelihood, so ``∇ℓ(q)ᵀ (G + λI)⁻¹ ∇ℓ(z)``: positive means
``z`` helps ``q``), with ``ℓ(z)`` the example's token-summed loss and ``G`` the curvature averaged
per training example, computed per layer (block-diagonal ``G``) and summed. Per layer the
contraction of dense queries with a batch of training examples is done whichever way costs fewer
FLOPs: materialising per-example gradients ``ΔW_n = Σ_t g_t a_tᵀ`` and taking one matrix product
with all preconditioned queries, or contracting activations and output gradients directly — the
only way that yields per-token scores. Rank-r queries are always contracted directly, so that they
are never held dense.
"""

from __future__ import annotations

import math
import time
import warnings
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from lightning_influence.engine import passes
from lightning_influence.engine.factors import (CHUNK_ELEMENTS, Damping, Factors, blockwise, chunk_ranges, fit_factors,
                                         left_multiply, per_example_gradients, stored_transposed)
from lightning_influence.results import InfluenceResult
from lightning_influence.analysis.sketch import ScoreSketch
from lightning_influence.tasks import Task
from lightning_influence.engine.tracking import LayerTracker, TrackedLayer, layers_by_name


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
# of the exact truncation (tests/test_query_memory.py). Below ~5e-7 the float32 estimate is noise.
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


BATCH_BLOCK_ELEMENTS = 2**21  # per-example gradient rows of a whole batch, 8 MiB in float32 (see _contract_row_blocks)


def _cost_materialised(batch: int, tokens: int, d_out: int, d_in: int, queries: int) -> int:
    return batch * d_out * d_in * (tokens + queries)


def _cost_direct(batch: int, tokens: int, d_out: int, d_in: int, queries: int) -> int:
    return batch * tokens * queries * d_in * (d_out + 1)


def contract(queries: PreconditionedQueries, layer: TrackedLayer, acts: Tensor, grads: Tensor,
             per_token: bool) -> Tensor:
    """One layer's scores for a batch: ``[Q, B]``, or ``[Q, B, T]`` with ``per_token``."""
    acts, grads = queries.in_query_basis(layer.name, acts, grads)
    batch, tokens, d_out = grads.shape
    d_in = acts.shape[-1]
    n_query = queries.num_queries
    low_rank = queries.low_rank.get(layer.name)
    rank = low_rank[0].shape[-1] if low_rank is not None else None
    # Low-rank queries are contracted directly: materialising them would take the dense memory
    # the truncation exists to avoid.
    direct = per_token or low_rank is not None or _cost_direct(batch, tokens, d_out, d_in, n_query) <= \
        _cost_materialised(batch, tokens, d_out, d_in, n_query)
    if not direct:
        rows = queries.layout(layer.name, "rows", grads.dtype)
        if queries.rows_transposed(layer.name):  # rows over [d_in, d_out]: per-example gradients transposed alike
            acts, grads = grads, acts
        if blockwise(acts, grads):
            return _contract_row_blocks(rows, acts, grads)
        return rows @ per_example_gradients(acts, grads).flatten(1).T
    flat_grads = grads.reshape(batch * tokens, d_out)
    flat_acts = acts.reshape(batch * tokens, d_in)
    width = (rank if rank is not None else d_in)
    step = max(1, CHUNK_ELEMENTS // max(1, batch * tokens * width))
    chunks = []
    for start in range(0, n_query, step):
        stop = min(n_query, start + step)
        columns = slice(start * width, stop * width)
        if low_rank is not None:
            # [BT, d_out] @ [d_out, q*r] and [BT, d_in] @ [d_in, q*r]: two GEMMs, then sum over r.
            projected_g = flat_grads @ queries.layout(layer.name, "left", grads.dtype)[:, columns]
            projected_a = flat_acts @ queries.layout(layer.name, "right", grads.dtype)[:, columns]
            token_scores = (projected_g * projected_a).view(batch, tokens, stop - start, -1).sum(-1)
        else:
            projected = flat_grads @ queries.layout(layer.name, "columns", grads.dtype)[:, columns]  # [BT, q*d_in]
            token_scores = (projected.view(batch * tokens, stop - start, d_in) * flat_acts.unsqueeze(1)).sum(-1)
            token_scores = token_scores.view(batch, tokens, stop - start)
        chunks.append(token_scores.permute(2, 0, 1))
    token_scores = torch.cat(chunks, 0)  # [Q, B, T]
    return token_scores if per_token else token_scores.sum(-1)


def _contract_row_blocks(query_rows: Tensor, acts: Tensor, grads: Tensor) -> Tensor:
    """``query_rows [Q, d_out·d_in]`` times the batch's per-example gradients, ``[Q, B]``, the gradients
    formed ``BATCH_BLOCK_ELEMENTS`` at a time (a block of rows for every example) and contracted while
    they are still in cache: 1.2-1.5x faster on the CPU than forming them all first (GPT layers, 16
    examples of 64 tokens, 32 queries)."""
    batch, _, d_in = acts.shape
    step = max(1, BATCH_BLOCK_ELEMENTS // (batch * d_in))
    grads_by_row = grads.transpose(1, 2)
    scores = query_rows.new_zeros(batch, query_rows.shape[0])
    for start in range(0, grads.shape[-1], step):
        stop = min(grads.shape[-1], start + step)
        block = torch.bmm(grads_by_row[:, start:stop], acts)  # [B, rows, d_in]
        scores.addmm_(block.view(batch, -1), query_rows[:, start * d_in:stop * d_in].T)
    return scores.T


def contract_token_pairs(queries: PreconditionedQueries, layer: TrackedLayer, acts: Tensor, grads: Tensor,
                         pairs: Tensor) -> Tensor:
    """One layer's token scores ``[Q, B, T]`` for the query-example pairs marked in ``pairs [Q, B]``
    only, zeros elsewhere: each query's examples through that query's preconditioned gradient alone."""
    acts, grads = queries.in_query_basis(layer.name, acts, grads)
    batch, tokens, _ = grads.shape
    scores = grads.new_zeros(queries.num_queries, batch, tokens)
    low_rank = queries.low_rank.get(layer.name)
    for query in pairs.any(1).nonzero().flatten().tolist():
        rows = pairs[query].nonzero().flatten()
        picked_grads, picked_acts = grads[rows], acts[rows]
        if low_rank is not None:
            left, right = (factor[query].to(grads.dtype) for factor in low_rank)
            scores[query, rows] = ((picked_grads @ left) * (picked_acts @ right)).sum(-1)
        else:
            scores[query, rows] = ((picked_grads @ queries.dense[layer.name][query].to(grads.dtype))
                                   * picked_acts).sum(-1)
    return scores


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
    :func:`~lightning_influence.engine.factors.stored_transposed`); a single chunk as it is (no copy)."""
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


@passes.outside_inference_mode
def compute_influence(model: nn.Module, task: Task, train_data: Any, query_data: Any,
                      factors: Optional[Factors] = None, damping: Damping = None, *,
                      per_layer: bool = False, per_token: bool = False, query_rank: Optional[int] = None,
                      query_truncation: str = "randomized", layer_sums: bool = False, self_influence: bool = False,
                      keep_top: Optional[int] = None, batch_size: int = 32,
                      train_ids: Optional[Tensor] = None, query_ids: Optional[Tensor] = None,
                      prepared_queries: Optional[Tuple[PreconditionedQueries, Tensor]] = None,
                      token_pairs: Optional[Tensor] = None, show_progress: bool = False) -> InfluenceResult:
    """Influence of every training example on every query.

    Args:
        model: the model whose weights the scores describe.
        task: per-example loss and query measurement.
        train_data: candidate pool (Dataset or DataLoader with a deterministic order).
        query_data: queries (Dataset or DataLoader).
        factors: from :func:`fit_factors` (default: fitted now on ``train_data`` with EK-FAC).
        damping: ``None`` for the per-layer heuristic 0.1 × mean eigenvalue (with a floor, see
            :meth:`Factors.damping_per_layer`), a float for an absolute λ, or a dict ``{layer: λ}``.
        per_layer: also return ``layer_scores [L, Q, N]`` (they sum to ``scores``).
        layer_sums: also return ``layer_abs_sums [L, Q]`` (float64), each layer's ``Σ_n |score|``
            over the examples with finite scores: the layer distribution of every query in ``L·Q``
            memory instead of ``L·Q·N`` (see :func:`~lightning_influence.analysis.layer_shares`).
        per_token: also return ``token_scores [Q, N, T]`` (they sum to ``scores``); memory grows
            with ``Q·N·T``: use on small pools or subsets.
        token_pairs: with ``per_token``, a ``[Q, N]`` mask (examples in the order they are read) of
            the query-example pairs whose scores are wanted (token, layer and total scores); the
            others are zero. Each pair costs ``T·d_out·d_in`` per layer instead of every query on
            every example's tokens, and no other pair is scored.
        query_rank: replace each preconditioned query gradient by its rank-r truncated SVD.
        query_truncation: how ``query_rank`` truncates: ``"randomized"`` (default; float32
            rotations and subspace iteration, within 1e-3 of the exact truncation's scores — see
            :func:`randomized_truncate`) or ``"exact"`` (float64 rotations and eigensolver); see
            :func:`precondition_queries`.
        self_influence: also return ``self_scores [N]`` (each training example on itself).
        keep_top: keep no ``scores [Q, N]``: per query only the ``keep_top`` most positive and most
            negative scores with their train ids, exact moments and a histogram of the rest (a
            :class:`~lightning_influence.analysis.sketch.ScoreSketch`, stored as its result fields), so that
            memory does not grow with ``Q·N``. Not with ``per_layer`` or ``per_token``.
        batch_size: batch size for Datasets.
        train_ids, query_ids: dataset indices to record (default ``0..N-1``); ``train_ids`` is
            read after the pass, so a list that fills while ``train_data`` is read (the ids of a
            streaming pool, see :class:`~lightning_influence.checkpoint.pool.PoolStream`) works too.
        prepared_queries: what :func:`precondition_queries` returned for these factors, damping
            and rank, to score another part of the pool without preparing the queries again
            (``query_data`` is then not read).
        show_progress: show progress bars.

    A training example or query whose gradients (or scores) are not finite gets NaN scores
    everywhere (``scores``, ``layer_scores``, ``token_scores``, ``self_scores``), is named in a
    warning and in ``meta["nonfinite_train_ids"]`` / ``meta["nonfinite_query_ids"]``, and is never
    ranked by :meth:`InfluenceResult.top_k`. Finite inputs always give finite scores.
    """
    if query_rank is not None and query_rank < 1:
        raise ValueError(f"query_rank must be a positive integer or None, got {query_rank}")
    if keep_top is not None and (per_layer or per_token):
        raise ValueError("keep_top keeps no dense scores, so it cannot return per_layer or per_token scores "
                         "over the whole pool; score a subset with keep_top=None for those")
    timings: Dict[str, float] = {}
    started = time.perf_counter()
    if factors is None:
        factors = fit_factors(model, task, train_data, batch_size=batch_size, show_progress=show_progress)
        timings["fit_factors"] = time.perf_counter() - started
    if factors.is_sharded and (prepared_queries is None or self_influence):
        raise ValueError("these factors are sharded across processes (each holds some layers): score them with "
                         "InfluenceSession(curvature={'shard_factors': True}), or load them whole with load_factors(path)")
    layers = layers_by_name(model, factors.layer_names)
    lambdas = factors.damping_per_layer(damping)
    device = passes.model_device(model)
    factors = factors.to(device)

    stage = time.perf_counter()
    queries, bad_queries = prepared_queries or precondition_queries(
        model, task, query_data, factors, layers, lambdas, query_rank, batch_size, show_progress, query_truncation,
        pool_examples=passes.example_count(train_data))
    timings["queries"] = time.perf_counter() - stage

    stage = time.perf_counter()
    layer_chunks: List[Tensor] = []
    token_chunks: List[Tensor] = []
    mask_chunks: List[Tensor] = []
    self_chunks: List[Tensor] = []
    abs_sums = torch.zeros(len(layers), queries.num_queries, dtype=torch.float64)
    sketch = ScoreSketch(queries.num_queries, keep_top) if keep_top is not None else None
    bad_train_chunks: List[Tensor] = []  # with a sketch: which examples were marked non-finite
    seen = 0
    tracker = LayerTracker(layers)
    with passes.evaluation_mode(model), tracker:
        for batch, acts, grads in _example_gradient_batches(model, task, train_data, tracker, batch_size, False,
                                                            "influence", show_progress):
            with torch.no_grad():
                if per_token:
                    _check_token_axes(layers, acts)
                if per_token and token_pairs is not None:
                    pairs = token_pairs[:, seen:seen + acts[0].shape[0]].to(acts[0].device)
                    per_layer_scores = [contract_token_pairs(queries, layer, act, grad, pairs)
                                        for layer, act, grad in zip(layers, acts, grads)]
                else:
                    per_layer_scores = [contract(queries, layer, act, grad, per_token)
                                        for layer, act, grad in zip(layers, acts, grads)]
                if per_token:  # per_layer_scores are [Q, B, T]: keep their sum over layers, then sum tokens
                    token_chunks.append(torch.stack(per_layer_scores).sum(0).float().cpu())
                    per_layer_scores = [s.sum(-1) for s in per_layer_scores]
                    mask = task.token_mask(batch)
                    mask_chunks.append((mask.bool() if mask is not None else torch.ones(acts[0].shape[:2], dtype=torch.bool)).cpu())
                stacked = torch.stack(per_layer_scores).float().cpu()
                total = stacked.double().sum(0).float()
                if self_influence:
                    self_chunks.append(_self_scores(factors, layers, acts, grads, lambdas))
                if sketch is not None:
                    fields = {"scores": total, **({"self_scores": self_chunks[-1]} if self_influence else {})}
                    bad_train_chunks.append(_mark_nonfinite(fields, bad_queries.cpu()))
                    if self_influence:
                        self_chunks[-1] = fields["self_scores"]
                    sketch.update(fields["scores"], torch.arange(seen, seen + total.shape[1]))
                else:
                    # Without per-layer scores keep only their sum: memory then grows with the score
                    # matrix alone, not with the number of layers times it.
                    layer_chunks.append(stacked if per_layer else total.unsqueeze(0))
                seen += total.shape[1]
                if layer_sums:
                    usable = torch.isfinite(total[~bad_queries.cpu()]).all(0)  # as _mark_nonfinite decides
                    if self_influence:
                        usable &= torch.isfinite(self_chunks[-1])
                    abs_sums += stacked[:, :, usable].double().abs().sum(2)
    timings["train"] = time.perf_counter() - stage
    if not layer_chunks:  # a process whose share of the pool is empty: it ran only Lockstep fillers
        layer_chunks.append(torch.zeros(len(layers) if per_layer else 1, queries.num_queries, 0))
        self_chunks.append(torch.zeros(0))

    n_train, n_query = seen, queries.num_queries
    fields: Dict[str, Tensor] = {}
    if sketch is None:
        layer_scores = torch.cat(layer_chunks, dim=2)  # [L, Q, N], or [1, Q, N] summed over layers
        fields["scores"] = layer_scores.double().sum(0).float() if per_layer else layer_scores[0]
    if per_layer:
        fields["layer_scores"] = layer_scores
    if layer_sums:
        fields["layer_abs_sums"] = abs_sums.masked_fill(bad_queries.cpu().unsqueeze(0), 0.0)
    if per_token:
        fields["token_scores"], fields["token_mask"] = _pad_tokens(token_chunks, mask_chunks)
    if self_influence:
        fields["self_scores"] = torch.cat(self_chunks)
    train_ids = torch.as_tensor(train_ids).long() if train_ids is not None else torch.arange(n_train)
    query_ids = torch.as_tensor(query_ids).long() if query_ids is not None else torch.arange(n_query)
    if sketch is None:
        bad_train = _mark_nonfinite(fields, bad_queries.cpu())
    else:
        bad_train = torch.cat(bad_train_chunks) if bad_train_chunks else torch.zeros(0, dtype=torch.bool)
        sketch.relabel(train_ids)
        fields.update(sketch.fields())
    nonfinite = {"nonfinite_train_ids": train_ids[bad_train].tolist(),
                 "nonfinite_query_ids": query_ids[bad_queries.cpu()].tolist()}
    _warn_nonfinite(nonfinite)
    return InfluenceResult(
        train_ids=train_ids,
        query_ids=query_ids,
        layer_names=[layer.name for layer in layers],
        meta={
            "strategy": factors.strategy,
            "fisher": factors.meta.get("fisher"),
            "damping": lambdas,
            "query_rank": query_rank,
            "query_truncation": query_truncation if query_rank is not None else None,
            "n_train": n_train,
            "n_query": n_query,
            "timings": timings,
            **nonfinite,
        },
        **fields,
    )


def _mark_nonfinite(fields: Dict[str, Tensor], bad_queries: Tensor) -> Tensor:
    """Set NaN, in every score field, the scores of the given queries and of the training examples
    with a non-finite score for some other query (or self-score); returns the latter ``[N]``."""
    good_queries = ~bad_queries
    bad_train = ~torch.isfinite(fields["scores"][good_queries]).all(0)
    if "token_scores" in fields:
        bad_train |= ~torch.isfinite(fields["token_scores"][good_queries]).flatten(2).all(2).all(0)
    if "self_scores" in fields:
        bad_train |= ~torch.isfinite(fields["self_scores"])
    if bool(bad_train.any()) or bool(bad_queries.any()):
        for name, train_axis in (("scores", 1), ("layer_scores", 2), ("token_scores", 1), ("self_scores", 0)):
            if name in fields:
                field = fields[name].clone()
                field.index_fill_(train_axis, torch.nonzero(bad_train).flatten(), math.nan)
                if name != "self_scores":
                    field.index_fill_(train_axis - 1, torch.nonzero(bad_queries).flatten(), math.nan)
                fields[name] = field
    return bad_train


def _warn_nonfinite(nonfinite: Dict[str, List[int]]) -> None:
    for key, what in (("nonfinite_train_ids", "training example(s)"), ("nonfinite_query_ids", "query(ies)")):
        ids = nonfinite[key]
        if ids:
            listing = ", ".join(map(str, ids[:20])) + (", ..." if len(ids) > 20 else "")
            warnings.warn(f"{len(ids)} {what} with non-finite gradients or scores (NaN/inf input, or overflow): "
                          f"their scores are set to NaN and never ranked; ids [{listing}]")


@passes.outside_inference_mode
def compute_self_influence(model: nn.Module, task: Task, data: Any, factors: Factors, damping: Damping = None,
                           batch_size: int = 32, show_progress: bool = False) -> Tensor:
    """``∇ℓ(z)ᵀ (G + λI)⁻¹ ∇ℓ(z)`` for every example of ``data`` -> ``[N]`` (e.g. to find mislabelled
    examples: they need an unusually large step to be fitted). A non-finite value becomes NaN, with a
    warning naming the example's position in ``data``."""
    layers = layers_by_name(model, factors.layer_names)
    lambdas = factors.damping_per_layer(damping)
    factors = factors.to(passes.model_device(model))
    tracker = LayerTracker(layers)
    chunks = []
    with passes.evaluation_mode(model), tracker:
        for _, acts, grads in _example_gradient_batches(model, task, data, tracker, batch_size, False,
                                                        "self-influence", show_progress):
            with torch.no_grad():
                chunks.append(_self_scores(factors, layers, acts, grads, lambdas))
    scores = torch.cat(chunks)
    bad = ~torch.isfinite(scores)
    _warn_nonfinite({"nonfinite_train_ids": torch.nonzero(bad).flatten().tolist(), "nonfinite_query_ids": []})
    return scores.masked_fill(bad, math.nan)


def _self_scores(factors: Factors, layers: Sequence[TrackedLayer], acts: Sequence[Tensor], grads: Sequence[Tensor],
                 lambdas: Dict[str, float]) -> Tensor:
    """Each example of a batch on itself, summed over layers: ``[B]`` float32 on the CPU."""
    return sum(factors.example_quadratic_form(layer.name, act, grad, lambdas[layer.name])
               for layer, act, grad in zip(layers, acts, grads)).float().cpu()


def _check_token_axes(layers: Sequence[TrackedLayer], acts: Sequence[Tensor]) -> None:
    lengths = {layer.name: act.shape[1] for layer, act in zip(layers, acts)}
    if len(set(lengths.values())) > 1:
        raise ValueError(
            "per_token scores need every tracked layer to read the same token positions; token axes "
            f"differ: {lengths}. Track only the sequence layers (layers=...)"
        )


def _pad_tokens(token_chunks: List[Tensor], mask_chunks: List[Tensor]) -> Tuple[Tensor, Tensor]:
    """Concatenate per-batch ``[Q, B, T_b]`` token scores whose lengths may differ (dynamic padding)."""
    length = max(chunk.shape[-1] for chunk in token_chunks)
    scores = torch.cat([torch.nn.functional.pad(c, (0, length - c.shape[-1])) for c in token_chunks], dim=1)
    masks = torch.cat([torch.nn.functional.pad(m, (0, length - m.shape[-1])) for m in mask_chunks], dim=0)
    return scores, masks
