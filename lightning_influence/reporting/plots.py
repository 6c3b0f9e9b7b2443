"""Matplotlib figures of an influence result: the pictures the paper draws, for any run.

Every function builds a ``matplotlib.figure.Figure`` directly (never through ``pyplot``), so no
figure is registered in pyplot's global state: nothing needs closing, nothing leaks across the
many checkpoints of a long run, and no display backend is ever touched. Convert with
``figure_to_png`` / ``figure_to_array`` for loggers.
"""

from __future__ import annotations

import io
import math
from typing import Any, Mapping, Optional, Sequence

import numpy as np
import torch

from lightning_influence._format import format_number

__all__ = [
    "figure_to_array",
    "figure_to_png",
    "layer_heatmap",
    "layer_share_bars",
    "score_histograms",
    "tail_ccdf",
    "trajectory_lines",
]

_DPI = 100
# Trajectory series that are clocks, not statistics: plotted against the step they would waste a panel.
NOT_PLOTTED = ("step", "epoch")


def _new_figure(width: float = 6.0, height: float = 4.0):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=_DPI, layout="constrained")


def _as_numpy(values: Any) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().double().numpy()
    return np.asarray(values, dtype=np.float64)


def _empty_note(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="0.4")


def tail_ccdf(values: Any, fit: Optional[Any] = None, *, title: str = "Influence tail"):
    """Log-log complementary CDF of the positive scores, with the fitted power law from ``xmin``.

    Args:
        values: 1-D scores (tensor or array); only positive finite values are plotted, as the
            paper fits the tail of positive influence.
        fit: an object with ``alpha`` and ``xmin`` (e.g. ``analysis.PowerLawFit``), or ``None``; a
            fit whose ``plausible`` is ``False`` is drawn dashed and labelled with its ``label``.
        title: axes title.

    Returns:
        A ``matplotlib.figure.Figure``.
    """
    fig = _new_figure()
    ax = fig.add_subplot()
    x = _as_numpy(values).ravel()
    x = np.sort(x[np.isfinite(x) & (x > 0)])
    ax.set_title(title)
    if x.size == 0:
        _empty_note(ax, "no positive scores")
        return fig
    ccdf = 1.0 - np.arange(x.size) / x.size  # P(X >= x_i) for sorted x_i
    ax.loglog(x, ccdf, ".", markersize=3, color="tab:blue", label=f"positive scores (n={x.size})")
    alpha = getattr(fit, "alpha", None)
    xmin = getattr(fit, "xmin", None)
    if alpha is not None and xmin is not None and xmin > 0 and math.isfinite(alpha) and x[-1] > xmin:
        tail_mass = float(np.mean(x >= xmin))  # the fitted law describes the tail's conditional CCDF
        line_x = np.geomspace(xmin, x[-1], 50)
        line_y = tail_mass * (line_x / xmin) ** (1.0 - alpha)
        plausible = getattr(fit, "plausible", None) is not False
        name = "power law" if plausible else fit.label  # never call a tail a power law the tests reject
        ax.loglog(line_x, line_y, "-" if plausible else "--", color="tab:red" if plausible else "0.45",
                  label=f"{name}\nslope α={format_number(alpha, '.2f')}, xmin={format_number(xmin, '.3g')}")
        ax.axvline(xmin, color="tab:red" if plausible else "0.45", linestyle=":", linewidth=1)
    ax.set_xlabel("influence score")
    ax.set_ylabel("P(score ≥ x)")
    ax.legend(loc="lower left", fontsize="small")
    return fig


def layer_heatmap(
    layer_scores_q: Any,
    layer_names: Sequence[str],
    example_labels: Optional[Sequence[str]] = None,
    *,
    title: str = "Influence by layer",
):
    """Layers x most influential sequences, as in the paper: where in depth the influence sits.

    Args:
        layer_scores_q: ``[n_layers, n_top]`` per-layer scores of one query's top examples.
        layer_names: row labels, one per layer (bottom layer first).
        example_labels: column labels (e.g. train ids), one per example.
        title: axes title.

    Returns:
        A ``matplotlib.figure.Figure`` with a diverging colour map centred on zero.
    """
    data = _as_numpy(layer_scores_q)
    if data.ndim != 2 or data.shape[0] != len(layer_names):
        raise ValueError(f"layer_scores_q must be [len(layer_names)={len(layer_names)}, n_top], got {data.shape}")
    n_layers, n_top = data.shape
    label_inches = 0.07 * max((len(name) for name in layer_names), default=0)  # room for long layer names
    fig = _new_figure(max(4.0, 1.5 + 0.4 * n_top) + label_inches, max(3.0, 1.0 + 0.3 * n_layers))
    ax = fig.add_subplot()
    finite = data[np.isfinite(data)]
    bound = float(np.abs(finite).max()) if finite.size else 0.0
    bound = bound if bound > 0 else 1.0
    image = ax.imshow(data, aspect="auto", cmap="RdBu_r", vmin=-bound, vmax=bound, interpolation="nearest")
    ax.set_yticks(range(n_layers), labels=list(layer_names), fontsize="small")
    labels = list(example_labels) if example_labels is not None else [str(i) for i in range(n_top)]
    ax.set_xticks(range(n_top), labels=labels, rotation=90, fontsize="small")
    ax.set_xlabel("training example (most influential first)")
    ax.set_title(title)
    fig.colorbar(image, ax=ax, label="influence")
    return fig


def layer_share_bars(shares: Any, layer_names: Sequence[str], *, title: str = "Layer share of influence"):
    """Horizontal bars of each layer's share ``|s_l| / sum_l |s_l|`` of the influence.

    Args:
        shares: ``[n_layers]`` shares (summing to about 1).
        layer_names: bar labels, one per layer.
        title: axes title.

    Returns:
        A ``matplotlib.figure.Figure``.
    """
    values = _as_numpy(shares).ravel()
    if values.shape[0] != len(layer_names):
        raise ValueError(f"got {values.shape[0]} shares for {len(layer_names)} layer names")
    fig = _new_figure(6.0, max(2.5, 0.8 + 0.3 * len(layer_names)))
    ax = fig.add_subplot()
    positions = np.arange(len(layer_names))
    ax.barh(positions, values, color="tab:purple")
    ax.set_yticks(positions, labels=list(layer_names), fontsize="small")
    ax.invert_yaxis()  # first layer on top, reading down the network
    ax.set_xlabel("share of |influence|")
    ax.set_xlim(0, max(1e-12, float(np.nanmax(values)) * 1.1) if values.size else 1)
    ax.set_title(title)
    return fig


def score_histograms(rows: Sequence[Any], labels: Sequence[str], *, bins: int = 40, columns: int = 4,
                     title: str = "Influence scores per query"):
    """One histogram per query, each on its own x scale: the scale of scores differs from query to
    query (it follows the query's gradient), so a pooled histogram shows the largest query only.

    Args:
        rows: per query, its scores (any 1-D array or tensor); non-finite values are dropped.
        labels: a title per query (e.g. ``"query 3"``).
        bins: bins per histogram.
        columns: histograms per row of the grid.
        title: figure title.

    Returns:
        A ``matplotlib.figure.Figure`` (log count axes; a grey line at zero).
    """
    if len(rows) != len(labels):
        raise ValueError(f"got {len(rows)} score rows for {len(labels)} labels")
    columns = max(1, min(columns, len(rows)))
    grid_rows = max(1, math.ceil(len(rows) / columns))
    fig = _new_figure(3.0 * columns, 2.2 * grid_rows + 0.4)
    fig.suptitle(title)
    if not rows:
        _empty_note(fig.add_subplot(), "no scores")
        return fig
    for i, (values, label) in enumerate(zip(rows, labels)):
        ax = fig.add_subplot(grid_rows, columns, i + 1)
        values = _as_numpy(values).ravel()
        values = values[np.isfinite(values)]
        ax.set_title(label, fontsize="small")
        ax.tick_params(labelsize="x-small")
        if values.size == 0:
            _empty_note(ax, "no finite scores")
            continue
        ax.hist(values, bins=bins, color="tab:blue", log=True)
        ax.axvline(0.0, color="0.3", linewidth=1)
    fig.supxlabel("influence score (each panel its own scale)", fontsize="small")
    fig.supylabel("count", fontsize="small")
    return fig


def trajectory_lines(traj: Mapping[str, Sequence[Any]], *, title: str = "Influence over training"):
    """Line plots of summary statistics over checkpoints (``compare.trajectory`` output).

    Each statistic gets its own panel (the epoch, a clock like the step, gets none); all
    ``layer_share/<layer>`` series share one panel so the layers can be compared, with the legend
    beside it. ``None`` entries (e.g. a query with no tail fit) become gaps.

    Args:
        traj: ``{"step": [...], name: [value per step], ...}``.
        title: figure title.

    Returns:
        A ``matplotlib.figure.Figure``.
    """
    if "step" not in traj:
        raise ValueError("trajectory needs a 'step' series")
    steps = _as_numpy([np.nan if s is None else s for s in traj["step"]])
    series = {k: v for k, v in traj.items() if k not in NOT_PLOTTED}
    layer_keys = sorted(k for k in series if k.startswith("layer_share/"))
    panels = [[k] for k in series if k not in layer_keys] + ([layer_keys] if layer_keys else [])
    cols = min(3, max(1, len(panels)))
    rows = max(1, math.ceil(len(panels) / cols))
    fig = _new_figure(4.0 * cols, 3.0 * rows)
    fig.suptitle(title)
    if not panels:
        _empty_note(fig.add_subplot(), "no statistics")
        return fig
    for i, keys in enumerate(panels):
        ax = fig.add_subplot(rows, cols, i + 1)
        for key in keys:
            values = _as_numpy([np.nan if v is None else v for v in series[key]])
            ax.plot(steps, values, marker="o", markersize=3, label=key.removeprefix("layer_share/"))
        ax.set_title("layer_share" if keys is layer_keys else keys[0], fontsize="medium")
        ax.set_xlabel("step")
        if np.isfinite(steps).sum() > 1:  # one step axis for every panel, also where a series starts late
            low, high = np.nanmin(steps), np.nanmax(steps)
            ax.set_xlim(low - 0.05 * (high - low), high + 0.05 * (high - low))
        if keys is layer_keys:  # beside the axes, never over the lines
            ax.legend(fontsize="x-small", loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)
    return fig


def figure_to_png(fig) -> bytes:
    """Encode a figure as PNG bytes (for files, HTML data URIs and loggers)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=_DPI)
    return buffer.getvalue()


def figure_to_array(fig) -> np.ndarray:
    """Render a figure to an ``[H, W, 3]`` uint8 RGB array (for TensorBoard and image loggers)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()
