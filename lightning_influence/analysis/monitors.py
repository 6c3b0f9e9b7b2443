"""Scalars that watch influence over training: drift between computations, concentration on one
example (memorisation), and the self-influence top set.

Each influence computation yields a flat ``{name: float}`` dict that the callback writes into
``trainer.callback_metrics`` as ``influence/<name>`` (so ``EarlyStopping``, ``ModelCheckpoint`` and
W&B alerts can watch it) and records in the result's ``meta["monitors"]`` (so every logger gets it).
Only cheap statistics: rank correlation, top-k overlap, shares and one power-law fit per query.

Plain PyTorch: no Lightning, W&B or reporting import.
"""

from __future__ import annotations

import math
from typing import Any, Dict, Optional

import torch

from lightning_influence.analysis.distribution import concentration, distribution_of, result_layer_shares
from lightning_influence.analysis.compare import (
    with_k,
    kept_size,
    top_rank_rows,
    js_divergence,
    match_ids,
    spearman,
    topk_jaccard,
)
from lightning_influence.analysis.sketch import ScoreSketch
from lightning_influence.analysis.sketch import concentration as sketch_concentration

# Every key monitor_scalars can return, for users wiring ``monitor="influence/<key>"``; ``@<k>`` is
# the size of the top-k lists (the callback's ``top_k``), e.g. ``drift/topk_churn@10``.
DRIFT_KEYS = ("drift/spearman", "drift/topk_jaccard@<k>", "drift/topk_churn@<k>", "drift/tail_alpha_change",
              "drift/top1pct_share_change", "drift/layer_js")
ALWAYS_KEYS = ("max_top1_share", "top1pct_share")
SELF_KEYS = ("self/max", "self/median", "self/top_share@<k>", "self/topk_churn@<k>")
# Keys that results saved before the top-k size was part of the name carry without it.
_WITHOUT_K = ("drift/topk_jaccard", "drift/topk_churn", "self/top_share", "self/topk_churn")


def top1_shares(scores: torch.Tensor) -> torch.Tensor:
    """Per query, the share of its positive influence held by its single most positive example
    ``[Q]`` (NaN for a query without positive influence): 1.0 means one training example alone
    supports the query, the signature of memorisation."""
    positive = torch.nan_to_num(scores.double(), nan=0.0).clamp_min(0.0)
    total = positive.sum(1)
    return torch.where(total > 0, positive.max(1).values / total.clamp_min(1e-300), torch.full_like(total, math.nan))


def _finite(values: Dict[str, Optional[float]]) -> Dict[str, float]:
    return {key: float(value) for key, value in values.items() if value is not None and math.isfinite(value)}


def _nanmean(values: torch.Tensor) -> float:
    finite = values[torch.isfinite(values)]
    return float(finite.mean()) if len(finite) else math.nan


def drift_scalars(previous: Any, result: Any, k: int) -> Dict[str, float]:
    """How ``result`` moved from ``previous`` (two results over shared ids): mean Spearman
    correlation, top-k Jaccard and churn (``1 -`` Jaccard), the change of the median tail exponent
    and of the top-1% share, and the Jensen-Shannon divergence (bits) of the mean layer shares."""
    try:
        q_a, q_b, t_a, t_b = match_ids(previous, result)
    except ValueError:
        return {}  # nothing shared to compare
    if previous.scores is None or result.scores is None:  # keep_top_scores: the kept top lists
        depth = min(k, len(t_a), kept_size(previous), kept_size(result))
        before, after, _ = top_rank_rows(previous, result, q_a, q_b, depth)
        jaccard, rank_correlation = _nanmean(topk_jaccard(before, after, depth)), None
    else:
        before = previous.scores[q_a][:, t_a].double()
        after = result.scores[q_b][:, t_b].double()
        jaccard = _nanmean(topk_jaccard(torch.nan_to_num(before, nan=-math.inf),
                                        torch.nan_to_num(after, nan=-math.inf), min(k, len(t_a))))
        rank_correlation = _nanmean(spearman(before, after))
    before_tail, after_tail = distribution_of(previous, q_a, t_a), distribution_of(result, q_b, t_b)
    out: Dict[str, Optional[float]] = {
        "drift/spearman": rank_correlation,
        with_k("drift/topk_jaccard", k): jaccard,
        with_k("drift/topk_churn", k): 1.0 - jaccard,
        "drift/tail_alpha_change": (after_tail.alpha - before_tail.alpha
                                    if before_tail.alpha is not None and after_tail.alpha is not None else None),
        "drift/top1pct_share_change": after_tail.spread["top1pct_share"] - before_tail.spread["top1pct_share"],
    }
    before_shares, after_shares = result_layer_shares(previous), result_layer_shares(result)
    if before_shares is not None and after_shares is not None and previous.layer_names == result.layer_names:
        # Over each result's whole pool: callback results keep per-layer sums, not per-example layer scores.
        shares_before, shares_after = before_shares[q_a].nanmean(0), after_shares[q_b].nanmean(0)
        if torch.isfinite(shares_before).all() and torch.isfinite(shares_after).all():
            out["drift/layer_js"] = js_divergence(shares_before, shares_after)
    return _finite(out)


def self_influence_scalars(previous: Any, result: Any, k: int) -> Dict[str, float]:
    """Distribution of the self-influence scores and how their top-k set changed since ``previous``."""
    values = result.self_scores
    if values is None:
        return {}
    finite = values.double()[torch.isfinite(values)]
    if not len(finite):
        return {}
    k = min(k, len(finite))
    top = finite.topk(k).values
    out: Dict[str, Optional[float]] = {
        "self/max": float(top[0]), "self/median": float(finite.median()),
        with_k("self/top_share", k): float(top.sum() / finite.clamp_min(0).sum().clamp_min(1e-300)),
    }
    before = previous.self_scores if previous is not None else None
    if before is not None:
        out[with_k("self/topk_churn", k)] = 1.0 - len(top_self_ids(previous, k) & top_self_ids(result, k)) / float(
            len(top_self_ids(previous, k) | top_self_ids(result, k)))
    return _finite(out)


def top_self_ids(result: Any, k: int) -> set:
    """Training ids of the ``k`` highest finite self-influence scores."""
    values = torch.nan_to_num(result.self_scores.double(), nan=-math.inf)
    order = values.topk(min(k, len(values))).indices
    return {int(result.train_ids[i]) for i in order if math.isfinite(float(values[i]))}


def monitor_scalars(result: Any, previous: Optional[Any] = None, k: int = 10) -> Dict[str, float]:
    """Every monitor of ``result`` (``previous``: the run's result before it, or ``None``).

    Keys (undefined values are left out): ``max_top1_share`` (over queries, the largest share of
    a query's positive influence held by one example: memorisation), ``top1pct_share`` (mean over
    queries), the ``drift/...`` keys of :func:`drift_scalars` when ``previous`` is given, and the
    ``self/...`` keys of :func:`self_influence_scalars` when ``result`` has self-influence scores.
    """
    kept = ScoreSketch.of(result) if result.scores is None else None
    if kept is None:
        out: Dict[str, Optional[float]] = {
            "max_top1_share": float(torch.nan_to_num(top1_shares(result.scores), nan=-math.inf).max()),
            "top1pct_share": concentration(result.scores.double())["top1pct_share"],
        }
    else:  # keep_top_scores: the top score and the positive total are kept exactly
        largest = kept.top_values[:, 0].double().nan_to_num(0.0, posinf=0.0, neginf=0.0).clamp_min(0.0)
        total = kept.moment("positive_sum")
        shares = torch.where(total > 0, largest / total.clamp_min(1e-300), torch.full_like(total, -math.inf))
        out = {"max_top1_share": float(shares.max()), "top1pct_share": sketch_concentration(kept)["top1pct_share"]}
    scalars = _finite(out)
    if previous is not None:
        scalars.update(drift_scalars(previous, result, k))
    scalars.update(self_influence_scalars(previous, result, k))
    return scalars


def saved_monitors(meta: Dict[str, Any]) -> Dict[str, float]:
    """A saved result's monitor scalars (``meta["monitors"]``) under today's keys: a result written
    before top-k statistics carried their k (``drift/topk_churn``) gets it from its configuration's
    ``top_k``, the k it was computed with."""
    monitors = dict(meta.get("monitors", {}))
    config = meta.get("config") or {}
    k = config.get("top_k", (config.get("scoring") or {}).get("top_k"))  # flat in results of earlier releases
    if k is None:
        return monitors
    return {with_k(key, k) if key in _WITHOUT_K else key: value for key, value in monitors.items()}
