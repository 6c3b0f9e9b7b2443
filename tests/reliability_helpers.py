"""Shared pieces of the reliability suite (``tests/test_reliability_*.py``): a quiet CPU trainer on
the tiny blob classifier, a callback with test defaults, and the offline statistics to compare with."""

from __future__ import annotations

from typing import Optional, Sequence

import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Subset

import lightning_influence as li
from lightning_influence.loops.callback import InfluenceCallback
from lightning_influence.engine.curvature_passes import accumulate_covariances
from tests.callback_models import make_datamodule_class, make_module_class, merged_settings, planted_data

Classifier = make_module_class(pl)
BlobData = make_datamodule_class(pl)
QUIET = dict(logger=False, enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
             num_sanity_val_steps=0, accelerator="cpu", devices=1)
# Collect statistics but never compute influence (the trigger needs more steps than a test runs).
COLLECT_ONLY = dict(every_n_epochs=None, every_n_train_steps=1000, on_checkpoint=False, on_train_end=False)


def make_callback(tmp_path, **kwargs) -> InfluenceCallback:
    """The callback with test defaults: 4 queries, files under ``tmp_path``, errors raised, every
    training step collected in full (so statistics can be compared with an offline pass)."""
    defaults = dict(task=li.ClassificationTask(), num_queries=4, output_dir=str(tmp_path / "influence"),
                    on_error="raise", report=dict(mode="off", show_progress=False),
                    curvature=dict(collect_every_n_steps=1, max_tokens_per_step=None))
    return InfluenceCallback(**merged_settings(defaults, kwargs))


def make_trainer(tmp_path, callbacks: Sequence[pl.Callback], **kwargs) -> pl.Trainer:
    settings = dict(QUIET, max_epochs=1, default_root_dir=str(tmp_path))
    settings.update(kwargs)
    return pl.Trainer(callbacks=list(callbacks), **settings)


def fit(tmp_path, cb: Optional[pl.Callback], model: Optional[pl.LightningModule] = None, *, batch_size: int = 8,
        callbacks: Sequence[pl.Callback] = (), datamodule=None, ckpt_path: Optional[str] = None, **trainer_kwargs):
    """Train ``model`` (default: a fresh classifier) on the planted blobs, unshuffled (resuming from
    ``ckpt_path`` if given); returns ``(trainer, model)``."""
    pl.seed_everything(0, verbose=False)
    train, val, _ = planted_data()
    model = model if model is not None else Classifier()
    datamodule = datamodule if datamodule is not None else BlobData(train, val, batch_size=batch_size, shuffle=False)
    trainer = make_trainer(tmp_path, [c for c in (cb, *callbacks) if c is not None], **trainer_kwargs)
    trainer.fit(model, datamodule, ckpt_path=ckpt_path)
    return trainer, model


def seeded(cls, *args, **kwargs):
    """``cls(*args, **kwargs)`` built under a fixed seed (initial weights independent of test order)."""
    pl.seed_everything(0, verbose=False)
    return cls(*args, **kwargs)


def offline_statistics(model, examples: Optional[range] = None, batch_size: int = 8, exclude: Sequence[str] = ()):
    """The core's empirical-Fisher statistics over the training set (or the examples in ``examples``),
    batched as the trainer batched them, on the layers the callback tracked by default."""
    train = planted_data()[0]
    data = Subset(train, list(examples)) if examples is not None else train
    layers = li.select_layers(model, exclude=exclude)
    return accumulate_covariances(model, li.ClassificationTask(), DataLoader(data, batch_size=batch_size),
                                  layers, fisher="empirical", batch_size=batch_size)


def assert_statistics_close(collected, expected, rtol: float) -> None:
    """Every sum and count of every layer agrees (same layers on both sides): elementwise within
    ``rtol``, or within ``rtol`` of the matrix's largest entry (low-precision training)."""
    assert sorted(collected.state) == sorted(expected.state)
    for name, parts in expected.state.items():
        for key, value in parts.items():
            atol = rtol * float(value.abs().max())
            torch.testing.assert_close(collected.state[name][key].float(), value.float(), rtol=rtol, atol=atol,
                                       msg=lambda m: f"{name}/{key}: {m}")


class Tripwire(pl.Callback):
    """Fails the test if a training batch starts: bad input must be refused before that."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        raise AssertionError("training started although the configuration should have been refused")


def assert_refused_before_training(tmp_path, cb, match: str, model=None, datamodule=None, **trainer_kwargs) -> str:
    """``fit`` raises ``ValueError`` matching ``match`` before any training batch; returns the message."""
    with pytest.raises(ValueError, match=match) as info:
        fit(tmp_path, cb, model, callbacks=[Tripwire()], datamodule=datamodule, **trainer_kwargs)
    return str(info.value)
