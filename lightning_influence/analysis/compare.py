"""Comparing influence results across checkpoints: rank agreement, top-k churn, distribution shifts.

Pure functions over :class:`~lightning_influence.results.InfluenceResult` objects: results over
different candidate pools or query sets are matched on their dataset ids before comparison. A
:class:`RunAnalysis` is the one analysis of a run (latest summary, trajectory, comparison with the
previous result) that the publisher, the HTML report and the command line only format; it is built
one result at a time, so each new checkpoint costs one result's analysis.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from lightning_influence._format import format_number
from lightning_influence._io import json_ready
from lightning_influence.analysis.summary import InfluenceSummary, summarize
from lightning_influence.analysis.distribution import distribution_of, layer_shares, result_layer_shares
from lightning_influence.results import check_same_run

RBO_PERSISTENCE = 0.9


# -- rank statistics (vectorised over queries) ---------------------------------------------------


def _average_ranks(values: torch.Tensor) -> torch.Tensor:
    """Ranks along the last dimension, ties sharing their average rank (as ``scipy.stats.rankdata``)."""
    sorted_values, order = values.sort(dim=-1)
    n = values.shape[-1]
    new_group = torch.ones_like(sorted_values, dtype=torch.bool)
    new_group[..., 1:] = sorted_values[..., 1:] != sorted_values[..., :-1]
    group = new_group.long().cumsum(-1) - 1  # tie-group index of each sorted position
    positions = torch.arange(1, n + 1, dtype=torch.float64).expand_as(sorted_values)
    first = torch.zeros_like(positions).scatter_reduce(-1, group, positions, reduce="amin", include_self=False)
    last = torch.zeros_like(positions).scatter_reduce(-1, group, positions, reduce="amax", include_self=False)
    average = ((first + last) / 2).gather(-1, group)
    return torch.empty_like(average).scatter_(-1, order, average)


def _pearson(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    x = x - x.mean(-1, keepdim=True)
    y = y - y.mean(-1, keepdim=True)
    return (x * y).sum(-1) / (x.pow(2).sum(-1) * y.pow(2).sum(-1)).sqrt()


def spearman(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Spearman rank correlation of each row of ``a`` with the same row of ``b`` (NaN if constant)."""
    return _pearson(_average_ranks(a.double()), _average_ranks(b.double()))


def kendall_tau_b(a: torch.Tensor, b: torch.Tensor, *, max_n: int = 2000, seed: int = 0) -> torch.Tensor:
    """Kendall's tau-b of each row of ``a`` with the same row of ``b``.

    Counts concordant minus discordant pairs over all pairs, so memory grows with ``n^2``; above
    ``max_n`` columns a random subset of ``max_n`` columns (the same for every row, from a private
    generator seeded with ``seed``) is used.
    """
    a, b = a.double(), b.double()
    n = a.shape[-1]
    if n > max_n:
        keep = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:max_n]
        a, b = a[..., keep], b[..., keep]
        n = max_n
    taus = []
    rows_per_chunk = max(1, (1 << 22) // (n * n))
    for lo in range(0, a.shape[0], rows_per_chunk):
        sign_a = (a[lo : lo + rows_per_chunk, :, None] - a[lo : lo + rows_per_chunk, None, :]).sign()
        sign_b = (b[lo : lo + rows_per_chunk, :, None] - b[lo : lo + rows_per_chunk, None, :]).sign()
        # over ordered pairs i != j: each unordered pair counted twice, the diagonal contributes 0
        net = (sign_a * sign_b).sum((-2, -1))
        untied_a = sign_a.abs().sum((-2, -1))
        untied_b = sign_b.abs().sum((-2, -1))
        taus.append(net / (untied_a * untied_b).sqrt())
    return torch.cat(taus)


def _membership(indices: torch.Tensor, n: int) -> torch.Tensor:
    return torch.zeros(indices.shape[0], n, dtype=torch.bool).scatter_(1, indices, True)


def topk_jaccard(a: torch.Tensor, b: torch.Tensor, k: int) -> torch.Tensor:
    """Per row, Jaccard overlap of the column sets holding the ``k`` largest values of ``a`` and ``b``."""
    n = a.shape[-1]
    in_a = _membership(a.topk(k, dim=-1).indices, n)
    in_b = _membership(b.topk(k, dim=-1).indices, n)
    return (in_a & in_b).sum(-1).double() / (in_a | in_b).sum(-1).double()


def rank_biased_overlap(a: torch.Tensor, b: torch.Tensor, k: int, p: float = RBO_PERSISTENCE) -> torch.Tensor:
    """Per row, extrapolated rank-biased overlap of the top-``k`` lists (Webber et al. 2010, eq. 32).

    ``RBO = (X_k / k) p^k + (1 - p) / p * sum_{d<=k} (X_d / d) p^d``, with ``X_d`` the overlap of the
    two top-``d`` prefixes: 1 for identical lists, 0 for disjoint ones, weighting the top more.
    """
    n = a.shape[-1]
    top_a = a.topk(k, dim=-1).indices  # [Q, k]
    top_b = b.topk(k, dim=-1).indices
    rank_in_b = torch.full((a.shape[0], n), k, dtype=torch.long)
    rank_in_b.scatter_(1, top_b, torch.arange(k).expand_as(top_b))
    # an item at rank i in a and rank j in b is shared by every prefix of depth > max(i, j)
    joined = torch.maximum(torch.arange(k).expand_as(top_a), rank_in_b.gather(1, top_a))
    ones = torch.ones_like(joined, dtype=torch.float64)
    counts = torch.zeros(a.shape[0], k + 1, dtype=torch.float64).scatter_add_(1, joined, ones)
    overlap = counts[:, :k].cumsum(1)  # X_d for d = 1..k
    depth = torch.arange(1, k + 1, dtype=torch.float64)
    agreement = overlap / depth
    weights = p**depth
    return agreement[:, -1] * p**k + (1 - p) / p * (agreement * weights).sum(1)


def js_divergence(p: torch.Tensor, q: torch.Tensor) -> float:
    """Jensen-Shannon divergence in bits between two distributions (normalised here)."""
    p = p.double() / p.double().sum()
    q = q.double() / q.double().sum()
    m = (p + q) / 2

    def kl(x: torch.Tensor) -> torch.Tensor:
        return torch.where(x > 0, x * (x / m).log2(), torch.zeros_like(x)).sum()

    return float((kl(p) + kl(q)) / 2)


# -- matching ------------------------------------------------------------------------------------


def match_ids(a: Any, b: Any) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Positions ``(q_a, q_b, t_a, t_b)`` of the query and train ids both results share, in ``a``'s order."""
    q_a, q_b = _shared_positions(a.query_ids, b.query_ids, "query", a, b, minimum=1)
    t_a, t_b = _shared_positions(a.train_ids, b.train_ids, "training", a, b, minimum=2)
    return q_a, q_b, t_a, t_b


def _shared_positions(
    ids_a: torch.Tensor, ids_b: torch.Tensor, what: str, a: Any, b: Any, minimum: int
) -> Tuple[torch.Tensor, torch.Tensor]:
    position_in_b = {int(i): pos for pos, i in enumerate(ids_b.tolist())}
    pairs = [(pos, position_in_b[i]) for pos, i in enumerate(ids_a.tolist()) if i in position_in_b]
    if len(pairs) < minimum:
        raise ValueError(
            f"cannot compare step {a.step} with step {b.step}: they share {len(pairs)} {what} ids "
            f"(need at least {minimum}); a has {len(ids_a)} {what} ids ({_id_range(ids_a)}), "
            f"b has {len(ids_b)} ({_id_range(ids_b)}). Compare results scored on the same {what} data."
        )
    return torch.tensor([p for p, _ in pairs]), torch.tensor([p for _, p in pairs])


def _id_range(ids: torch.Tensor) -> str:
    return f"{int(ids.min())}..{int(ids.max())}" if len(ids) else "none"


def _matched_shares(result: Any, query_pos: torch.Tensor, train_pos: torch.Tensor,
                    same_pool: bool) -> Optional[torch.Tensor]:
    """Mean layer shares over the matched queries: from the per-layer scores of the matched
    examples, or from the per-layer sums (callback results) when both results scored the same pool."""
    if result.layer_scores is not None:
        return layer_shares(result.layer_scores[:, query_pos][:, :, train_pos]).nanmean(0)
    shares = result_layer_shares(result) if same_pool else None
    return None if shares is None else shares[query_pos].nanmean(0)


def kept_size(result: Any) -> int:
    """How many top scores per query a result can rank: all, or those it kept (``keep_top_scores``)."""
    return result.get("kept_top_scores").shape[1] if result.scores is None else result.num_train


def top_rank_rows(a: Any, b: Any, q_a: torch.Tensor, q_b: torch.Tensor,
                   k: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each result's top-``k`` train ids per matched query as rows over the union of those ids
    (``k`` for the first, ``1`` for the k-th, 0 elsewhere): the top-k overlap measures read them
    as score rows, which is all a result keeping only its top scores can give them."""
    tops = [result.top_k(k).indices[positions] for result, positions in ((a, q_a), (b, q_b))]
    union = torch.cat(tops, 1)
    union = union[union >= 0].unique()
    column = {int(i): j for j, i in enumerate(union.tolist())}
    rows = []
    for top in tops:
        matrix = torch.zeros(top.shape[0], len(union), dtype=torch.float64)
        for row, ids in enumerate(top.tolist()):
            for rank, example in enumerate(ids):
                if example >= 0:
                    matrix[row, column[example]] = k - rank
        rows.append(matrix)
    return rows[0], rows[1], union


# -- comparison ----------------------------------------------------------------------------------


@dataclass
class Comparison:
    """How the influence scores of two checkpoints differ (``b`` relative to ``a``).

    Attributes:
        steps: ``(a.step, b.step)``.
        n_query, n_train: queries and training examples both results share (compared on these).
        spearman, kendall: ``[Q]`` per-query rank correlations of the scores (Kendall tau-b,
            possibly on a random subset of training examples); NaN when a result keeps only its
            top scores (``keep_top_scores``), whose top-k measures then use the kept lists (``k``
            up to the number kept) and whose distributions come from their sketches.
        topk_jaccard, topk_rbo: ``k ->`` mean over queries of the Jaccard overlap and of the
            rank-biased overlap (p=0.9) of the two top-k lists (``k`` above ``n_train`` left out).
        tail_alpha: median power-law exponent over queries for ``a`` and ``b`` (``None``: no fit).
        tail_plausible_fraction: the share of queries whose tail is a plausible power law, for ``a``
            and ``b`` (``None``: no verdict).
        concentration: :func:`~lightning_influence.analysis.concentration` of ``a`` and ``b``.
        layer_js: Jensen-Shannon divergence (bits) between the two mean layer shares, when both
            results have layer scores for the same layers.
        entered, left: per query, the train ids that entered / left the top-k from ``a`` to ``b``
            (in ``b``'s / ``a``'s rank order).
        query_ids: the shared query ids, in the order of the per-query fields.
        k_changes: the ``k`` of ``entered`` and ``left``.
    """

    steps: Tuple[Optional[int], Optional[int]]
    n_query: int
    n_train: int
    spearman: torch.Tensor
    kendall: torch.Tensor
    topk_jaccard: Dict[int, float]
    topk_rbo: Dict[int, float]
    tail_alpha: Tuple[Optional[float], Optional[float]]
    tail_plausible_fraction: Tuple[Optional[float], Optional[float]]
    concentration: Tuple[Dict[str, float], Dict[str, float]]
    layer_js: Optional[float]
    entered: List[List[int]]
    left: List[List[int]]
    query_ids: List[int] = field(default_factory=list)
    k_changes: int = 10

    def to_dict(self) -> Dict[str, Any]:
        """JSON-ready dict (non-finite numbers become ``None``), with means of the per-query fields."""
        return json_ready(
            {
                "steps": list(self.steps),
                "n_query": self.n_query,
                "n_train": self.n_train,
                "spearman_mean": _nanmean(self.spearman),
                "kendall_mean": _nanmean(self.kendall),
                "spearman": self.spearman,
                "kendall": self.kendall,
                "topk_jaccard": self.topk_jaccard,
                "topk_rbo": self.topk_rbo,
                "tail_alpha": list(self.tail_alpha),
                "tail_plausible_fraction": list(self.tail_plausible_fraction),
                "concentration": list(self.concentration),
                "layer_js": self.layer_js,
                "query_ids": self.query_ids,
                "k_changes": self.k_changes,
                "entered": self.entered,
                "left": self.left,
            }
        )

    def format_table(self, max_queries: int = 5) -> str:
        """A human-readable table for the terminal (top-k changes for the first ``max_queries``)."""
        step_a, step_b = (f"step {s}" if s is not None else "-" for s in self.steps)
        sizes = f"{self.n_query} queries, {self.n_train} training examples"
        lines = [f"Influence comparison: {step_a} -> {step_b} ({sizes})", ""]
        lines.append(f"  {'rank correlation':<22}{'mean':>9}{'min':>9}{'max':>9}")
        for name, values in (("spearman", self.spearman), ("kendall tau-b", self.kendall)):
            finite = values[torch.isfinite(values)]
            low, high = (float(finite.min()), float(finite.max())) if finite.numel() else (math.nan, math.nan)
            lines.append(f"  {name:<22}{_cell(_nanmean(values))}{_cell(low)}{_cell(high)}")
        if self.topk_jaccard:
            ks = list(self.topk_jaccard)
            lines += ["", f"  {'top-k overlap':<22}" + "".join(f"{'k=' + str(k):>9}" for k in ks)]
            lines.append(f"  {'jaccard':<22}" + "".join(_cell(self.topk_jaccard[k]) for k in ks))
            lines.append(f"  {'rbo (p=0.9)':<22}" + "".join(_cell(self.topk_rbo[k]) for k in ks))
        lines += ["", f"  {'distribution':<22}{step_a:>12}{step_b:>12}"]
        lines.append(f"  {'tail_alpha':<22}" + "".join(_cell(v, 12) for v in self.tail_alpha))
        lines.append(f"  {'tail_plausible_fraction':<22}" + "".join(_cell(v, 12) for v in self.tail_plausible_fraction))
        for key in ("top1pct_share", "top10pct_share", "gini", "positive_fraction"):
            lines.append(f"  {key:<22}" + "".join(_cell(c.get(key), 12) for c in self.concentration))
        if self.layer_js is not None:
            lines.append(f"  {'layer shift (JS bits)':<22}{_cell(self.layer_js, 12)}")
        shown = min(max_queries, len(self.entered))
        if shown:
            lines += ["", f"  top-{self.k_changes} changes (first {shown} of {len(self.entered)} queries):"]
        for query, entered, left in list(zip(self.query_ids, self.entered, self.left))[:shown]:
            lines.append(f"    query {query}: entered {_id_list(entered)}; left {_id_list(left)}")
        return "\n".join(lines)


def _nanmean(values: torch.Tensor) -> float:
    finite = values[torch.isfinite(values)]
    return float(finite.mean()) if finite.numel() else math.nan


def _cell(value: Optional[float], width: int = 9) -> str:
    """A right-aligned table cell with three decimals."""
    return format_number(value, ".3f").rjust(width)


def _id_list(ids: List[int], limit: int = 10) -> str:
    text = ", ".join(map(str, ids[:limit]))
    return f"[{text}{', ...' if len(ids) > limit else ''}]"


def _topk_changes(
    scores_a: torch.Tensor, scores_b: torch.Tensor, train_ids: torch.Tensor, k: int
) -> Tuple[List[List[int]], List[List[int]]]:
    top_a = scores_a.topk(k, dim=1).indices.tolist()
    top_b = scores_b.topk(k, dim=1).indices.tolist()
    ids = train_ids.tolist()
    entered = [[ids[j] for j in row_b if j not in set(row_a)] for row_a, row_b in zip(top_a, top_b)]
    left = [[ids[j] for j in row_a if j not in set(row_b)] for row_a, row_b in zip(top_a, top_b)]
    return entered, left


def compare(
    a: Any,
    b: Any,
    *,
    ks: Sequence[int] = (1, 5, 10, 50),
    top_k_changes: int = 10,
    kendall_max_n: int = 2000,
    seed: int = 0,
    allow_different_runs: bool = False,
) -> Comparison:
    """Compare two influence results, typically of two checkpoints of one run.

    Args:
        a, b: :class:`~lightning_influence.results.InfluenceResult` objects. Queries and training
            examples are matched on their ids (those of ``a`` that ``b`` also has, in ``a``'s order).
        ks: top-k sizes for the overlap measures.
        top_k_changes: ``k`` of the top-k lists whose entries and exits are reported.
        kendall_max_n: Kendall's tau is computed on at most this many training examples.
        seed: seed of the subset for Kendall's tau.
        allow_different_runs: compare results of different training runs (``meta["run"]["id"]``).

    Returns:
        A :class:`Comparison`.

    Raises:
        ValueError: if the results come from different runs, share no query, or share fewer than
            two training examples.
    """
    check_same_run([a, b], allow_different_runs)
    q_a, q_b, t_a, t_b = match_ids(a, b)
    n_train = len(t_a)
    if a.scores is None or b.scores is None:  # keep_top_scores: the kept top lists, no rank correlation
        deepest = min(kept_size(a), kept_size(b), n_train)
        valid_ks = [int(k) for k in ks if 1 <= int(k) <= deepest]
        k_changes = min(int(top_k_changes), deepest)
        scores_a, scores_b, ids = top_rank_rows(a, b, q_a, q_b, max(valid_ks + [k_changes]))
        correlation = torch.full((len(q_a),), math.nan, dtype=torch.float64)
        spearman_ab = kendall_ab = correlation
    else:
        scores_a = a.scores[q_a][:, t_a].double()
        scores_b = b.scores[q_b][:, t_b].double()
        valid_ks = [int(k) for k in ks if 1 <= int(k) <= n_train]
        k_changes = min(int(top_k_changes), n_train)
        ids = a.train_ids[t_a]
        spearman_ab = spearman(scores_a, scores_b)
        kendall_ab = kendall_tau_b(scores_a, scores_b, max_n=kendall_max_n, seed=seed)
    entered, left = _topk_changes(scores_a, scores_b, ids, k_changes)
    layer_js = None
    if a.layer_names == b.layer_names:
        same_pool = torch.equal(a.train_ids, b.train_ids)
        shares_a, shares_b = _matched_shares(a, q_a, t_a, same_pool), _matched_shares(b, q_b, t_b, same_pool)
        if shares_a is not None and shares_b is not None and bool(
                torch.isfinite(shares_a).all() and torch.isfinite(shares_b).all()):
            layer_js = js_divergence(shares_a, shares_b)
    before, after = distribution_of(a, q_a, t_a), distribution_of(b, q_b, t_b)
    return Comparison(
        steps=(a.step, b.step),
        n_query=len(q_a),
        n_train=n_train,
        spearman=spearman_ab,
        kendall=kendall_ab,
        topk_jaccard={k: _nanmean(topk_jaccard(scores_a, scores_b, k)) for k in valid_ks},
        topk_rbo={k: _nanmean(rank_biased_overlap(scores_a, scores_b, k)) for k in valid_ks},
        tail_alpha=(before.alpha, after.alpha),
        tail_plausible_fraction=(before.plausible_fraction, after.plausible_fraction),
        concentration=(before.spread, after.spread),
        layer_js=layer_js,
        entered=entered,
        left=left,
        query_ids=a.query_ids[q_a].tolist(),
        k_changes=k_changes,
    )




# -- a run: trajectory and latest analysis, built one result at a time ---------------------------

_SPREAD_KEYS = ("top1pct_share", "top10pct_share", "gini")
_ROW_KEYS = ("step", "epoch", "tail_alpha", "tail_plausible_fraction", *_SPREAD_KEYS, "topk_churn", "spearman_prev")


def with_k(name: str, k: int) -> str:
    """The one spelling of a statistic over top-k lists, its k in its name: ``topk_churn@10``.
    Churn at k=5 and at k=10 are different numbers and never share a name."""
    return f"{name}@{int(k)}"


def _finite_or_none(value: Optional[float]) -> Optional[float]:
    return value if value is not None and math.isfinite(value) else None


def _checkpoint_row(result: Any, previous: Optional[Any], k: int) -> Dict[str, Any]:
    """One checkpoint's trajectory statistics; churn and rank agreement are measured against ``previous``."""
    tail = distribution_of(result, torch.arange(result.num_queries))
    row: Dict[str, Any] = {"step": result.step, "epoch": result.epoch, "tail_alpha": tail.alpha,
                           "tail_plausible_fraction": tail.plausible_fraction}
    row.update({key: _finite_or_none(tail.spread[key]) for key in _SPREAD_KEYS})
    row["topk_churn"] = row["spearman_prev"] = None
    if previous is not None:
        try:
            q_a, q_b, t_a, t_b = match_ids(previous, result)
        except ValueError:
            pass  # no shared queries or training examples: the change is undefined
        else:
            if previous.scores is None or result.scores is None:  # keep_top_scores: the kept top lists
                depth = min(k, len(t_a), kept_size(previous), kept_size(result))
                before, after, _ = top_rank_rows(previous, result, q_a, q_b, depth)
                row["topk_churn"] = 1.0 - _nanmean(topk_jaccard(before, after, depth))
            else:
                before, after = previous.scores[q_a][:, t_a].double(), result.scores[q_b][:, t_b].double()
                row["topk_churn"] = 1.0 - _nanmean(topk_jaccard(before, after, min(k, len(t_a))))
                row["spearman_prev"] = _finite_or_none(_nanmean(spearman(before, after)))
    shares: Dict[str, float] = {}
    result_shares = result_layer_shares(result)
    if result_shares is not None:
        shares = dict(zip(result.layer_names, result_shares.nanmean(0).tolist()))
    row["layer_share"] = {name: _finite_or_none(shares.get(name)) for name in result.layer_names}
    return row


def _series(rows: Sequence[Dict[str, Any]], k: int) -> Dict[str, List[Any]]:
    """Checkpoint rows as equal-length series (the churn named with its ``k``); a layer missing at a
    checkpoint gets ``None`` there."""
    series = {with_k(key, k) if key == "topk_churn" else key: [row[key] for row in rows] for key in _ROW_KEYS}
    layers = dict.fromkeys(name for row in rows for name in row["layer_share"])  # first-seen order
    series.update({f"layer_share/{name}": [row["layer_share"].get(name) for row in rows] for name in layers})
    return series


@dataclass(frozen=True, eq=False)
class Analysis:
    """Everything reported about a run at its latest result, built by :class:`RunAnalysis`.

    The summary and the comparison are computed on first use (then kept), so a caller that shows
    neither pays for neither.

    Attributes:
        result: the latest result.
        previous: the result before it (``None`` for a run's first result).
        trajectory: the run's series so far (see :func:`trajectory`); ``None`` for a single result.
        k: top-k size of the comparison's entered/left lists.
    """

    result: Any
    previous: Optional[Any]
    trajectory: Optional[Dict[str, List[Any]]]
    k: int = 10

    @cached_property
    def summary(self) -> InfluenceSummary:
        """:func:`~lightning_influence.analysis.summarize` of the latest result."""
        return summarize(self.result)

    @cached_property
    def comparison(self) -> Optional[Comparison]:
        """:func:`compare` of the previous result with the latest (``None`` for a first result)."""
        if self.previous is None:
            return None
        # RunAnalysis checked the run identity when it accepted the latest result
        return compare(self.previous, self.result, top_k_changes=self.k, allow_different_runs=True)


class RunAnalysis:
    """The analysis of one training run, extended one result at a time.

    :meth:`add` analyses only the new result (its trajectory row and its change from the previous
    result): publishing after every checkpoint costs one result's analysis, not the whole history's.
    It keeps the rows, the previous result and one result naming the run, to refuse another run's.

    Args:
        k: top-k size of the churn (``1 -`` top-k Jaccard with the previous checkpoint) and of the
            comparison's entered/left lists.
        allow_different_runs: accept results of different training runs (``meta["run"]["id"]``).
    """

    def __init__(self, *, k: int = 10, allow_different_runs: bool = False) -> None:
        if k < 1:
            raise ValueError(f"k must be a positive top-k size, got {k}")
        self.k = k
        self.allow_different_runs = allow_different_runs
        self._rows: List[Dict[str, Any]] = []
        self._run_reference: Optional[Any] = None  # the first result naming its run, else the first
        self._latest: Optional[Analysis] = None

    def __len__(self) -> int:
        return len(self._rows)

    @property
    def latest(self) -> Optional[Analysis]:
        """The analysis at the last added result (``None`` before any)."""
        return self._latest

    def add(self, result: Any) -> Analysis:
        """Analyse ``result``, the run's next result, and return the analysis of the run so far.

        Raises:
            ValueError: if ``result`` comes from another run than the earlier results.
        """
        if self._run_reference is not None:
            check_same_run([self._run_reference, result], self.allow_different_runs)
        if self._run_reference is None or not self._run_reference.meta.get("run"):
            self._run_reference = result
        previous = self._latest.result if self._latest is not None else None
        self._rows.append(_checkpoint_row(result, previous, self.k))
        self._latest = Analysis(result, previous, _series(self._rows, self.k) if len(self._rows) > 1 else None, self.k)
        return self._latest

    def extend(self, results: Sequence[Any]) -> Analysis:
        """Add ``results`` (oldest first); a mix of runs is refused up front, naming every run.

        Raises:
            ValueError: if ``results`` is empty or mixes training runs.
        """
        results = list(results)
        if not results:
            raise ValueError("a run analysis needs at least one influence result")
        known = [self._run_reference] if self._run_reference is not None else []
        check_same_run([*known, *results], self.allow_different_runs)
        for result in results:
            self.add(result)
        return self._latest

    def trajectory(self) -> Dict[str, List[Any]]:
        """The series over every added result (see :func:`trajectory`)."""
        return _series(self._rows, self.k)


def trajectory(results: Sequence[Any], *, k: int = 10, allow_different_runs: bool = False) -> Dict[str, List[Any]]:
    """Per-checkpoint series over a run, for line plots and the report's trajectory section.

    Args:
        results: :class:`~lightning_influence.results.InfluenceResult` objects ordered by step.
        k: top-k size for the churn.
        allow_different_runs: accept results of different training runs (``meta["run"]["id"]``).

    Returns:
        Equal-length lists keyed ``"step"``, ``"epoch"``, ``"tail_alpha"`` (median over queries),
        ``"tail_plausible_fraction"`` (the share of queries whose tail is a plausible power law),
        ``"top1pct_share"``, ``"top10pct_share"``, ``"gini"``, ``"topk_churn@<k>"`` (1 - mean top-k
        Jaccard with the previous checkpoint), ``"spearman_prev"`` (mean Spearman with the
        previous checkpoint) and ``"layer_share/<name>"``; ``None`` where a value is undefined
        (first checkpoint, no shared ids, a layer missing at that checkpoint).

    Raises:
        ValueError: if the results come from different training runs.
    """
    run = RunAnalysis(k=k, allow_different_runs=allow_different_runs)
    if results:
        run.extend(results)
    return run.trajectory()
