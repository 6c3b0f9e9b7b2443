"""A run is an identity (issue 23): a new run never writes into another run's results, one process
writes a results directory at a time, a resume continues its own run under its own id, and results
of one run are recognised as one run wherever they are compared, scored later included."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from torch.utils.data import Subset

import lightning_influence as li
from lightning_influence.loops.callback import STATE_VERSION
from lightning_influence.checkpoint.run_dir import LOCK_FILE
from tests.callback_models import merged_settings, planted_data
from tests.reliability_helpers import Classifier, assert_refused_before_training, fit, make_callback, seeded

EPOCHS = dict(every_n_epochs=1, on_checkpoint=False, on_train_end=False, scoring=dict(batch_size=16))
ROOT = Path(__file__).resolve().parents[2]
KILL_SCRIPT = ROOT / "tests" / "reliability_kill_script.py"


def train(run: Path, cb=None, *, epochs: int = 1, ckpt_path=None, callbacks=(), default_root_dir=None, **settings):
    """Train the blob classifier with a checkpoint per epoch under ``run/ckpt``; returns the callback."""
    cb = cb if cb is not None else make_callback(run, **merged_settings(EPOCHS, settings))
    fit(run, cb, batch_size=16, max_epochs=epochs, enable_checkpointing=True, ckpt_path=ckpt_path,
        callbacks=[ModelCheckpoint(dirpath=run / "ckpt", save_top_k=-1), *callbacks],
        **({"default_root_dir": default_root_dir} if default_root_dir else {}))
    return cb


def influence_state(checkpoint: Path):
    """The checkpoint and its one influence callback state (whatever its key)."""
    saved = torch.load(checkpoint, weights_only=True)
    (key,) = [k for k in saved["callbacks"] if k.startswith("InfluenceCallback")]
    return saved, key


def files_of(directory: Path):
    return {p.name: p.read_bytes() for p in directory.iterdir() if p.is_file()}


# -- 1. a rerun into the same output_dir ---------------------------------------------------------------


def test_a_rerun_into_the_same_output_dir_is_refused_before_training_and_loses_nothing(tmp_path):
    first = train(tmp_path)
    step6 = tmp_path / "influence" / "step=6"
    (step6 / "notes.txt").write_text("my notes on this checkpoint")
    before = files_of(step6)

    message = assert_refused_before_training(tmp_path, make_callback(tmp_path, **EPOCHS), "another training run",
                                             batch_size=16)
    assert first.run_id in message and "step=6" in message
    assert "ckpt_path" in message and "another output_dir" in message  # the ways on, named
    assert files_of(step6) == before
    assert not (tmp_path / "influence" / LOCK_FILE).exists()  # the refused run let go of the directory

    second = train(tmp_path, output_dir=str(tmp_path / "influence-2"))  # a run of its own, elsewhere
    assert len({first.run_id, second.run_id}) == 2 and len(first.run_id) == 32
    assert second.results[0].meta["run"]["id"] == second.run_id
    with pytest.raises(ValueError, match="2 different training runs"):
        li.compare(first.results[0], second.results[0])


def test_the_default_output_dir_gets_a_new_version_for_each_run_and_a_resume_finds_its_own(tmp_path):
    """Without a versioned logger directory (W&B, or no logger), ``<log_dir>/influence`` is not a
    run's own: a rerun takes ``influence-v1``, as ModelCheckpoint names a file that would clash."""
    first = train(tmp_path, output_dir=None)
    assert Path(first.results[0].path) == tmp_path / "influence" / "step=6"
    with pytest.warns(UserWarning, match="influence holds another run's results.*writes its results to .*influence-v1"):
        second = train(tmp_path / "second-ckpt", output_dir=None, default_root_dir=str(tmp_path))
    assert Path(second.results[0].path) == tmp_path / "influence-v1" / "step=6"

    resumed = train(tmp_path / "second-ckpt", output_dir=None, default_root_dir=str(tmp_path), epochs=2,
                    ckpt_path=str(tmp_path / "second-ckpt" / "ckpt" / "epoch=0-step=6.ckpt"))
    assert resumed.run_id == second.run_id
    assert [Path(r.path).parent.name for r in resumed.results] == ["influence-v1"] * 2
    assert [r.step for r in li.load_results(tmp_path / "influence")] == [6]  # the first run, untouched


# -- 2. a resume is the same run -----------------------------------------------------------------------


def test_a_resume_keeps_its_run_id_through_settings_scores_do_not_depend_on(tmp_path, capsys):
    first = train(tmp_path)
    checkpoint = tmp_path / "ckpt" / "epoch=0-step=6.ckpt"
    saved, key = influence_state(checkpoint)
    assert saved["callbacks"][key]["run_id"] == first.run_id and saved["callbacks"][key]["version"] == STATE_VERSION

    resumed = train(tmp_path, epochs=2, ckpt_path=str(checkpoint),
                    **dict(EPOCHS, every_n_epochs=2, report=dict(show_progress=True)))
    assert resumed.run_id == first.run_id
    results = resumed.results
    assert [r.step for r in results] == [6, 12]
    assert {r.meta["run"]["id"] for r in results} == {first.run_id}
    assert li.compare(results[0], results[1]).n_train == 96
    assert li.aggregate(results).meta["run"]["id"] == first.run_id
    assert len(li.trajectory(results)["step"]) == 2
    from lightning_influence.cli import main

    assert main(["report", str(tmp_path / "influence")]) == 0
    assert "2 checkpoint(s), steps: 6, 12" in capsys.readouterr().out


def test_results_scored_later_from_a_runs_checkpoint_and_factors_belong_to_that_run(tmp_path, monkeypatch):
    from lightning_influence.cli import main

    cb = train(tmp_path)
    package = tmp_path / "userpkg"
    package.mkdir()
    (package / "run23_models.py").write_text(
        "from torch.utils.data import Subset\n"
        "from tests.callback_models import planted_data\n"
        "from tests.reliability_helpers import Classifier\n"
        "train_set = planted_data()[0]\n"
        "query_set = Subset(planted_data()[1], range(4))\n")
    monkeypatch.syspath_prepend(str(package))
    monkeypatch.syspath_prepend(str(ROOT))
    assert main(["score", "--checkpoint", str(tmp_path / "ckpt" / "epoch=0-step=6.ckpt"),
                 "--model", "run23_models:Classifier", "--train-data", "run23_models:train_set",
                 "--query-data", "run23_models:query_set", "--factors", str(tmp_path / "influence" / "step=6"),
                 "--task", "classification", "--out", str(tmp_path / "scored")]) == 0
    sys.modules.pop("run23_models", None)
    scored = li.InfluenceResult.load(tmp_path / "scored")
    assert scored.meta["run"]["id"] == cb.run_id
    comparison = li.compare(cb.results[0], scored)  # refused as "2 different training runs" before
    assert float(comparison.spearman.min()) > 0.99


def test_a_checkpoint_of_an_earlier_version_resumes_under_the_id_its_results_recorded(tmp_path):
    """States before version 3 kept no run id, under the key ``InfluenceCallback``: the resumed
    run adopts the id its saved results recorded, and continues them."""
    train(tmp_path)
    checkpoint = tmp_path / "ckpt" / "epoch=0-step=6.ckpt"
    saved, key = influence_state(checkpoint)
    state = saved["callbacks"].pop(key)
    recorded = state.pop("run_id")
    saved["callbacks"]["InfluenceCallback"] = dict(state, version=2)
    old = tmp_path / "old.ckpt"
    torch.save(saved, old)

    resumed = train(tmp_path, epochs=2, ckpt_path=str(old))
    assert resumed.run_id == recorded
    assert [r.step for r in resumed.results] == [6, 12]


# -- 3. one writer at a time ---------------------------------------------------------------------------

HOLD_THE_DIRECTORY = """
import sys, time
from pathlib import Path
from lightning_influence.checkpoint.run_dir import OutputDirectory
OutputDirectory(Path(sys.argv[1]), "another-run").claim()
print("claimed", flush=True)
time.sleep(600)
"""


def test_a_second_writer_is_refused_and_a_dead_writers_lock_is_taken_over(tmp_path):
    out = tmp_path / "influence"
    holder = subprocess.Popen([sys.executable, "-c", HOLD_THE_DIRECTORY, str(out)], stdout=subprocess.PIPE,
                              text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    try:
        assert holder.stdout.readline().strip() == "claimed"
        message = assert_refused_before_training(tmp_path, make_callback(tmp_path, **EPOCHS), "is being written by",
                                                 batch_size=16)
        assert f"process {holder.pid} on host {socket.gethostname()}" in message
        assert "its own output_dir" in message
    finally:
        holder.kill()  # SIGKILL: the lock file stays behind, naming a dead process
        holder.wait()
    assert json.loads((out / LOCK_FILE).read_text())["pid"] == holder.pid

    cb = train(tmp_path)
    assert [r.step for r in cb.results] == [6]
    assert not (out / LOCK_FILE).exists()  # released at the end of fit


def test_the_lock_is_held_while_training_and_released_when_training_fails(tmp_path):
    import pytorch_lightning as pl

    lock = tmp_path / "influence" / LOCK_FILE

    class FailsAtStep3(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == 3:
                holder = json.loads(lock.read_text())
                assert (holder["pid"], holder["host"]) == (os.getpid(), socket.gethostname())
                raise RuntimeError("the data loader broke")

    with pytest.raises(RuntimeError, match="the data loader broke"):
        fit(tmp_path, make_callback(tmp_path, **EPOCHS), batch_size=16, callbacks=[FailsAtStep3()])
    assert not lock.exists()


# -- 4. a crash right after a checkpoint ---------------------------------------------------------------


def test_kill_after_a_checkpoint_then_resume_delivers_every_report_at_its_own_step(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    from pytorch_lightning.loggers import WandbLogger

    from tests import wandb_reader

    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    run = tmp_path / "run"
    done = subprocess.run([sys.executable, str(KILL_SCRIPT), "kill-after-checkpoint", str(run)],
                          capture_output=True, text=True, timeout=300, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert done.returncode == -9, done.stderr[-2000:]
    out = run / "influence"
    assert li.load_results(out)[0].step == 6
    assert not (out / "step=6" / "report" / "summary.json").exists()  # killed before its report was complete

    logger = WandbLogger(offline=True, save_dir=str(tmp_path), project="li-test")
    cb = make_callback(run, **dict(EPOCHS, report=dict(mode="background")))
    fit(run, cb, batch_size=16, max_epochs=2, enable_checkpointing=True, logger=logger,
        callbacks=[ModelCheckpoint(dirpath=run / "ckpt", save_top_k=-1)],
        ckpt_path=str(run / "ckpt" / "epoch=0-step=6.ckpt"))
    for step in (6, 12):
        summary = json.loads((out / f"step={step}" / "report" / "summary.json").read_text())
        assert summary["step"] == step
        assert (out / f"step={step}" / "report" / "delivered.json").is_file()
    run_dir = Path(logger.experiment.dir).parent
    wandb.finish()
    rows = wandb_reader.history(wandb_reader.skip_if_unsupported(run_dir))
    assert [r["trainer/global_step"] for r in rows if "influence/gini" in r] == [6, 12]


# -- 5. failures of the influence machinery, writing included -------------------------------------------


def _symlinked_step6(tmp_path: Path) -> Path:
    """``influence/step=6`` as a symbolic link to a directory outside, which looks like a result."""
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "meta.json").write_text(json.dumps({"format": "lightning-influence/result", "version": 1}))
    (tmp_path / "influence").mkdir()
    (tmp_path / "influence" / "step=6").symlink_to(victim, target_is_directory=True)
    return victim


def test_a_step_that_cannot_be_written_is_warned_about_and_training_really_continues(tmp_path):
    victim = _symlinked_step6(tmp_path)
    cb = make_callback(tmp_path, **dict(EPOCHS, on_error="warn"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer, _ = fit(tmp_path, cb, batch_size=16, max_epochs=2)
    assert trainer.state.finished and trainer.global_step == 12
    (warning,) = [w for w in caught if "could not write" in str(w.message)]
    assert "step=6" in str(warning.message) and "training continues" in str(warning.message)
    assert [r.step for r in cb.results] == [12]
    assert sorted(p.name for p in victim.iterdir()) == ["meta.json"]


def test_a_step_that_cannot_be_written_ends_training_with_on_error_raise(tmp_path):
    _symlinked_step6(tmp_path)
    with pytest.raises(OSError, match="could not write the influence result to .*step=6"):
        fit(tmp_path, make_callback(tmp_path, **EPOCHS), batch_size=16)
    assert not (tmp_path / "influence" / LOCK_FILE).exists()


def test_an_edited_checkpoint_cannot_point_the_run_outside_its_output_dir(tmp_path):
    train(tmp_path)
    shutil.copytree(tmp_path / "influence" / "step=6", tmp_path / "victim" / "step=47")
    saved, key = influence_state(tmp_path / "ckpt" / "epoch=0-step=6.ckpt")
    saved["callbacks"][key]["index"][0]["dir"] = "../victim/step=47"
    edited = tmp_path / "edited.ckpt"
    torch.save(saved, edited)
    message = assert_refused_before_training(tmp_path, make_callback(tmp_path, **EPOCHS), "edited or damaged",
                                             batch_size=16, ckpt_path=str(edited), max_epochs=2)
    assert "'../victim/step=47'" in message


def test_two_influence_callbacks_with_their_own_queries_share_a_trainer_and_resume(tmp_path):
    val = planted_data()[1]

    def callbacks():
        return [make_callback(tmp_path, **EPOCHS, output_dir=str(tmp_path / name), query_data=Subset(val, ids))
                for name, ids in (("two", [0, 1]), ("three", [2, 3, 4]))]

    first = callbacks()
    fit(tmp_path, None, seeded(Classifier), batch_size=16, enable_checkpointing=True,
        callbacks=[*first, ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1)])
    assert [cb.results[0].num_queries for cb in first] == [2, 3]
    states = torch.load(tmp_path / "ckpt" / "epoch=0-step=6.ckpt", weights_only=True)["callbacks"]
    assert {states[cb.state_key]["run_id"] for cb in first} == {cb.run_id for cb in first}
    assert len({cb.run_id for cb in first}) == 2

    second = callbacks()
    fit(tmp_path, None, batch_size=16, max_epochs=2, enable_checkpointing=True,
        callbacks=[*second, ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1)],
        ckpt_path=str(tmp_path / "ckpt" / "epoch=0-step=6.ckpt"))
    for before, after in zip(first, second):
        assert after.run_id == before.run_id
        assert [r.step for r in after.results] == [6, 12]
