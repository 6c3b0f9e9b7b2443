"""Plots, example rendering and the logger-agnostic parts of ``ResultPublisher``."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from lightning_influence.reporting import plots

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _pareto(alpha: float, n: int, seed: int = 0) -> np.ndarray:
    """Continuous power law with density exponent ``alpha`` and xmin 1."""
    return np.random.default_rng(seed).pareto(alpha - 1.0, n) + 1.0


def _check_png(fig) -> np.ndarray:
    png = plots.figure_to_png(fig)
    assert png.startswith(PNG_MAGIC) and len(png) > 2000
    array = plots.figure_to_array(fig)
    assert array.dtype == np.uint8 and array.ndim == 3 and array.shape[2] == 3
    assert array.std() > 0, "figure rendered as a blank image"
    return array


@pytest.mark.parametrize(
    "make",
    [
        lambda: plots.layer_heatmap(torch.randn(3, 5), ["a", "b", "c"], [f"#{i}" for i in range(5)]),
        lambda: plots.layer_share_bars(torch.tensor([0.2, 0.3, 0.5]), ["a", "b", "c"]),
        lambda: plots.score_histogram(torch.randn(4, 50)),
        lambda: plots.trajectory_lines(
            {"step": [1, 2, 3], "tail_alpha": [2.0, None, 2.4], "layer_share/a": [0.4, 0.5, 0.6],
             "layer_share/b": [0.6, 0.5, 0.4]}
        ),
        lambda: plots.tail_ccdf(-np.ones(10)),  # nothing positive: an explanatory note, no crash
    ],
    ids=["heatmap", "share_bars", "histogram", "trajectory", "tail_empty"],
)
def test_each_plot_renders_a_png(make):
    _check_png(make())


def test_plots_do_not_register_global_figures():
    import matplotlib.pyplot as plt

    before = set(plt.get_fignums())
    plots.figure_to_png(plots.score_histogram(torch.randn(100)))
    assert set(plt.get_fignums()) == before


def test_tail_ccdf_draws_the_fitted_power_law_through_pareto_data():
    values = _pareto(2.5, 5000)
    fig = plots.tail_ccdf(values, SimpleNamespace(alpha=2.5, xmin=1.0))
    _check_png(fig)
    ax = fig.axes[0]
    assert ax.get_xscale() == "log" and ax.get_yscale() == "log"
    data_line, fit_line = ax.get_lines()[:2]
    # Empirical CCDF of every positive value, starting at 1.
    assert len(data_line.get_xdata()) == 5000 and data_line.get_ydata()[0] == pytest.approx(1.0)
    # The fitted line has slope 1 - alpha on log-log axes and starts at xmin.
    fx, fy = np.asarray(fit_line.get_xdata()), np.asarray(fit_line.get_ydata())
    slope = np.polyfit(np.log(fx), np.log(fy), 1)[0]
    assert fx[0] == pytest.approx(1.0) and slope == pytest.approx(-1.5, abs=1e-9)
    # ... and it follows the data: at the median, the empirical and fitted CCDF agree.
    median = float(np.median(values))
    assert np.interp(np.log(median), np.log(fx), np.log(fy)) == pytest.approx(np.log(0.5), abs=0.1)


def test_layer_heatmap_is_centred_on_zero_and_checks_shapes():
    fig = plots.layer_heatmap(torch.tensor([[1.0, -3.0], [0.5, 2.0]]), ["l0", "l1"], ["7", "9"])
    image = fig.axes[0].get_images()[0]
    assert image.get_clim() == (-3.0, 3.0)
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == ["l0", "l1"]
    with pytest.raises(ValueError, match="layer_names"):
        plots.layer_heatmap(torch.zeros(3, 2), ["only", "two"])
