"""Where influence sits: the share held by the top examples, the distribution over layers
(``|s_l| / sum_l |s_l|``) and the tokenwise L2/L1 ratio that flags likely-spurious sequences."""

from __future__ import annotations

import math
from typing import Any, Dict, List, NamedTuple, Optional, Sequence, Union

import numpy as np
import torch

from lightning_influence.analysis.arrays import ArrayLike, as_numpy, as_tensor
from lightning_influence.analysis.sketch import ScoreSketch
from lightning_influence.analysis.sketch import concentration as sketch_concentration
from lightning_influence.analysis.sketch import tail_fits as sketch_tail_fits
from lightning_influence.analysis.tails import fit_query_tails, plausible_fraction

Groups = Union[int, Sequence[Sequence[int]]]
SPURIOUS_L2_L1 = 2.0 / 3.0  # the paper's threshold on the tokenwise L2/L1 ratio

# -- concentration -------------------------------------------------------------------------------


def _concentration_1d(values: np.ndarray) -> Dict[str, float]:
    values = values[np.isfinite(values)]
    n = len(values)
    if n == 0:
        return {"top1pct_share": math.nan, "top10pct_share": math.nan, "gini": math.nan, "positive_fraction": math.nan}
    positive = np.sort(np.clip(values, 0.0, None))[::-1]
    total = positive.sum()
    found = {"positive_fraction": float((values > 0).mean())}
    for percent in (1, 10):
        k = max(1, n * percent // 100)
        found[f"top{percent}pct_share"] = float(positive[:k].sum() / total) if total > 0 else math.nan
    ascending = positive[::-1]
    weights = 2 * np.arange(1, n + 1) - n - 1
    found["gini"] = float((weights * ascending).sum() / (n * total)) if total > 0 else math.nan
    return found


def concentration(values: ArrayLike) -> Dict[str, float]:
    """How concentrated the positive influence is on a few training examples.

    Args:
        values: ``[N]`` scores of one query, or ``[Q, N]`` (then every number is the mean over
            queries, ignoring queries where it is undefined).

    Returns:
        ``top1pct_share`` / ``top10pct_share``: share of the total positive influence held by the
        top 1% / 10% of examples (at least one example); ``gini``: Gini coefficient of the positive
        part ``max(s, 0)`` over all examples; ``positive_fraction``: fraction of scores above zero.
        Shares and Gini are NaN when there is no positive influence; non-finite scores are ignored.
    """
    array = as_numpy(values)
    if array.ndim == 1:
        return _concentration_1d(array)
    if array.ndim != 2:
        raise ValueError(f"values must be [N] or [Q, N], got shape {array.shape}")
    rows = [_concentration_1d(row) for row in array]
    found = {}
    for key in rows[0] if rows else ("top1pct_share", "top10pct_share", "gini", "positive_fraction"):
        column = np.array([row[key] for row in rows], dtype=np.float64)
        column = column[np.isfinite(column)]
        found[key] = float(column.mean()) if len(column) else math.nan
    return found


# -- layers --------------------------------------------------------------------------------------


def _layer_groups(num_layers: int, groups: Optional[Groups]) -> List[List[int]]:
    if groups is None:
        return [[layer] for layer in range(num_layers)]
    if isinstance(groups, int):
        if groups < 1:
            raise ValueError(f"groups must be a positive number of depth blocks, got {groups}")
        # never an empty block: a model with fewer layers than blocks gets one block per layer
        return [block.tolist() for block in np.array_split(np.arange(num_layers), min(groups, num_layers))]
    blocks = [[int(layer) for layer in block] for block in groups]
    bad = sorted({layer for block in blocks for layer in block if not 0 <= layer < num_layers})
    if bad or any(not block for block in blocks):
        raise ValueError(f"layer groups must be non-empty lists of indices in [0, {num_layers}); got {blocks}")
    return blocks


def layer_shares(layer_scores: ArrayLike, *, top_k: Optional[int] = None, groups: Optional[Groups] = None) -> torch.Tensor:
    """Each layer's share of every query's influence: ``sum_n |s_l[q,n]| / sum_l sum_n |s_l[q,n]|``.

    Args:
        layer_scores: ``[L, Q, N]`` per-layer scores (they sum over layers to the total score).
        top_k: only count each query's ``top_k`` training examples by total score (the paper's
            layer x top-sequences view); by default all examples.
        groups: an int ``G`` splits the layers into ``G`` contiguous depth blocks (the paper uses 9;
            at most one block per layer), or a list of lists of layer indices.

    Returns:
        ``[Q, L]`` (or ``[Q, G]``) float64 shares whose rows sum to 1; NaN rows for queries
        without any influence.
    """
    scores = as_tensor(layer_scores).double()
    if scores.dim() != 3:
        raise ValueError(f"layer_scores must be [L, Q, N], got shape {tuple(scores.shape)}")
    magnitude = scores.abs().masked_fill(scores.isnan(), 0.0)  # NaN: an example whose scores are not finite
    if top_k is not None:
        k = min(int(top_k), scores.shape[2])
        totals = scores.sum(0)
        top = totals.masked_fill(totals.isnan(), -math.inf).topk(k, dim=1).indices  # [Q, k], never a NaN example
        magnitude = magnitude.gather(2, top.unsqueeze(0).expand(scores.shape[0], -1, -1))
    per_layer = magnitude.sum(2).T  # [Q, L]
    return shares_from_sums(per_layer, groups)


def result_layer_shares(result: Any, top_k: Optional[int] = None) -> Optional[torch.Tensor]:
    """:func:`layer_shares` ``[Q, L]`` of a result, from its ``layer_scores``, or from what a result
    of the callback keeps instead (``layer_abs_sums`` for all examples, ``top_layer_scores`` for the
    top ``k`` it kept per query); ``None`` when the result holds neither for this ``top_k``."""
    if result.layer_scores is not None:
        return layer_shares(result.layer_scores, top_k=top_k)
    if top_k is None:
        sums = result.get("layer_abs_sums")
        return None if sums is None else shares_from_sums(sums.double().T, None)
    top = result.get("top_layer_scores")
    if top is None or top.shape[2] < min(int(top_k), result.num_train):
        return None
    return shares_from_sums(top[:, :, :top_k].double().abs().nan_to_num(0.0).sum(2).T, None)


def shares_from_sums(per_layer: torch.Tensor, groups: Optional[Groups]) -> torch.Tensor:
    """Normalise ``[Q, L]`` sums of absolute scores into (grouped) shares."""
    blocks = _layer_groups(per_layer.shape[1], groups)
    grouped = torch.stack([per_layer[:, block].sum(1) for block in blocks], dim=1)
    total = grouped.sum(1, keepdim=True)
    return torch.where(total > 0, grouped / total, torch.full_like(grouped, math.nan))


def group_layer_names(layer_names: Sequence[str], groups: Optional[Groups]) -> List[str]:
    """Labels for the columns of grouped :func:`layer_shares`: ``"first..last"`` per depth block."""
    names = list(layer_names)
    labels = []
    for block in _layer_groups(len(names), groups):
        if len(block) == 1:
            labels.append(names[block[0]])
        elif block == list(range(block[0], block[-1] + 1)):
            labels.append(f"{names[block[0]]}..{names[block[-1]]}")
        else:
            labels.append("+".join(names[i] for i in block))
    return labels


# -- tokens --------------------------------------------------------------------------------------


def token_distribution(token_scores: ArrayLike, token_mask: Optional[ArrayLike] = None) -> Dict[str, torch.Tensor]:
    """How each sequence's influence spreads over its tokens.

    Args:
        token_scores: ``[..., T]`` per-token scores (e.g. ``[Q, N, T]``).
        token_mask: boolean mask of valid tokens, broadcastable to ``token_scores``
            (e.g. ``[N, T]``); by default every token is valid.

    Returns:
        ``l2_l1_ratio`` ``[...]``: ``||s||_2 / ||s||_1`` over valid tokens (1 when one token carries
        everything, ``1/sqrt(T)`` when spread evenly; NaN without influence); ``spurious``
        ``[...]`` bool: ratio above 2/3, the paper's flag for sequences whose influence comes from
        a token or two, often spuriously; ``top_token`` ``[...]``: position of the largest
        ``|s|`` (-1 when no token is valid).
    """
    scores = as_tensor(token_scores).double()
    if token_mask is None:
        mask = torch.ones_like(scores, dtype=torch.bool)
    else:
        mask = as_tensor(token_mask).bool().expand_as(scores)
    magnitude = torch.where(mask, scores.abs(), torch.zeros_like(scores))
    l1 = magnitude.sum(-1)
    l2 = magnitude.pow(2).sum(-1).sqrt()
    ratio = torch.where(l1 > 0, l2 / l1, torch.full_like(l1, math.nan))
    top = torch.where(mask, magnitude, torch.full_like(magnitude, -1.0)).argmax(-1)
    return {
        "l2_l1_ratio": ratio,
        "spurious": ratio > SPURIOUS_L2_L1,
        "top_token": torch.where(mask.any(-1), top, torch.full_like(top, -1)),
    }


class Distribution(NamedTuple):
    """A result's scores over some queries: the median tail exponent, the share of queries whose
    tail is a plausible power law (``None``: no verdict), and their concentration."""

    alpha: Optional[float]
    plausible_fraction: Optional[float]
    spread: Dict[str, float]


def distribution_of(result: Any, query_pos: torch.Tensor, train_pos: Optional[torch.Tensor] = None) -> Distribution:
    """The score distribution over the given queries (and, of dense scores, the given training
    examples; a result with ``keep_top_scores`` over its whole pool, from its sketch). The plausible
    fraction goes beside the exponent wherever it is shown: α alone calls every heavy tail a power law."""
    kept = ScoreSketch.of(result) if result.scores is None else None
    if kept is None:
        scores = result.scores[query_pos].double()
        scores = scores if train_pos is None else scores[:, train_pos]
        fits, spread = fit_query_tails(scores), concentration(scores)
    else:
        kept = kept.rows(query_pos)
        fits, spread = sketch_tail_fits(kept), sketch_concentration(kept)
    alphas = [fit.alpha for fit in fits if fit is not None]
    return Distribution(alpha=float(np.median(alphas)) if alphas else None,
                        plausible_fraction=plausible_fraction(fits), spread=spread)
