"""Reliability: faults. Non-finite steps, a logger that always fails, crashes and SIGKILL while
scoring or writing, an output directory that cannot be written, and resuming under another
configuration: training is never lost, no half-written result is ever loaded, nothing mixes silently."""

from __future__ import annotations

import errno
import math
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import Logger
from torch.utils.data import DataLoader, Subset

import lightning_influence as li
import lightning_influence.checkpoint.session
import lightning_influence.engine.factors
import lightning_influence.results
from lightning_influence._io import FormatError
from tests.callback_models import planted_data
from tests.reliability_helpers import (COLLECT_ONLY, Classifier, assert_refused_before_training,
                                       assert_statistics_close, fit, make_callback, make_trainer,
                                       offline_statistics)

KILL_SCRIPT = Path(__file__).resolve().parents[1] / "reliability_kill_script.py"
EPOCHS = dict(every_n_epochs=1, on_checkpoint=False, on_train_end=False)  # results at steps 6, 12, ...


def _influence_warnings(caught, text):
    return [w for w in caught if issubclass(w.category, RuntimeWarning) and text in str(w.message)]


def _visible(directory: Path):
    return sorted(p.name for p in directory.iterdir())


# -- non-finite steps -------------------------------------------------------------------------------
class _NonFiniteAtBatch2(Classifier):
    """Batch 2 gives a NaN loss or an infinite gradient; like many training scripts, the module
    zeroes non-finite gradients before the optimizer step, so training goes on."""

    def __init__(self, kind: str):
        super().__init__(lr=0.0)
        self.kind = kind

    def training_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        if batch_idx == 2 and self.kind == "loss":
            loss = loss * math.nan
        if batch_idx == 2 and self.kind == "gradient":
            logits.register_hook(lambda grad: grad * math.inf)
        return loss

    def on_before_optimizer_step(self, optimizer):
        for param in self.parameters():
            param.grad.nan_to_num_(0.0, 0.0, 0.0)


@pytest.mark.parametrize("kind", ["loss", "gradient"])
def test_non_finite_step_is_skipped_and_counted(tmp_path, kind):
    cb = make_callback(tmp_path, **COLLECT_ONLY)
    trainer, model = fit(tmp_path, cb, _NonFiniteAtBatch2(kind))
    assert trainer.global_step == 12
    assert cb.steps_skipped == 1 and float(cb._collector.steps_committed) == 11
    kept = [*range(0, 16), *range(24, 96)]  # every batch but batch 2
    assert_statistics_close(cb.statistics, offline_statistics(model, kept), rtol=1e-5)


# -- a logger that always fails ---------------------------------------------------------------------
class _BrokenLogger(Logger):
    """Accepts Lightning's own set-up calls; every metrics call raises (e.g. quota exhausted)."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    @property
    def name(self):
        return "broken"

    @property
    def version(self):
        return 0

    def log_hyperparams(self, params, *args, **kwargs):
        pass

    def log_metrics(self, metrics, step=None):
        self.calls += 1
        raise ConnectionError("logging service unavailable")


def test_failing_logger_warns_once_and_results_on_disk_are_complete(tmp_path):
    train, val, _ = planted_data()
    logger = _BrokenLogger()
    cb = make_callback(tmp_path, query_data=Subset(val, range(2)), report=dict(mode="background"), **EPOCHS)
    trainer = make_trainer(tmp_path, [cb], logger=logger, max_epochs=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(Classifier(), DataLoader(train, batch_size=16))
    assert trainer.state.finished and trainer.global_step == 12
    assert len(_influence_warnings(caught, "logging influence results to")) == 1
    assert logger.calls == 1  # skipped after its first failure
    results = li.load_results(tmp_path / "influence")
    assert [r.step for r in results] == [6, 12]
    for result in results:
        assert torch.isfinite(result.scores).all() and result.scores.shape == (2, 96)
        assert (Path(result.path) / "report" / "summary.json").is_file()
        assert li.load_factors(Path(result.path) / "factors").layer_names == ["net.0", "net.2"]


# -- crashes inside a computation -----------------------------------------------------------------
class _StepClock(pl.Callback):
    """Publishes the trainer's step before the influence callback's hooks run."""

    step = -1

    def on_fit_start(self, trainer, pl_module):
        type(self).step = -1

    def on_train_batch_end(self, trainer, *args):
        type(self).step = trainer.global_step


def _fail_at_step(monkeypatch, module, name, step, truncate=False):
    """Make ``module.name`` raise during the computation at ``step`` (after writing half a file)."""
    original = getattr(module, name)

    def failing(*args, **kwargs):
        if _StepClock.step != step:
            return original(*args, **kwargs)
        if truncate:
            path, tensors = args
            original(path, tensors)
            with open(path, "r+b") as fh:
                fh.truncate(Path(path).stat().st_size // 2)
        raise RuntimeError("simulated crash")

    monkeypatch.setattr(module, name, failing)


@pytest.mark.parametrize("where", ["scoring", "writing scores", "writing factors"])
def test_crash_inside_a_computation_leaves_no_partial_result(tmp_path, monkeypatch, where):
    module, name = {"scoring": (lightning_influence.checkpoint.session, "compute_influence"),
                    "writing scores": (lightning_influence.results, "save_tensors"),
                    "writing factors": (lightning_influence.engine.factors, "save_tensors")}[where]
    _fail_at_step(monkeypatch, module, name, step=12, truncate=where != "scoring")
    cb = make_callback(tmp_path, on_error="warn", scoring=dict(batch_size=16), **EPOCHS)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer, _ = fit(tmp_path, None, batch_size=16, callbacks=[_StepClock(), cb], max_epochs=3)
    assert trainer.global_step == 18
    (warning,) = _influence_warnings(caught, "failed")
    assert "at step 12 failed (RuntimeError: simulated crash); training continues" in str(warning.message)
    out = tmp_path / "influence"
    assert _visible(out) == ["step=18", "step=6"]  # no step=12, no temporary leftovers
    assert [r.step for r in li.load_results(out)] == [r.step for r in cb.results] == [6, 18]
    for step in (6, 18):
        assert li.load_factors(out / f"step={step}" / "factors").strategy == "ekfac"


def test_sigkill_while_writing_then_the_next_run_continues(tmp_path):
    """A process killed halfway through writing step 12's tensors leaves only a hidden temporary
    directory, which no loader reads; resuming from the epoch-0 checkpoint removes it and writes
    step 12 whole."""
    run = tmp_path / "run"
    done = subprocess.run([sys.executable, str(KILL_SCRIPT), "kill-result", str(run)], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == -9, done.stderr[-2000:]
    out = run / "influence"
    partial = [p for p in out.iterdir() if p.name.startswith(".")]
    assert any((p / "tensors.safetensors").is_file() for p in partial)  # killed mid-write, really
    assert [r.step for r in li.load_results(out)] == [6]
    for directory in partial:
        with pytest.raises(FormatError):
            li.InfluenceResult.load(directory)

    cb = make_callback(run, scoring=dict(batch_size=16), **EPOCHS)
    fit(run, cb, batch_size=16, max_epochs=2, enable_checkpointing=True,
        callbacks=[ModelCheckpoint(dirpath=run / "ckpt", save_top_k=-1)],
        ckpt_path=str(run / "ckpt" / "epoch=0-step=6.ckpt"))
    results = li.load_results(out)
    assert [r.step for r in results] == [r.step for r in cb.results] == [6, 12]
    for result in results:
        assert torch.isfinite(result.scores).all() and result.scores.shape == (4, 96)
        li.load_factors(Path(result.path) / "factors")
    assert not any(p.exists() for p in partial)  # the resumed run cleaned up the interrupted write


# -- an output directory that cannot be written ----------------------------------------------------
def test_output_dir_that_cannot_be_created_is_refused_before_training(tmp_path):
    blocker = tmp_path / "blocker"
    blocker.write_text("a regular file where a directory should be")
    assert_refused_before_training(tmp_path, make_callback(tmp_path, output_dir=str(blocker / "influence")),
                                   "cannot write influence results under output_dir=.*blocker/influence.*"
                                   "choose a writable output_dir")


def test_disk_full_while_writing_warns_and_training_is_unharmed(tmp_path, monkeypatch):
    original = lightning_influence.results.save_tensors

    def disk_full_at_step_6(path, tensors):
        if _StepClock.step == 6:
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(path, tensors)

    monkeypatch.setattr(lightning_influence.results, "save_tensors", disk_full_at_step_6)
    _, plain = fit(tmp_path / "plain", None, batch_size=16, max_epochs=2)
    cb = make_callback(tmp_path, scoring=dict(batch_size=16), on_error="warn", **EPOCHS)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer, tracked = fit(tmp_path, None, batch_size=16, callbacks=[_StepClock(), cb], max_epochs=2)
    (warning,) = _influence_warnings(caught, "could not write")
    assert "step=6" in str(warning.message) and "No space left on device" in str(warning.message)
    assert trainer.state.finished and trainer.global_step == 12
    for (name, a), (_, b) in zip(plain.state_dict().items(), tracked.state_dict().items()):
        assert torch.equal(a, b), name
    assert _visible(tmp_path / "influence") == ["step=12"]  # once space is back, results are written
    assert [r.step for r in cb.results] == [12]


# -- resuming under another configuration ------------------------------------------------------------
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    run = tmp_path_factory.mktemp("first-run")
    fit(run, make_callback(run, **EPOCHS), batch_size=16, enable_checkpointing=True,
        callbacks=[ModelCheckpoint(dirpath=run / "ckpt")])
    return str(next((run / "ckpt").glob("*.ckpt")))


@pytest.mark.parametrize("changed,reported", [
    (dict(curvature=dict(fisher="true")), "fisher: checkpoint 'empirical' vs now 'true'"),
    (dict(curvature=dict(loss_reduction="sum")), "loss_reduction: checkpoint 'mean' vs now 'sum'"),
    (dict(curvature=dict(covariance_dtype="float64")), "covariance_dtype: checkpoint 'float32' vs now 'float64'"),
    (dict(scoring=dict(max_train_examples=50)), "max_train_examples: checkpoint None vs now 50"),
    (dict(curvature=dict(exclude=["net.0"])), "track other layers"),
    (dict(task=type("OtherTask", (li.ClassificationTask,), {})()), "task: checkpoint 'ClassificationTask' vs now 'OtherTask'"),
])
def test_resume_with_another_configuration_is_refused(tmp_path, checkpoint, changed, reported):
    message = assert_refused_before_training(tmp_path, make_callback(tmp_path, **EPOCHS, **changed), "",
                                             ckpt_path=checkpoint, batch_size=16, max_epochs=2)
    assert reported in message and "resume with the same" in message
