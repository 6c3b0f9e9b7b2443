"""Reliability: training setups. Each is either handled (statistics collected from the training steps
equal the core's offline empirical-Fisher pass at the same weights: lr=0 keeps them fixed) or
refused at setup with a message saying what to change."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.plugins.precision import MixedPrecision
from torch import nn

from tests.reliability_helpers import (COLLECT_ONLY, Classifier, assert_refused_before_training,
                                       assert_statistics_close, fit, make_callback, offline_statistics, seeded)

STEPS_PER_EPOCH = 12  # 96 examples, batches of 8


@pytest.mark.parametrize("setup,trainer_kwargs,optimizer_steps,rtol", [
    ("32-true", dict(precision="32-true"), 12, 1e-5),
    ("bf16-mixed", dict(precision="bf16-mixed"), 12, 3e-2),
    ("accumulate", dict(accumulate_grad_batches=2), 6, 1e-5),
    ("clip-norm", dict(gradient_clip_val=1e-3, gradient_clip_algorithm="norm"), 12, 1e-5),
    ("accumulate+clip-value", dict(accumulate_grad_batches=3, gradient_clip_val=1e-4,
                                   gradient_clip_algorithm="value"), 4, 1e-5),
])
def test_statistics_equal_offline_pass(tmp_path, setup, trainer_kwargs, optimizer_steps, rtol):
    """Precision, accumulation and clipping change what the optimizer sees, never the curvature
    statistics: those describe the per-example loss at the current weights."""
    cb = make_callback(tmp_path, **COLLECT_ONLY)
    trainer, model = fit(tmp_path, cb, Classifier(lr=0.0), **trainer_kwargs)
    assert trainer.global_step == optimizer_steps
    assert cb.steps_skipped == 0 and float(cb._collector.steps_committed) == optimizer_steps
    collected = cb.statistics
    assert all(parts[key].dtype == torch.float32  # float32 sums even under bf16
               for parts in collected.state.values() for key in ("a_sum", "s_sum"))
    assert_statistics_close(collected, offline_statistics(model), rtol=rtol)


class _ScaleRecorder(pl.Callback):
    """The GradScaler's scale before and after each training batch."""

    def __init__(self):
        self.scales = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.scales.append([trainer.precision_plugin.scaler.get_scale()])

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.scales[-1].append(trainer.precision_plugin.scaler.get_scale())


def test_fp16_with_real_grad_scaler_drops_skipped_steps(tmp_path):
    """16-mixed with a real GradScaler on CPU: the initial scale (2^20) overflows fp16 gradients, so
    the scaler skips the first steps and backs off; exactly those steps' statistics are dropped."""
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**20)
    recorder = _ScaleRecorder()
    cb = make_callback(tmp_path, **COLLECT_ONLY)
    trainer, model = fit(tmp_path, cb, seeded(Classifier, lr=0.0), callbacks=[recorder],
                         plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)])
    assert trainer.precision_plugin.scaler is scaler and scaler.is_enabled()
    skipped = [i for i, (before, after) in enumerate(recorder.scales) if after < before]
    assert skipped and skipped == list(range(len(skipped)))  # the scaler really skipped the first steps
    assert cb.steps_skipped == len(skipped)
    assert float(cb._collector.steps_committed) == STEPS_PER_EPOCH - len(skipped)
    kept = range(8 * len(skipped), 96)  # the batches whose steps the optimizer took
    assert_statistics_close(cb.statistics, offline_statistics(model, kept), rtol=1e-2)


class _OverflowingSideBranch(Classifier):
    """An untracked side branch whose fp16 weight gradient overflows at batch 3 (its input is scaled
    up), while its output, the loss and every tracked layer's gradients stay finite: only the
    scaler's skip marks that step."""

    def __init__(self):
        super().__init__(lr=0.0)
        self.aux = nn.Linear(2, 3)
        nn.init.constant_(self.aux.weight, 1e-5)
        self.boost = 1.0

    def forward(self, x):
        return self.net(x) + self.aux(x * self.boost)

    def training_step(self, batch, batch_idx):
        self.boost = 1e4 if batch_idx == 3 else 1.0
        return super().training_step(batch, batch_idx)


def test_fp16_step_skipped_by_the_scaler_alone_is_dropped(tmp_path):
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    recorder = _ScaleRecorder()
    cb = make_callback(tmp_path, curvature=dict(exclude=["aux"]), **COLLECT_ONLY)
    trainer, model = fit(tmp_path, cb, seeded(_OverflowingSideBranch), callbacks=[recorder],
                         plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)])
    assert [i for i, (before, after) in enumerate(recorder.scales) if after < before] == [3]
    assert cb.steps_skipped == 1 and float(cb._collector.steps_committed) == STEPS_PER_EPOCH - 1
    kept = [*range(0, 24), *range(32, 96)]
    assert_statistics_close(cb.statistics, offline_statistics(model, kept, exclude=["aux"]), rtol=1e-2)


class _TwoOptimizers(Classifier):
    """GAN-style manual optimisation: one optimizer per layer."""

    def __init__(self):
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        x, y = batch
        for opt in self.optimizers():
            opt.zero_grad()
            self.manual_backward(F.cross_entropy(self(x), y))
            opt.step()

    def configure_optimizers(self):
        return [torch.optim.SGD(self.net[0].parameters(), lr=0.1), torch.optim.SGD(self.net[2].parameters(), lr=0.1)]


def test_manual_optimization_with_two_optimizers_is_refused(tmp_path):
    assert_refused_before_training(tmp_path, make_callback(tmp_path), "supports manual optimization with one "
                                   "optimizer; configure_optimizers returned 2", _TwoOptimizers())


def test_partly_frozen_model_tracks_the_trainable_layers(tmp_path):
    """A frozen first layer is left out by default; the rest is collected exactly; asking for the
    frozen layer by name is refused, saying why."""
    model = Classifier(lr=0.0)
    model.net[0].requires_grad_(False)
    cb = make_callback(tmp_path, **COLLECT_ONLY)
    fit(tmp_path, cb, model)
    assert [layer.name for layer in cb._collector.layers] == ["net.2"]
    assert_statistics_close(cb.statistics, offline_statistics(model), rtol=1e-5)

    frozen = Classifier()
    frozen.net[0].requires_grad_(False)
    assert_refused_before_training(tmp_path, make_callback(tmp_path, curvature=dict(layers=["net.0"])),
                                   r"module 'net.0' \(Linear\) cannot be tracked.*trainable weight", frozen)


class _SharedWeights(Classifier):
    """``mix`` is applied twice in one forward pass (tied weights)."""

    def __init__(self, lr: float = 0.1):
        super().__init__(lr=lr)
        self.mix = nn.Linear(16, 16)

    def forward(self, x):
        h = torch.tanh(self.net[0](x))
        h = torch.tanh(self.mix(torch.tanh(self.mix(h))))
        return self.net[2](h)


def test_module_called_twice_is_refused_then_excluded(tmp_path):
    message = assert_refused_before_training(tmp_path, make_callback(tmp_path), "called more than once",
                                             _SharedWeights())
    assert "mix (x2)" in message and "exclude them" in message
    model = _SharedWeights(lr=0.0)
    cb = make_callback(tmp_path, curvature=dict(exclude=["mix"]), **COLLECT_ONLY)
    fit(tmp_path, cb, model)
    assert [layer.name for layer in cb._collector.layers] == ["net.0", "net.2"]
    assert cb._collector.miscounted == {}
    assert_statistics_close(cb.statistics, offline_statistics(model, exclude=["mix"]), rtol=1e-5)
