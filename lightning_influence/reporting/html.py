"""A static, self-contained HTML report of one influence result or a whole run.

The report is a single file that opens in any browser with no server and no network: plots are
embedded as base64 PNG data URIs, the style sheet is inline and there is no JavaScript. Every piece
of user text (ids, metadata, rendered examples) is escaped, unless a renderer returns HTML itself.
"""

from __future__ import annotations

import base64
import html
import io
import os
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import numpy as np
import torch

from lightning_influence._format import format_number
from lightning_influence._io import PathLike, write_file_atomic
from lightning_influence.analysis.compare import Analysis, RunAnalysis
from lightning_influence.reporting.glossary import describe, glossary_rows
from lightning_influence.results import InfluenceResult, load_results

Source = Union[InfluenceResult, Sequence[InfluenceResult], PathLike]

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto;
       max-width: 1100px; color: #222; line-height: 1.4; padding: 0 1em; }
h1 { border-bottom: 2px solid #444; padding-bottom: .2em; }
h2 { margin-top: 2em; border-bottom: 1px solid #bbb; }
table { border-collapse: collapse; margin: .5em 0 1em; font-size: 90%; }
th[title], td[title] { text-decoration: underline dotted #999; cursor: help; }
th, td { border: 1px solid #ccc; padding: .25em .6em; text-align: left; vertical-align: top; }
th { background: #f0f0f0; }
td.num { text-align: right; font-family: ui-monospace, monospace; }
td.pos { color: #1a7f37; } td.neg { color: #b3261e; }
.figures { display: flex; flex-wrap: wrap; gap: 1em; }
.figures img { max-width: 100%; height: auto; border: 1px solid #ddd; }
.query { border: 1px solid #ddd; border-radius: 6px; padding: .5em 1em; margin: 1em 0; }
.pair { display: flex; flex-wrap: wrap; gap: 2em; }
.example { max-width: 600px; white-space: pre-wrap; font-family: ui-monospace, monospace; }
.example img { max-width: 200px; }
.tok { border-radius: 2px; }
pre { background: #f6f6f6; padding: .5em; overflow-x: auto; }
.note { color: #666; font-size: 90%; }
.meaning { color: #555; font-size: 90%; max-width: 640px; }
dl.glossary { font-size: 90%; color: #444; max-width: 1000px; }
dl.glossary dt { font-family: ui-monospace, monospace; margin-top: .4em; }
dl.glossary dd { margin-left: 1.5em; }
.index { column-width: 16em; }
.verdict-no { color: #b3261e; }
"""


def write_html_report(
    source: Source,
    out_path: PathLike,
    *,
    train_dataset: Any = None,
    query_dataset: Any = None,
    renderer: Optional[Callable[..., Any]] = None,
    top_k: int = 10,
    max_queries: Optional[int] = None,
    title: str = "Influence report",
    allow_different_runs: bool = False,
) -> Path:
    """Write one self-contained HTML file describing influence results.

    Args:
        source: an ``InfluenceResult``, a list of results (a run, oldest first), or a path to a
            result directory or a run directory (``<dir>/step=<N>/``).
        out_path: the HTML file to write (atomically; parent directories are created).
        train_dataset: the scored training dataset (indexed by ``train_ids``); when given, the
            tables show each influential example, rendered by ``renderer``.
        query_dataset: the query dataset (indexed by ``query_ids``), shown above each query's tables.
        renderer: ``renderer(example, token_scores=None, token_mask=None)`` returning a
            ``RenderedExample`` (or a plain string); default ``reporting.render.DefaultRenderer()``.
            Its ``html`` is inserted as is (it must escape text itself); ``text`` is escaped.
        top_k: how many most positive and most negative training examples to list per query.
        max_queries: the first ``max_queries`` queries get tables and plots (the index and the
            tail-fit table cover all queries); ``None`` (default): every query.
        title: the page title.
        allow_different_runs: report results of different training runs together.

    Returns:
        The path of the written file.

    Raises:
        ValueError: if the results come from different training runs (``meta["run"]["id"]``).
    """
    if top_k < 1 or (max_queries is not None and max_queries < 1):
        raise ValueError(f"top_k and max_queries must be at least 1, got {top_k} and {max_queries}")
    results = _as_results(source)
    if renderer is None:
        from lightning_influence.reporting.render import DefaultRenderer

        renderer = DefaultRenderer()
    render = _dataset_renderer(renderer, train_dataset, query_dataset)
    shows = {kind for kind, data in (("train", train_dataset), ("query", query_dataset)) if data is not None}
    analysis = RunAnalysis(k=top_k, allow_different_runs=allow_different_runs).extend(results)
    page = _build_page(results, analysis, render, shows, top_k, max_queries, title)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    write_file_atomic(out_path, page.encode("utf-8"))
    return out_path


def _as_results(source: Source) -> List[InfluenceResult]:
    if isinstance(source, InfluenceResult):
        return [source]
    if isinstance(source, (str, os.PathLike)):
        return load_results(source)
    results = list(source)
    if not results:
        raise ValueError("write_html_report needs at least one result")
    return results


def _dataset_renderer(renderer, train_dataset, query_dataset):
    """The ``render(kind, index, token_scores, token_mask)`` that ``build_report`` expects."""
    from lightning_influence.reporting.render import RenderedExample, render_example

    datasets = {"train": train_dataset, "query": query_dataset}

    def render(kind, index, token_scores, token_mask):
        dataset = datasets[kind]
        if dataset is None:
            return RenderedExample(text="")
        return render_example(renderer, dataset[index], token_scores, token_mask)

    return render


def _build_page(results, analysis: Analysis, render, shows, top_k, max_queries, title) -> str:
    from lightning_influence.reporting.report import build_report

    latest, summary = analysis.result, analysis.summary
    report = build_report(
        analysis, step=latest.step or 0, namespace="", render=render, top_k=top_k,
        max_queries=max_queries, heatmap_examples=top_k,
    )
    sections = [
        _overview(results),
        _query_index(latest, summary, report),
        _queries_section(latest, summary, report, shows),
        _tail_section(latest, summary, report),
        _layer_section(summary, report),
    ]
    sections += [_monitoring_section(name, rows, "train" in shows) for name, rows in report.tables.items() if rows]
    if report.trajectory is not None:
        sections.append(_trajectory_section(report))
        sections.append(_comparison_section(analysis))
    body = "\n".join(sections)
    return (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        f"<title>{_esc(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
        f"<h1>{_esc(title)}</h1>\n{body}\n</body>\n</html>\n"
    )


# -- sections ----------------------------------------------------------------------------------


def _overview(results: Sequence[InfluenceResult]) -> str:
    rows = []
    for r in results:
        rows.append([
            r.step, r.epoch, r.num_queries, r.num_train, len(r.layer_names),
            r.meta.get("strategy"), _format_damping(r.meta.get("damping")), r.path,
        ])
    header = ["step", "epoch", "queries", "train examples", "layers", "strategy", "damping", "path"]
    latest_meta = {k: v for k, v in results[-1].meta.items() if isinstance(v, (str, int, float, bool))}
    meta_table = _table(["key", "value"], sorted(latest_meta.items())) if latest_meta else ""
    return (
        f"<section id=\"overview\"><h2>Run overview</h2>"
        f"<p>{len(results)} checkpoint{'s' if len(results) != 1 else ''}.</p>"
        f"{_table(header, rows)}"
        + (f"<h3>Metadata of the latest result</h3>{meta_table}" if meta_table else "")
        + "</section>"
    )


def _query_index(result, summary, report) -> str:
    """One link per query (every query, also those without tables), with its tail at a glance."""
    shown = {row.query_id for row in report.top_rows + report.bottom_rows}
    items = []
    for q, fit in enumerate(summary.tail_fits):
        query_id = int(result.query_ids[q])
        tail = "" if fit is None else f" (α {_num(fit.alpha)}{'' if fit.plausible is not False else '; power law not supported'})"
        target = f"<a href=\"#query-{query_id}\">Query {query_id}</a>" if query_id in shown else f"Query {query_id}"
        items.append(f"<li>{target}{_esc(tail)}</li>")
    hidden = result.num_queries - len(shown)
    note = (f" {hidden} queries have no tables here: write the report with a larger max_queries "
            "(command line: every query by default)." if hidden > 0 else "")
    return ("<section id=\"query-index\"><h2>Queries</h2>"
            f"<p class=\"note\">{result.num_queries} queries; each links to its most influential training "
            f"examples, its tail plot and its layer heatmap (score histograms: Heavy tail).{_esc(note)}</p>"
            f"<ul class=\"index\">{''.join(items)}</ul></section>")


def _queries_section(result, summary, report, shows) -> str:
    by_query: Dict[int, Dict[str, list]] = {}
    for which, rows in (("top", report.top_rows), ("bottom", report.bottom_rows)):
        for row in rows:
            by_query.setdefault(row.query_id, {"top": [], "bottom": []})[which].append(row)
    fits = {int(result.query_ids[q]): fit for q, fit in enumerate(summary.tail_fits)}
    parts = [
        "<section id=\"queries\"><h2>Most influential training examples</h2>"
        f"<p class=\"note\">Step {_esc(result.step)}; {len(by_query)} of {result.num_queries} queries. "
        f"{_esc(describe('score'))}</p>"
    ]
    for query_id, tables in by_query.items():
        first = (tables["top"] or tables["bottom"])[0]
        shown = f"<div class=\"example\">{_example_html(first.query)}</div>" if "query" in shows else ""
        pair = "".join(_ranked_table(query_id, which, rows, "train" in shows) for which, rows in tables.items())
        fit = fits.get(query_id)
        verdict = f"<p class=\"note\">Tail: {_esc(fit.label)}.</p>" if fit is not None else ""
        figures = _pngs(report, lambda name: name in (f"tail/q{query_id}", f"layer_heatmap/q{query_id}"))
        parts.append(
            f"<div class=\"query\" id=\"query-{query_id}\"><h3>Query {query_id}</h3>{shown}"
            f"<div class=\"pair\">{pair}</div>{verdict}<div class=\"figures\">{figures}</div>"
            "<p class=\"note\"><a href=\"#query-index\">all queries</a></p></div>"
        )
    parts.append("</section>")
    return "\n".join(parts)


_MONITORING_TITLES = {
    "self_influence": ("Highest self-influence (mislabel and memorisation candidates)",
                       "Each training example scored on itself: examples the model needs an unusually large step to fit."),
    "ledger": ("Per-step ledger: examples that moved each query in the last window",
               "Learning-rate-weighted scores of the training steps since the previous computation (TracIn-style)."),
}


def _monitoring_section(name, rows, with_examples) -> str:
    title, note = _MONITORING_TITLES.get(name, (name, ""))
    header = ["query", "rank", "train id", "score"] + (["example"] if with_examples else [])
    cells = []
    for row in rows:
        line = [_esc(row.query_id if row.query_id >= 0 else "-"), str(row.rank), _esc(row.train_id), _score_cell(row.score)]
        if with_examples:
            line.append(f"<div class=\"example\">{_example_html(row.example)}</div>")
        cells.append(line)
    return (f"<section id=\"{name}\"><h2>{_esc(title)}</h2><p class=\"note\">{_esc(note)}</p>"
            f"<table class=\"{name}\">{_header_row(header)}{''.join(_raw_row(c) for c in cells)}</table></section>")


def _ranked_table(query_id, which, rows, with_examples) -> str:
    label = "Most positive (helpful)" if which == "top" else "Most negative (harmful)"
    header = ["rank", "train id", "score"] + (["example"] if with_examples else [])
    cells = []
    for row in rows:
        line = [str(row.rank), _esc(row.train_id), _score_cell(row.score)]
        if with_examples:
            line.append(f"<div class=\"example\">{_example_html(row.example)}</div>")
        cells.append(line)
    return (
        f"<div><h4>{label}</h4><table class=\"{which}\" data-query=\"{query_id}\">"
        f"{_header_row(header, explained=True)}{''.join(_raw_row(c) for c in cells)}</table></div>"
    )


_TAIL_HEADER = ["query", "alpha", "± s.e.", "xmin", "KS", "n tail", "tail verdict", "lognormal R (p)",
                "exponential R (p)"]


def _tail_section(result, summary, report) -> str:
    rows = []
    for q, fit in enumerate(summary.tail_fits):
        if fit is None:
            rows.append([int(result.query_ids[q]), "no fit (too few positive scores)"] + [""] * 7)
            continue
        rows.append([int(result.query_ids[q]), _num(fit.alpha), _num(fit.sigma), _num(fit.xmin), _num(fit.ks),
                     fit.n_tail, fit.label, _ratio(fit.lognormal_R, fit.lognormal_p),
                     _ratio(fit.exponential_R, fit.exponential_p)])
    figures = _pngs(report, lambda name: name == "score_histograms")
    scalars = {k: v for k, v in summary.scalars.items() if not k.startswith("layer_share/")}
    plausible = summary.scalars.get("tail_plausible_fraction")
    headline = "" if plausible is None else (
        f"<p>Median tail exponent α = {_num(summary.scalars.get('tail_alpha'))}; the tail is a plausible "
        f"power law for {plausible:.0%} of the queries. Where it is not, α is only the slope of a heavy tail.</p>")
    return (
        "<section id=\"tail\"><h2>Heavy tail</h2>"
        "<p class=\"note\">Per query, a power law fitted to the top of its positive scores (Clauset-Shalizi-Newman), "
        "tested against log-normal and exponential tails; each query's tail plot is with its tables above.</p>"
        f"{headline}<div class=\"figures\">{figures}</div>"
        f"{_explained_table(_TAIL_HEADER, rows)}{_glossary(_TAIL_HEADER[1:])}"
        f"<h3>Summary</h3>{_statistics_table(scalars)}"
        "</section>"
    )


def _ratio(ratio: Optional[float], p: Optional[float]) -> str:
    return "" if ratio is None else f"{format_number(ratio, '.3g')} (p={format_number(p, '.2g')})"


def _statistics_table(scalars: Dict[str, float]) -> str:
    """Statistic, value and its meaning side by side: the glossary sits beside the numbers."""
    body = "".join(
        f"<tr><td title=\"{_esc(describe(key) or '')}\">{_esc(key)}</td><td class=\"num\">{_esc(_num(value))}</td>"
        f"<td class=\"meaning\">{_esc(describe(key) or '')}</td></tr>"
        for key, value in scalars.items())
    return f"<table class=\"statistics\">{_header_row(['statistic', 'value', 'meaning'])}{body}</table>"


def _glossary(keys: Sequence[str]) -> str:
    """The meaning of the given column names, as a definition list under their table."""
    items = "".join(f"<dt>{_esc(key)}</dt><dd>{_esc(text)}</dd>" for key, text in glossary_rows(list(keys)))
    return f"<dl class=\"glossary\">{items}</dl>" if items else ""


def _layer_section(summary, report) -> str:
    if summary.layer_shares is None or not summary.layer_names:
        return (
            "<section id=\"layers\"><h2>Layer shares</h2><p class=\"note\">This result has no "
            "per-layer scores (compute it with <code>per_layer=True</code>).</p></section>"
        )
    mean_shares = torch.as_tensor(summary.layer_shares).nanmean(0)
    figures = _pngs(report, lambda name: name == "layer_shares")
    rows = [(name, _num(share)) for name, share in zip(summary.layer_names, mean_shares.tolist())]
    return (
        "<section id=\"layers\"><h2>Layer shares</h2>"
        f"<p class=\"note\">{_esc(describe('layer_share/<layer>'))} Each query's heatmap (with its tables above) "
        "shows each layer's part of its most influential examples' scores.</p>"
        f"<div class=\"figures\">{figures}</div>{_table(['layer', 'mean share'], rows)}</section>"
    )


TRAJECTORY_COLUMNS = 8  # checkpoints per trajectory table: more are split, never scrolled sideways


def _trajectory_section(report) -> str:
    """Statistics as rows and checkpoints as columns (at most ``TRAJECTORY_COLUMNS`` per table), each
    statistic with its meaning: however many layers a model has, the table grows down, not sideways."""
    traj = report.trajectory
    names = [k for k, v in traj.items() if k != "step" and all(_is_scalar(x) for x in v)]
    steps = traj["step"]
    tables = []
    for lo in range(0, len(steps), TRAJECTORY_COLUMNS):
        chunk = range(lo, min(lo + TRAJECTORY_COLUMNS, len(steps)))
        header = _header_row(["statistic", *(f"step {steps[i]}" for i in chunk)])
        body = "".join(
            f"<tr><td title=\"{_esc(describe(name) or '')}\">{_esc(name)}</td>"
            + "".join(f"<td class=\"num\">{_esc(_num(traj[name][i]))}</td>" for i in chunk) + "</tr>"
            for name in names)
        tables.append(f"<table class=\"trajectory\">{header}{body}</table>")
    return (
        "<section id=\"trajectory\"><h2>Trajectory over checkpoints</h2>"
        f"<div class=\"figures\">{_pngs(report, lambda name: name == 'trajectory')}</div>"
        f"{''.join(tables)}{_glossary(names)}</section>"
    )


def _comparison_section(analysis: Analysis) -> str:
    c = analysis.comparison
    label_a, label_b = f"step {analysis.previous.step}", f"step {analysis.result.step}"
    correlations = [
        (name, _num(_finite_mean(values)), _num(_finite_min(values)))
        for name, values in (("Spearman", c.spearman), ("Kendall tau-b", c.kendall))
    ]
    overlap = [(k, _num(c.topk_jaccard[k]), _num(c.topk_rbo[k])) for k in c.topk_jaccard]
    shifts = [("tail_alpha", _num(c.tail_alpha[0]), _num(c.tail_alpha[1])),
              ("tail_plausible_fraction", _num(c.tail_plausible_fraction[0]), _num(c.tail_plausible_fraction[1]))]
    shifts += [(key, _num(c.concentration[0].get(key)), _num(c.concentration[1].get(key)))
               for key in ("top1pct_share", "top10pct_share", "gini", "positive_fraction")]
    changes = [(q, " ".join(map(str, entered)), " ".join(map(str, left)))
               for q, entered, left in zip(c.query_ids, c.entered, c.left)]
    layer_js = "" if c.layer_js is None else (
        f"<p title=\"{_esc(describe('drift/layer_js'))}\">Layer-share shift (Jensen-Shannon): {_num(c.layer_js)} bits.</p>")
    return (
        f"<section id=\"comparison\"><h2>Previous vs latest checkpoint ({_esc(label_a)} &rarr; {_esc(label_b)})</h2>"
        f"<p>{c.n_query} shared queries, {c.n_train} shared training examples.</p>"
        f"<div class=\"pair\">{_explained_table(['rank correlation', 'mean over queries', 'min'], correlations)}"
        f"{_explained_table(['top-k', 'Jaccard', 'RBO (p=0.9)'], overlap)}"
        f"{_table(['statistic', label_a, label_b], shifts)}</div>{layer_js}"
        f"{_glossary(['Spearman', 'Kendall tau-b', 'Jaccard', 'RBO (p=0.9)', *(row[0] for row in shifts)])}"
        f"<h3>Top-{c.k_changes} changes per query</h3>"
        f"{_table(['query', 'entered (train ids)', 'left (train ids)'], changes)}</section>"
    )


def _finite_mean(values: torch.Tensor) -> Optional[float]:
    finite = values[torch.isfinite(values)]
    return float(finite.mean()) if finite.numel() else None


def _finite_min(values: torch.Tensor) -> Optional[float]:
    finite = values[torch.isfinite(values)]
    return float(finite.min()) if finite.numel() else None


# -- rendering helpers -------------------------------------------------------------------------


def _example_html(rendered) -> str:
    """A rendered example: the renderer's own HTML, else its image, else its escaped text."""
    if rendered.html:
        return rendered.html
    if rendered.image is not None:
        return f"<img alt=\"{_esc(rendered.text)}\" src=\"{_png_data_uri(_image_png(rendered.image))}\">"
    return _esc(rendered.text)


def _image_png(image: Any) -> bytes:
    """PNG bytes of a ``RenderedExample.image``: a ``[H, W]`` or ``[H, W, C]`` uint8 array."""
    import matplotlib.image

    buf = io.BytesIO()
    matplotlib.image.imsave(buf, np.asarray(image), format="png", cmap="gray", vmin=0, vmax=255)
    return buf.getvalue()


def _pngs(report, wanted: Callable[[str], bool]) -> str:
    """``<img>`` tags for the report's figures whose names ``wanted`` accepts, in report order."""
    return "".join(
        f"<img alt=\"{_esc(name)}\" src=\"{_png_data_uri(png)}\">" for name, png in report.pngs.items() if wanted(name)
    )


def _png_data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A table of plain values, all escaped."""
    body = "".join(_raw_row([_esc(v) for v in row]) for row in rows)
    return f"<table>{_header_row(header)}{body}</table>"


def _explained_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A table of plain values whose column headers carry their meaning as a tooltip."""
    body = "".join(_raw_row([_esc(v) for v in row]) for row in rows)
    return f"<table>{_header_row(header, explained=True)}{body}</table>"


def _header_row(header: Sequence[str], explained: bool = False) -> str:
    cells = []
    for h in header:
        meaning = describe(h) if explained else None
        cells.append(f"<th title=\"{_esc(meaning)}\">{_esc(h)}</th>" if meaning else f"<th>{_esc(h)}</th>")
    return "<tr>" + "".join(cells) + "</tr>"


def _raw_row(cells: Sequence[str]) -> str:
    """A row of ready HTML cells; a cell that is already a ``<td ...>`` (scores) is kept as is."""
    return "<tr>" + "".join(c if c.startswith("<td") else f"<td>{c}</td>" for c in cells) + "</tr>"


def _score_cell(score: float) -> str:
    sign = "pos" if score > 0 else "neg" if score < 0 else ""
    return f"<td class=\"num {sign}\">{format_number(score)}</td>"


def _format_damping(damping: Any) -> Any:
    if isinstance(damping, dict):  # per-layer heuristic values
        return f"per layer ({len(damping)})"
    return damping


def _is_scalar(value: Any) -> bool:
    return value is None or isinstance(value, (int, float, str, bool))


def _num(value: Any) -> str:
    """A number for an HTML cell: undefined ones are left blank."""
    return format_number(value, missing="")


def _esc(value: Any) -> str:
    return html.escape("" if value is None else str(value))


__all__ = ["write_html_report"]
