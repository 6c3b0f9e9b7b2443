"""Everything a sink shows about one result, computed once and shared by all sinks.

Drawing the figures (about 0.5-1.5 s each on a CPU) is the expensive part of publishing; sinks only
translate a :class:`Report` into their logger's calls. A report can be built with its figures
still to draw (:meth:`Report.draw_figures`), so a background worker draws them off the training thread.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from lightning_influence.analysis.monitors import saved_monitors
from lightning_influence.results import finite_topk
from lightning_influence.reporting import plots
from lightning_influence.reporting.render import RenderedExample

__all__ = ["ExampleRow", "Report", "build_report"]

HISTOGRAM_QUERIES = 16  # queries in the grid of per-query score histograms


@dataclass
class ExampleRow:
    """One line of a top-k / bottom-k table: a training example ranked for a query."""

    query_id: int
    query: RenderedExample
    rank: int  # 1 = most influential (most positive for top, most negative for bottom)
    train_id: int
    score: float
    example: RenderedExample

    def to_dict(self) -> Dict[str, Any]:
        return {
            "query_id": self.query_id,
            "query": self.query.text,
            "rank": self.rank,
            "train_id": self.train_id,
            "score": self.score,
            "example": self.example.text,
        }


@dataclass
class Report:
    """What to show for one result at one step.

    Attributes:
        step: the trainer's global step (the x axis of every logger).
        epoch: the epoch, if known.
        namespace: prefix of every logged key (``influence`` gives ``influence/tail_alpha``).
        scalars: finite headline numbers, keys without the namespace.
        scores: all finite scores, each divided by its query's mean |score| and flattened (for
            histograms: one query's large scale cannot hide the others').
        pngs: figure name (e.g. ``tail/q3``) to PNG bytes.
        top_rows, bottom_rows: top-k / bottom-k training examples per query.
        trajectory: statistics over this and previous results (``compare.trajectory``), or None.
        tables: further example tables by name: ``self_influence`` (highest self-influence, query
            id -1) and ``ledger`` (per query, the examples the per-step ledger credits most).
        histograms: further value distributions by name (``self_scores``).
        result_path: the result directory on disk, if saved.
        undrawn: figure name to a function drawing it, for the figures :meth:`draw_figures` has
            still to turn into ``pngs`` (their data is taken from the result when the report is built).
    """

    step: int
    epoch: Optional[int]
    namespace: str
    scalars: Dict[str, float]
    scores: np.ndarray
    pngs: Dict[str, bytes]
    top_rows: List[ExampleRow]
    bottom_rows: List[ExampleRow]
    trajectory: Optional[Dict[str, list]] = None
    tables: Dict[str, List[ExampleRow]] = field(default_factory=dict)
    histograms: Dict[str, np.ndarray] = field(default_factory=dict)
    result_path: Optional[Path] = None
    undrawn: Dict[str, Callable[[], Any]] = field(default_factory=dict, repr=False)
    _arrays: Dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    def draw_figures(self) -> None:
        """Draw the undrawn figures into ``pngs`` (all or none: a failing figure raises and
        leaves ``pngs`` as it was)."""
        drawn = {name: plots.figure_to_png(draw()) for name, draw in self.undrawn.items()}
        self.pngs = {**self.pngs, **drawn}
        self.undrawn = {}

    def key(self, name: str) -> str:
        """The logged key of ``name``: ``<namespace>/<name>``."""
        return f"{self.namespace}/{name}" if self.namespace else name

    def image(self, name: str) -> np.ndarray:
        """Figure ``name`` as an ``[H, W, 3]`` uint8 array (decoded once from its PNG)."""
        if name not in self._arrays:
            from PIL import Image

            with Image.open(io.BytesIO(self.pngs[name])) as png:
                self._arrays[name] = np.asarray(png.convert("RGB"))
        return self._arrays[name]


RenderFn = Callable[[str, int, Optional[torch.Tensor], Optional[torch.Tensor]], RenderedExample]


def _ranked_examples(result: Any, q: int, k: int, largest: bool) -> List[tuple]:
    """``(train_id, score, token_scores, token_mask)`` of query ``q``'s k most extreme examples.

    Prefers the ids and token scores the callback kept (``top_ids`` / ``bottom_ids``); falls back
    to ranking ``scores`` (with dense token scores, if the result has them), or to the scores a
    result with ``keep_top_scores`` kept.
    """
    prefix = "top" if largest else "bottom"
    kept_ids = result.get(f"{prefix}_ids")
    if result.scores is None:  # keep_top_scores: the kept extreme scores, by id
        ids, values = result.get(f"kept_{prefix}_ids")[q], result.get(f"kept_{prefix}_scores")[q]
        scores, columns = values, {int(i): j for j, i in enumerate(ids.tolist()) if i >= 0}
        if kept_ids is None:
            return [(int(i), float(v), None, None) for i, v in zip(ids[:k].tolist(), values[:k].tolist()) if i >= 0]
    else:
        scores = result.scores[q]
        columns = {int(train_id): j for j, train_id in enumerate(result.train_ids.tolist())}
    if kept_ids is not None:
        token_scores, token_mask = result.get(f"{prefix}_token_scores"), result.get(f"{prefix}_token_mask")
        picked = []
        for slot, train_id in enumerate(kept_ids[q, :k].tolist()):
            if train_id not in columns:
                continue
            picked.append(
                (
                    train_id,
                    float(scores[columns[train_id]]),
                    token_scores[q, slot] if token_scores is not None else None,
                    token_mask[q, slot] if token_mask is not None else None,
                )
            )
        return picked
    order = [j for j in finite_topk(scores.unsqueeze(0), k, largest).indices[0].tolist() if j >= 0]
    dense, mask = result.token_scores, result.token_mask
    return [
        (
            int(result.train_ids[j]),
            float(scores[j]),
            dense[q, j] if dense is not None else None,
            mask[j] if mask is not None else None,
        )
        for j in order
    ]


def _table_rows(result: Any, queries: Sequence[int], k: int, largest: bool, render: RenderFn) -> List[ExampleRow]:
    rows = []
    for q in queries:
        query_id = int(result.query_ids[q])
        query = render("query", query_id, None, None)
        for rank, (train_id, score, token_scores, token_mask) in enumerate(_ranked_examples(result, q, k, largest), 1):
            example = render("train", train_id, token_scores, token_mask)
            rows.append(ExampleRow(query_id, query, rank, train_id, score, example))
    return rows


def _monitoring_tables(result: Any, queries: Sequence[int], k: int, render: RenderFn) -> Dict[str, List[ExampleRow]]:
    """The self-influence ranking and, per query, the ledger's most credited examples."""
    tables: Dict[str, List[ExampleRow]] = {}
    self_scores = result.get("self_scores")
    if self_scores is not None:
        found = finite_topk(self_scores.unsqueeze(0), k)
        itself = RenderedExample(text="self-influence")
        tables["self_influence"] = [
            ExampleRow(-1, itself, rank, int(result.train_ids[j]), float(v),
                       render("train", int(result.train_ids[j]), None, None))
            for rank, (v, j) in enumerate(zip(found.values[0].tolist(), found.indices[0].tolist()), 1) if j >= 0]
    ledger_ids, ledger_scores = result.get("ledger_ids"), result.get("ledger_scores")
    if ledger_scores is not None and ledger_scores.shape[1]:
        found = finite_topk(ledger_scores, k)
        rows = []
        for q in queries:
            query_id = int(result.query_ids[q])
            query = render("query", query_id, None, None)
            rows += [ExampleRow(query_id, query, rank, int(ledger_ids[j]), float(v), render("train", int(ledger_ids[j]), None, None))
                     for rank, (v, j) in enumerate(zip(found.values[q].tolist(), found.indices[q].tolist()), 1) if j >= 0]
        tables["ledger"] = rows
    return tables


def _top_layer_scores(result: Any, q: int, count: int) -> Optional[Tuple[torch.Tensor, List[str]]]:
    """Per-layer scores ``[L, n]`` of query ``q``'s top examples and their ids as labels: from the
    dense ``layer_scores``, or from the ``top_layer_scores`` a callback result keeps."""
    if result.layer_scores is not None:
        top = torch.topk(torch.nan_to_num(result.scores[q].double()), min(count, result.num_train))
        return result.layer_scores[:, q, top.indices], [str(int(i)) for i in result.train_ids[top.indices]]
    kept, ids = result.get("top_layer_scores"), result.get("top_ids")
    if kept is None or ids is None:
        return None
    ranked = ids[q, :count] >= 0
    return kept[:, q, :count][:, ranked], [str(int(i)) for i in ids[q, :count][ranked]]


def _figures(result: Any, summary: Any, queries: Sequence[int], heatmap_examples: int,
             trajectory) -> Dict[str, Callable[[], Any]]:
    """Figure name to a function drawing it from data selected now (the drawing may run on
    another thread: it reads nothing of ``result`` but these tensors). A result with
    keep_top_scores has no histogram of every score, and its tails show the kept scores."""
    dense = result.scores is not None
    figures = {}
    if dense:
        shown = range(min(HISTOGRAM_QUERIES, result.num_queries))
        figures["score_histograms"] = partial(plots.score_histograms, [result.scores[q] for q in shown],
                                              [f"query {int(result.query_ids[q])}" for q in shown])
    for q in queries:
        query_id = int(result.query_ids[q])
        fit = summary.tail_fits[q] if q < len(summary.tail_fits) else None
        values = result.scores[q] if dense else result.get("kept_top_scores")[q]
        title = f"Influence tail, query {query_id}" + ("" if dense else f" (top {len(values)} kept)")
        figures[f"tail/q{query_id}"] = partial(plots.tail_ccdf, values, fit, title=title)
        heatmap = _top_layer_scores(result, q, heatmap_examples)
        if heatmap is not None and result.layer_names:
            figures[f"layer_heatmap/q{query_id}"] = partial(
                plots.layer_heatmap, heatmap[0], list(result.layer_names), heatmap[1],
                title=f"Influence by layer, query {query_id}")
    if summary.layer_shares is not None and summary.layer_names:
        figures["layer_shares"] = partial(plots.layer_share_bars, summary.layer_shares.nanmean(0),
                                          list(summary.layer_names))
    if trajectory is not None:
        figures["trajectory"] = partial(plots.trajectory_lines, trajectory)
    return figures


def per_query_scaled(scores: torch.Tensor) -> torch.Tensor:
    """Each query's scores divided by its mean finite |score| (a query with none stays as it is)."""
    scores = scores.double()
    finite = torch.isfinite(scores)
    counts = finite.sum(1, keepdim=True).clamp_min(1)
    scale = torch.where(finite, scores.abs(), torch.zeros_like(scores)).sum(1, keepdim=True) / counts
    return scores / torch.where(scale > 0, scale, torch.ones_like(scale))


def build_report(
    analysis: Any,
    *,
    step: int,
    namespace: str,
    render: RenderFn,
    top_k: int,
    max_queries: Optional[int],
    heatmap_examples: int,
    draw: bool = True,
) -> Report:
    """Compute the figures, tables and scalars of a run's latest result once for all sinks.

    Args:
        analysis: the run's ``compare.Analysis`` (latest result, its summary, the trajectory).
        step: the trainer's global step.
        namespace: key prefix.
        render: ``render(kind, dataset_index, token_scores, token_mask)`` with ``kind`` in
            ``"train"``/``"query"``.
        top_k: rows per query in the top and bottom tables.
        max_queries: the first ``max_queries`` queries get tables and per-query figures (``None``:
            every query).
        heatmap_examples: columns of the layer heatmap (the most influential examples).
        draw: draw the figures now; ``False`` leaves them in ``Report.undrawn`` for
            :meth:`Report.draw_figures` (e.g. on a background thread).
    """
    result, summary = analysis.result, analysis.summary
    queries = range(result.num_queries if max_queries is None else min(max_queries, result.num_queries))
    scores = per_query_scaled(result.scores).ravel() if result.scores is not None else torch.empty(0)
    report = Report(
        step=int(step),
        epoch=result.epoch,
        namespace=namespace,
        scalars={name: float(value) for name, value in {**summary.scalars, **saved_monitors(result.meta)}.items()
                 if np.isfinite(value)},
        scores=scores[torch.isfinite(scores)].numpy(),
        pngs={},
        top_rows=_table_rows(result, queries, top_k, True, render),
        bottom_rows=_table_rows(result, queries, top_k, False, render),
        trajectory=analysis.trajectory,
        tables=_monitoring_tables(result, queries, top_k, render),
        histograms={"self_scores": result.self_scores[torch.isfinite(result.self_scores)].double().numpy()}
        if result.self_scores is not None else {},
        result_path=result.path,
        undrawn=_figures(result, summary, queries, heatmap_examples, analysis.trajectory),
    )
    if draw:
        report.draw_figures()
    return report
