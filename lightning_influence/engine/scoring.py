"""Pairwise influence scores: precondition the query gradients once, then stream training batches.

For training example ``z`` and query ``q``: ``score = -∇f(q)ᵀ (G + λI)⁻¹ ∇ℓ(z)`` for the query
measurement ``f`` (by default its log-likelihood, so ``∇ℓ(q)ᵀ (G + λI)⁻¹ ∇ℓ(z)``: positive means
``z`` helps ``q``), with ``ℓ(z)`` the example's token-summed loss and ``G`` the curvature averaged
per training example, computed per layer (block-diagonal ``G``) and summed. Per layer the
contraction of dense queries with a batch of training examples is done whichever way costs fewer
FLOPs: materialising per-example gradients ``ΔW_n = Σ_t g_t a_tᵀ`` and taking one matrix product
with all preconditioned queries, or contracting activations and output gradients directly — the
only way that yields per-token scores. Rank-r queries are always contracted directly, so that they
are never held dense. Query preconditioning is in :mod:`~lightning_influence.engine.queries`.
"""

from __future__ import annotations

import math
import time
import warnings
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from lightning_influence.engine import passes
from lightning_influence.engine.example_gradients import CHUNK_ELEMENTS, blockwise, per_example_gradients
from lightning_influence.engine.factors import Damping, Factors
from lightning_influence.engine.fitting import fit_factors
from lightning_influence.engine.queries import PreconditionedQueries, _example_gradient_batches, precondition_queries
from lightning_influence.results import InfluenceResult
from lightning_influence.analysis.sketch import ScoreSketch
from lightning_influence.tasks import Task
from lightning_influence.engine.tracking import LayerTracker, TrackedLayer, layers_by_name


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
