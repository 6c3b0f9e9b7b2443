"""Report figures drawn and files written off the training thread: ``publish`` returns before the
figures exist, loggers get the reports in step order on the publishing thread, a slow worker holds
back the publisher instead of piling up reports, failures are warned about, and everything is
complete (with no worker thread left) after ``flush`` and at the end of a training run."""

from __future__ import annotations

import json
import threading
import warnings

import pytest

from lightning_influence.reporting import plots
from lightning_influence.reporting.publisher import REPORT_DIR, SUMMARY_FILE, WORKER_NAME, ResultPublisher
from tests.reporting_helpers import make_result

WAIT_S = 10.0  # generous bound for a blocked call to be released on a busy machine


def worker_threads():
    return [thread for thread in threading.enumerate() if thread.name.startswith(WORKER_NAME)]


class RecordingLogger:
    """A Lightning-style logger remembering each call's step and thread."""

    def __init__(self):
        self.steps, self.threads = [], []

    def log_metrics(self, metrics, step=None):
        self.steps.append(step)
        self.threads.append(threading.current_thread())


@pytest.fixture
def gated_histogram(monkeypatch):
    """``plots.score_histograms`` blocked until the returned event is set (a deliberately slow figure);
    records the threads it ran on."""
    release, threads = threading.Event(), []
    original = plots.score_histograms

    def slow(*args, **kwargs):
        threads.append(threading.current_thread())
        assert release.wait(WAIT_S), "the test never released the figure"
        return original(*args, **kwargs)

    monkeypatch.setattr(plots, "score_histograms", slow)
    return release, threads


def test_publish_returns_before_slow_figures_and_flush_completes_every_file(tmp_path, gated_histogram):
    release, threads = gated_histogram
    logger = RecordingLogger()
    publisher = ResultPublisher([logger], max_queries=2, background=True)
    result = make_result(40, path=tmp_path / "step=40")
    summary = publisher.publish(result, step=40)  # returns although the histogram is blocked
    report = tmp_path / "step=40" / REPORT_DIR
    assert "gini" in summary.scalars and publisher.pending == 1
    assert not (report / SUMMARY_FILE).exists() and logger.steps == []
    publisher.deliver_ready()  # never waits: the report is not complete
    assert logger.steps == []
    release.set()
    publisher.flush()
    payload = json.loads((report / SUMMARY_FILE).read_text())
    assert set(payload["figures"]) == {"score_histograms", "layer_shares", "tail/q5", "tail/q6",
                                       "layer_heatmap/q5", "layer_heatmap/q6"}
    assert all((report / name).is_file() for name in payload["figures"].values())
    assert threads and threads[0] is not threading.main_thread()  # drawn by the worker
    assert logger.steps == [40] and logger.threads == [threading.main_thread()]  # logged on this thread
    assert publisher.pending == 0 and worker_threads() == []


def test_reports_are_logged_in_step_order_and_a_slow_worker_holds_back_the_publisher(tmp_path, gated_histogram):
    release, _ = gated_histogram
    logger = RecordingLogger()
    publisher = ResultPublisher([logger], max_queries=1, background=True, max_pending=2)
    history = []
    for step in (10, 20):
        history.append(make_result(step, seed=step, path=tmp_path / f"step={step}"))
        publisher.publish(history[-1], step=step, history=history)
    history.append(make_result(30, seed=30, path=tmp_path / "step=30"))
    third = threading.Thread(target=publisher.publish, args=(history[-1],), kwargs=dict(step=30, history=history))
    third.start()
    third.join(0.3)
    assert third.is_alive() and logger.steps == []  # two pending: the third publish waits
    release.set()
    third.join(WAIT_S)
    assert not third.is_alive()
    publisher.flush()
    assert logger.steps == [10, 20, 30]
    for step in (10, 20, 30):
        payload = json.loads((tmp_path / f"step={step}" / REPORT_DIR / SUMMARY_FILE).read_text())
        assert payload["step"] == step
    assert payload["trajectory"]["step"] == [10, 20, 30]
    assert worker_threads() == []


def test_a_failing_figure_is_warned_about_and_the_report_still_logged(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise ValueError("no font for these glyphs")

    monkeypatch.setattr(plots, "tail_ccdf", broken)
    logger = RecordingLogger()
    publisher = ResultPublisher([logger], max_queries=1, background=True)
    publisher.publish(make_result(5, path=tmp_path / "step=5"), step=5)
    with pytest.warns(RuntimeWarning, match=r"report of step 5 in the background failed \(ValueError: no font"):
        publisher.flush()
    assert logger.steps == [5]  # the numbers still reach the loggers
    monkeypatch.undo()
    publisher.publish(make_result(6, path=tmp_path / "step=6"), step=6)  # the publisher goes on working
    publisher.flush()
    assert logger.steps == [5, 6] and (tmp_path / "step=6" / REPORT_DIR / "tail_q5.png").is_file()


def test_synchronous_publishing_is_unchanged(tmp_path, gated_histogram):
    release, threads = gated_histogram
    release.set()
    logger = RecordingLogger()
    ResultPublisher([logger], max_queries=1).publish(make_result(3, path=tmp_path / "r"), step=3)
    assert (tmp_path / "r" / REPORT_DIR / "score_histograms.png").is_file() and logger.steps == [3]
    assert threads == [threading.main_thread()] and worker_threads() == []


# -- in a training run --------------------------------------------------------------------------------
# Two computations (steps 6 and 12 of one 12-step epoch), one query: five figures each, to keep the runs short.
TRAINING_REPORTS = dict(report=dict(mode="background"), num_queries=1, every_n_epochs=None, every_n_train_steps=6,
                        on_checkpoint=False, on_train_end=False)


def _fit_with_reports(tmp_path, callbacks=(), model=None, **settings):
    from pytorch_lightning.loggers import CSVLogger

    from tests.callback_models import merged_settings
    from tests.reliability_helpers import fit, make_callback

    cb = make_callback(tmp_path, **merged_settings(TRAINING_REPORTS, settings))
    csv = CSVLogger(str(tmp_path / "csv"), name="run")
    fit(tmp_path, cb, model=model, max_epochs=1, logger=csv, callbacks=callbacks)
    return cb, csv


def test_a_training_run_ends_with_every_report_complete_and_logged_in_order(tmp_path, monkeypatch):
    import csv as csv_module
    from pathlib import Path

    original, drawn_on = plots.score_histograms, []

    def recording(*args, **kwargs):
        drawn_on.append(threading.current_thread().name)
        return original(*args, **kwargs)

    monkeypatch.setattr(plots, "score_histograms", recording)
    cb, csv = _fit_with_reports(tmp_path)
    steps = [result.step for result in cb.results]
    assert steps == [6, 12]
    assert all(name.startswith(WORKER_NAME) for name in drawn_on) and len(drawn_on) == 2
    for result in cb.results:
        payload = json.loads((result.path / REPORT_DIR / SUMMARY_FILE).read_text())
        assert payload["step"] == result.step and (result.path / REPORT_DIR / "score_histograms.png").is_file()
    with open(Path(csv.log_dir) / "metrics.csv") as handle:
        logged = [int(row["step"]) for row in csv_module.DictReader(handle) if row.get("influence/gini")]
    assert logged == steps
    assert worker_threads() == []


def test_a_failing_figure_never_stops_training(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("figure exploded")

    monkeypatch.setattr(plots, "layer_share_bars", broken)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cb, _ = _fit_with_reports(tmp_path)
    messages = [str(w.message) for w in caught if "in the background failed" in str(w.message)]
    assert len(messages) == 2 and "RuntimeError: figure exploded" in messages[0]
    assert [result.step for result in cb.results] == [6, 12]
    assert worker_threads() == []


def test_an_exception_in_training_flushes_the_pending_reports(tmp_path):
    import pytorch_lightning as pl

    from tests.reliability_helpers import Classifier, seeded

    class FailsAtStep7(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == 7:
                raise RuntimeError("the data loader broke")

    from tests.reliability_helpers import make_callback, fit

    cb = make_callback(tmp_path, **TRAINING_REPORTS)
    with pytest.raises(RuntimeError, match="the data loader broke"):
        fit(tmp_path, cb, model=seeded(Classifier), max_epochs=1, callbacks=[FailsAtStep7()])
    assert [result.step for result in cb.results] == [6]
    for result in cb.results:
        assert (result.path / REPORT_DIR / SUMMARY_FILE).is_file()
    assert worker_threads() == []


def test_report_in_background_false_publishes_on_the_training_thread(tmp_path, monkeypatch):
    original, drawn_on = plots.score_histograms, []

    def recording(*args, **kwargs):
        drawn_on.append(threading.current_thread())
        return original(*args, **kwargs)

    monkeypatch.setattr(plots, "score_histograms", recording)
    cb, _ = _fit_with_reports(tmp_path, report=dict(mode="foreground"))
    assert len(drawn_on) == 2 and set(drawn_on) == {threading.main_thread()}
    assert cb._loop._publisher.background is False and worker_threads() == []
