"""Train the tiny classifier with InfluenceCallback in a separate process, for the kill tests.

    python tests/reliability_kill_script.py kill-result  RUN_DIR  # SIGKILL halfway through writing step 12's scores
    python tests/reliability_kill_script.py kill-factors RUN_DIR  # SIGKILL halfway through writing step 12's factors
    python tests/reliability_kill_script.py kill-after-checkpoint RUN_DIR  # SIGKILL once the epoch-0 checkpoint is
                                                                           # saved, step 6's report still being drawn
    python tests/reliability_kill_script.py resume       RUN_DIR  # continue from the epoch-0 checkpoint

Two epochs of 6 steps, influence at every epoch end (steps 6 and 12), a checkpoint per epoch.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import threading  # noqa: E402

import pytorch_lightning as pl  # noqa: E402
from pytorch_lightning.callbacks import ModelCheckpoint  # noqa: E402

import lightning_influence.engine.factors  # noqa: E402
import lightning_influence.results  # noqa: E402
from lightning_influence.reporting import publisher  # noqa: E402
from tests.reliability_helpers import fit, make_callback  # noqa: E402


def kill_on_second_write(module) -> None:
    """The module's second ``save_tensors`` call writes half a file, then the process is killed."""
    original, calls = module.save_tensors, []

    def save_tensors(path, tensors):
        calls.append(path)
        if len(calls) < 2:
            return original(path, tensors)
        original(path, tensors)
        with open(path, "r+b") as fh:
            fh.truncate(os.path.getsize(path) // 2)
        os.kill(os.getpid(), signal.SIGKILL)

    module.save_tensors = save_tensors


class KillInSecondEpoch(pl.Callback):
    """SIGKILL at the first batch of epoch 1: the epoch-0 checkpoint is on disk."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.current_epoch == 1:
            os.kill(os.getpid(), signal.SIGKILL)


def main(mode: str, run_dir: str) -> None:
    run = Path(run_dir)
    callbacks = [ModelCheckpoint(dirpath=run / "ckpt", save_top_k=-1)]
    if mode == "kill-result":
        kill_on_second_write(lightning_influence.results)
    elif mode == "kill-factors":
        kill_on_second_write(lightning_influence.engine.factors)
    elif mode == "kill-after-checkpoint":  # the background worker never finishes drawing step 6's report
        publisher.ResultPublisher._complete = lambda *args: threading.Event().wait()
        callbacks.append(KillInSecondEpoch())
    cb = make_callback(run, every_n_epochs=1, on_checkpoint=False, on_train_end=False, scoring=dict(batch_size=16),
                       report=dict(mode="background" if mode == "kill-after-checkpoint" else "off"))
    ckpt = str(run / "ckpt" / "epoch=0-step=6.ckpt") if mode == "resume" else None
    fit(run, cb, callbacks=callbacks, batch_size=16, max_epochs=2, enable_checkpointing=True, ckpt_path=ckpt)


if __name__ == "__main__":
    main(*sys.argv[1:])
