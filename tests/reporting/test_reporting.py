"""Plots, example rendering and the logger-agnostic parts of ``ResultPublisher``."""

from __future__ import annotations

import csv as csv_module
import json
from pathlib import Path
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
        lambda: plots.score_histograms(list(torch.randn(4, 50)), [f"query {q}" for q in range(4)]),
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
    plots.figure_to_png(plots.score_histograms([torch.randn(100)], ["query 0"]))
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


def test_score_histograms_give_each_query_its_own_scale():
    """One query's scores at 1e4 must not flatten the others into a single bin."""
    small, large = torch.randn(200), 1e4 * torch.randn(200)
    fig = plots.score_histograms([small, large], ["query 0", "query 1"])
    panels = [ax for ax in fig.axes if ax.get_title().startswith("query")]
    assert [ax.get_title() for ax in panels] == ["query 0", "query 1"]
    small_range, large_range = (np.diff(ax.get_xlim())[0] for ax in panels)
    assert large_range > 1000 * small_range


def test_trajectory_spends_no_panel_on_the_epoch_and_keeps_the_legend_off_the_lines():
    fig = plots.trajectory_lines({"step": [1, 2, 3], "epoch": [0, 1, 2], "tail_alpha": [2.0, 2.2, 2.4],
                                  **{f"layer_share/block.{i}": [0.1 * i, 0.1 * i, 0.1 * i] for i in range(8)}})
    titles = [ax.get_title() for ax in fig.axes]
    assert titles == ["tail_alpha", "layer_share"]
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    renderer = FigureCanvasAgg(fig).get_renderer()
    layer_axes = fig.axes[1]
    legend_box = layer_axes.get_legend().get_window_extent(renderer)
    axes_box = layer_axes.get_window_extent(renderer)
    assert legend_box.x0 >= axes_box.x1  # beside the axes, not over the lines


def test_tail_ccdf_never_calls_a_rejected_tail_a_power_law():
    values = _pareto(2.5, 2000)
    rejected = SimpleNamespace(alpha=2.5, xmin=1.0, plausible=False,
                               label="heavy tail, power law not supported (lognormal favoured)")
    labels = [text.get_text() for text in plots.tail_ccdf(values, rejected).axes[0].get_legend().get_texts()]
    assert any(label.startswith("heavy tail, power law not supported (lognormal favoured)") for label in labels)
    assert not any(label.startswith("power law") for label in labels)


def test_layer_heatmap_is_centred_on_zero_and_checks_shapes():
    fig = plots.layer_heatmap(torch.tensor([[1.0, -3.0], [0.5, 2.0]]), ["l0", "l1"], ["7", "9"])
    image = fig.axes[0].get_images()[0]
    assert image.get_clim() == (-3.0, 3.0)
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == ["l0", "l1"]
    with pytest.raises(ValueError, match="layer_names"):
        plots.layer_heatmap(torch.zeros(3, 2), ["only", "two"])


# -- rendering examples ---------------------------------------------------------------------------

from lightning_influence.reporting import DefaultRenderer, ResultPublisher, highlight_tokens  # noqa: E402
from lightning_influence.reporting.publisher import REPORT_DIR, SUMMARY_FILE  # noqa: E402
from tests.reporting_helpers import LAYERS, PLANTED, decode, make_result, token_dataset  # noqa: E402


@pytest.mark.parametrize(
    "example, shape",
    [
        (torch.rand(3, 8, 5), (8, 5, 3)),  # CHW colour
        (torch.rand(1, 8, 5), (8, 5)),  # CHW grey
        (torch.randint(0, 256, (7, 6), dtype=torch.uint8), (7, 6)),  # HW, MNIST-like
        ((torch.randn(1, 4, 4) * 3, 7), (4, 4)),  # (image, label) pair, normalised floats
    ],
)
def test_default_renderer_turns_image_tensors_into_uint8_images(example, shape):
    rendered = DefaultRenderer()(example)
    assert rendered.image.dtype == np.uint8 and rendered.image.shape == shape
    assert rendered.image.min() >= 0 and rendered.image.max() <= 255 and rendered.html is None
    if isinstance(example, tuple):
        assert rendered.text.endswith("(target: 7)") and rendered.image.max() == 255 and rendered.image.min() == 0


def test_default_renderer_keeps_uint8_pixels_and_01_brightness():
    pixels = torch.randint(0, 256, (5, 5), dtype=torch.uint8)
    assert np.array_equal(DefaultRenderer()(pixels).image, pixels.numpy())
    dim = torch.full((1, 3, 3), 0.5)  # a uniformly mid-grey [0, 1] image is not stretched to white
    assert (DefaultRenderer()(dim).image == 128).all()


def test_tokens_are_highlighted_red_for_positive_blue_for_negative_and_escaped():
    ids = torch.tensor([1, 2, 3, 4])
    scores = torch.tensor([2.0, -1.0, 0.0, 5.0])
    mask = torch.tensor([True, True, True, False])
    rendered = DefaultRenderer(decode=lambda ids: [f"<{i}>" for i in ids])({"input_ids": ids}, scores, mask)
    assert rendered.text == "<1><2><3><4>"
    spans = rendered.html.split("<span")[1:]
    assert "rgba(220,40,40,1.000)" in spans[0] and "&lt;1&gt;" in spans[0]  # the largest valid |score|
    assert "rgba(40,90,220,0.500)" in spans[1]
    assert "color:#999" in spans[3]  # masked: no colour even though its score is the largest
    assert "<4>" not in rendered.html


def test_token_ids_without_decode_and_other_examples():
    rendered = DefaultRenderer()(torch.tensor([5, 6, 7]))
    assert rendered.text == "5 6 7" and rendered.html.count("<span") == 3
    assert highlight_tokens(["a", "b"]).count('style=""') == 2  # no scores: no highlighting
    assert DefaultRenderer()(torch.tensor([0.5, 1.5])).text == "[0.5, 1.5]"
    assert DefaultRenderer()("plain text").text == "'plain text'"
    long = DefaultRenderer(max_tokens=4)(torch.arange(10))
    assert long.text == "0 1 2 3"


# -- publishing: files on disk, loggers, failures ---------------------------------------------------


def test_publish_without_loggers_writes_plots_and_summary(tmp_path):
    from lightning_influence.analysis import summarize

    result = make_result(40, path=tmp_path / "step=40")
    publisher = ResultPublisher(renderer=DefaultRenderer(decode=decode), top_k=3, max_queries=2)
    summary = publisher.publish(result, step=40, train_dataset=token_dataset())
    report = tmp_path / "step=40" / REPORT_DIR
    payload = json.loads((report / SUMMARY_FILE).read_text())
    assert payload["scalars"] == pytest.approx(summarize(result).scalars) == summary.scalars
    assert payload["step"] == 40 and payload["layer_names"] == LAYERS
    for name in payload["figures"].values():
        assert (report / name).read_bytes().startswith(PNG_MAGIC)
    assert set(payload["figures"]) == {
        "score_histograms", "layer_shares", "tail/q5", "tail/q6", "layer_heatmap/q5", "layer_heatmap/q6"
    }
    top = [row for row in payload["top_examples"] if row["query_id"] == 5]
    assert [row["train_id"] for row in top] == result.top_k(3).indices[0].tolist()
    assert top[0]["train_id"] == PLANTED and top[0]["rank"] == 1
    assert top[0]["example"] == f"train #{PLANTED}: t{PLANTED % 97} t1 t1 t1 t1 t1 "
    bottom = [row for row in payload["bottom_examples"] if row["query_id"] == 6]
    assert [row["train_id"] for row in bottom] == result.top_k(3, largest=False).indices[1].tolist()
    assert not list(report.glob(".*")), "temporary files left behind"


def test_publish_respects_write_files_and_unsaved_results(tmp_path):
    result = make_result(1, path=tmp_path / "r")
    ResultPublisher(write_files=False, max_queries=1).publish(result, step=1)
    assert not (tmp_path / "r" / REPORT_DIR).exists()
    later = make_result(2, seed=1, path=tmp_path / "later")
    ResultPublisher(max_queries=1).publish(later, step=2, history=[result])
    payload = json.loads((tmp_path / "later" / REPORT_DIR / SUMMARY_FILE).read_text())
    assert payload["trajectory"]["step"] == [1, 2] and payload["figures"]["trajectory"] == "trajectory.png"
    assert (tmp_path / "later" / REPORT_DIR / "trajectory.png").read_bytes().startswith(PNG_MAGIC)
    summary = ResultPublisher(max_queries=1).publish(make_result(1), step=1)  # no path: nothing to write, no error
    assert "gini" in summary.scalars


def test_user_renderer_strings_and_failures_degrade_to_ids(tmp_path):
    result = make_result(3, path=tmp_path / "r", tokens=False)
    ResultPublisher(renderer=lambda example, **_: f"EX{example['input_ids'][0]}", max_queries=1).publish(
        result, step=3, train_dataset=token_dataset()
    )
    rows = json.loads((tmp_path / "r" / REPORT_DIR / SUMMARY_FILE).read_text())["top_examples"]
    assert rows[0]["example"] == f"train #{PLANTED}: EX{PLANTED % 97}"

    def broken(example, **_):
        raise KeyError("no such field")

    publisher = ResultPublisher(renderer=broken, max_queries=1)
    with pytest.warns(RuntimeWarning, match="rendering train #.* failed.*KeyError") as caught:
        publisher.publish(result, step=3, train_dataset=token_dataset())
    assert len([w for w in caught if "rendering" in str(w.message)]) == 1
    rows = json.loads((tmp_path / "r" / REPORT_DIR / SUMMARY_FILE).read_text())["top_examples"]
    assert rows[0]["example"] == f"train #{PLANTED}"


class BrokenLogger:
    """A logger whose every call fails, like one whose network or quota is gone."""

    calls = 0

    def log_metrics(self, metrics, step=None):
        BrokenLogger.calls += 1
        raise ConnectionError("network is unreachable")


def test_a_failing_logger_warns_once_and_never_stops_the_others(tmp_path):
    from pytorch_lightning.loggers import CSVLogger

    csv = CSVLogger(tmp_path / "csv", name="run")
    publisher = ResultPublisher([BrokenLogger(), csv], max_queries=1)
    with pytest.warns(RuntimeWarning) as caught:
        for step in (10, 20):
            publisher.publish(make_result(step, seed=step, path=tmp_path / f"step={step}"), step=step)
    messages = [str(w.message) for w in caught if "lightning-influence" in str(w.message)]
    assert len(messages) == 1 and BrokenLogger.calls == 1
    assert "BrokenLogger" in messages[0] and "ConnectionError: network is unreachable" in messages[0]
    assert publisher.active_loggers == ["CSVLogger"]
    for step in (10, 20):  # files complete regardless
        report = tmp_path / f"step={step}" / REPORT_DIR
        assert json.loads((report / SUMMARY_FILE).read_text())["step"] == step
        assert (report / "score_histograms.png").is_file()
    rows = list(csv_module.DictReader(open(Path(csv.log_dir) / "metrics.csv")))
    assert [int(r["step"]) for r in rows] == [10, 20]
    assert all(float(r["influence/gini"]) > 0 for r in rows)


def test_tensorboard_receives_scalars_histogram_images_and_tables(tmp_path):
    from pytorch_lightning.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = TensorBoardLogger(tmp_path, name="tb")
    publisher = ResultPublisher([logger], max_queries=1)
    summaries = [publisher.publish(make_result(s, seed=s, path=tmp_path / f"s{s}"), step=s) for s in (5, 15)]
    events = EventAccumulator(logger.log_dir, size_guidance={"images": 0, "histograms": 0, "tensors": 0})
    events.Reload()
    tags = events.Tags()
    alpha = events.Scalars("influence/tail_alpha")
    assert [e.step for e in alpha] == [5, 15]
    assert [e.value for e in alpha] == pytest.approx([s.scalars["tail_alpha"] for s in summaries], rel=1e-6)
    assert {f"influence/layer_share/{name}" for name in LAYERS} <= set(tags["scalars"])
    assert [h.histogram_value.num for h in events.Histograms("influence/scores")] == [180, 180]
    assert {"influence/score_histograms", "influence/tail/q5", "influence/layer_heatmap/q5"} <= set(tags["images"])
    assert events.Images("influence/tail/q5")[-1].encoded_image_string.startswith(PNG_MAGIC)
    text = events.Tensors("influence/top_examples/text_summary")[0].tensor_proto.string_val[0].decode()
    assert f"| {PLANTED} |" in text


def test_unknown_logger_types_are_refused_up_front():
    with pytest.raises(TypeError, match="log_metrics"):
        ResultPublisher([object()])
    with pytest.raises(ValueError, match="positive"):
        ResultPublisher(top_k=0)


class RecordingSink:
    """A user's own sink: anything with a name and ``publish(report)``."""

    name = "recording"

    def __init__(self) -> None:
        self.steps, self.scalars = [], []

    def publish(self, report) -> None:
        self.steps.append(report.step)
        self.scalars.append(dict(report.scalars))


class SlackLikeClient:
    """A logger the package knows nothing about (no log_metrics): published to through a registered sink."""

    def __init__(self) -> None:
        self.messages = []


def test_a_sink_is_published_to_as_it_is_and_a_registered_sink_serves_its_logger(tmp_path, monkeypatch):
    import lightning_influence as li
    from lightning_influence.reporting import sinks

    monkeypatch.setattr(sinks, "_RECOGNISERS", [])  # registrations last for the process: undo this test's
    own = RecordingSink()
    client = SlackLikeClient()
    with pytest.raises(TypeError, match="register_sink"):
        ResultPublisher([client])

    class MessageSink:
        name = "messages"

        def __init__(self, target, log_artifacts):
            self.target = target

        def publish(self, report):
            self.target.messages.append(f"step {report.step}: {len(report.scalars)} numbers")

    li.register_sink(lambda logger: isinstance(logger, SlackLikeClient), MessageSink)
    assert isinstance(own, li.Sink) and not isinstance(client, li.Sink)
    publisher = ResultPublisher([own, client], max_queries=1)
    for step in (10, 20):
        summary = publisher.publish(make_result(step, seed=step, path=tmp_path / f"step={step}"), step=step)
    assert own.steps == [10, 20] and own.scalars[-1] == summary.scalars
    assert [m.split(":")[0] for m in client.messages] == ["step 10", "step 20"]
    assert publisher.active_loggers == ["recording", "messages"]
