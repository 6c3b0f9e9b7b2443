"""torch.compile'd models and manual optimisation: the callback collects the statistics (and
computes the scores) of the equivalent eager, automatically optimised run, and refuses what it
cannot monitor before training or at the first step that does it.

Compiling costs seconds on CPU: one test uses the default (inductor) backend, the others
``aot_eager``, which runs the same graph capture (Dynamo) and autograd (AOTAutograd) that decide
what the hooks see, without generating kernels."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F

from lightning_influence.loops import trainer as _trainer
from tests.reliability_helpers import (COLLECT_ONLY, Classifier, assert_refused_before_training,
                                       assert_statistics_close, fit, make_callback, seeded)

EPOCHS = dict(every_n_epochs=1, on_checkpoint=False, on_train_end=False)
FAST_BACKEND = "aot_eager"


def collected(tmp_path, model, **kwargs):
    cb = make_callback(tmp_path, **{**COLLECT_ONLY, **kwargs})
    fit(tmp_path, cb, model)
    return cb.statistics


def eager_statistics(tmp_path, **kwargs):
    return collected(tmp_path / "eager", seeded(Classifier), **kwargs)


def renamed(statistics, old: str, new: str):
    """The statistics with layer names rewritten (a compiled submodule's layers sit under ``_orig_mod``)."""
    statistics.state = {name.replace(old, new): parts for name, parts in statistics.state.items()}
    return statistics


# -- torch.compile -----------------------------------------------------------------------------------

def test_compiled_lightning_module_collects_the_eager_statistics(tmp_path):
    """``trainer.fit(torch.compile(model))`` (Lightning compiles forward and training_step), default
    backend: every collected step's statistics equal the eager run's within float tolerance."""
    statistics = collected(tmp_path / "compiled", torch.compile(seeded(Classifier)))
    assert_statistics_close(statistics, eager_statistics(tmp_path), rtol=1e-5)


def test_compiled_submodule_collects_the_eager_statistics(tmp_path):
    model = seeded(Classifier)
    model.net = torch.compile(model.net, backend=FAST_BACKEND)
    statistics = collected(tmp_path / "compiled", model)
    assert sorted(statistics.state) == ["net._orig_mod.0", "net._orig_mod.2"]  # the checkpoint's names too
    assert_statistics_close(renamed(statistics, "._orig_mod", ""), eager_statistics(tmp_path), rtol=1e-5)


@pytest.mark.parametrize("fisher", ["empirical", "true"])
def test_compiled_model_gets_the_eager_scores(tmp_path, fisher):
    """The whole computation: statistics from compiled training steps (for the true Fisher, sampled
    from the compiled step's outputs), then the engine's own passes, which run the model eagerly."""
    scores = {}
    for name, model in [("eager", seeded(Classifier)),
                        ("compiled", torch.compile(seeded(Classifier), backend=FAST_BACKEND))]:
        cb = make_callback(tmp_path / name, curvature=dict(fisher=fisher), **EPOCHS)
        fit(tmp_path / name, cb, model)
        assert [r.step for r in cb.results] == [12]
        scores[name] = cb.results[0].scores
    torch.testing.assert_close(scores["compiled"], scores["eager"], rtol=1e-4, atol=1e-6)


def test_code_compiled_before_fit_still_runs_the_hooks(tmp_path):
    """torch.compile does not recompile when module hooks are added: code compiled before the
    callback attached its hooks would skip them. The callback clears the compile caches once."""
    model = seeded(Classifier)
    model.net = torch.compile(model.net, backend=FAST_BACKEND)
    model.net(torch.randn(8, 2)).sum().backward()
    model.zero_grad()
    statistics = collected(tmp_path / "compiled", model)
    assert_statistics_close(renamed(statistics, "._orig_mod", ""), eager_statistics(tmp_path), rtol=1e-5)


@pytest.mark.parametrize("whole", [True, False])
def test_fullgraph_compilation_is_refused_before_training(tmp_path, whole):
    model = seeded(Classifier)
    if whole:
        model = torch.compile(model, backend=FAST_BACKEND, fullgraph=True)
    else:
        model.net = torch.compile(model.net, backend=FAST_BACKEND, fullgraph=True)
    where = "the LightningModule" if whole else "submodule 'net'"
    assert_refused_before_training(tmp_path, make_callback(tmp_path), model=model,
                                   match=rf"cannot monitor {where}, compiled with torch\.compile\(fullgraph=True\)"
                                         r".*compile without fullgraph=True")


def test_fullgraph_compilation_without_tracked_layers_is_accepted(tmp_path):
    """Only compiled regions holding a tracked layer matter (here: the activation alone)."""
    model = seeded(Classifier)
    model.net[1] = torch.compile(model.net[1], backend=FAST_BACKEND, fullgraph=True)
    statistics = collected(tmp_path / "compiled", model)
    assert_statistics_close(statistics, eager_statistics(tmp_path), rtol=1e-5)


def test_cuda_graph_modes_are_refused_on_gpu_only():
    """CUDA graphs exist on GPUs only; there, mode='reduce-overhead' is refused naming the mode
    (on CPU the mode compiles without CUDA graphs and is monitored like the default)."""
    model = seeded(Classifier)
    compiled = torch.compile(model, mode="reduce-overhead")
    contexts = [("the LightningModule", compiled.dynamo_ctx)]
    assert _trainer._compile_problem(contexts, "cpu") is None
    message = _trainer._compile_problem(contexts, "cuda")
    assert "mode='reduce-overhead'" in message and "compile with mode='default'" in message
    default = [("the LightningModule", torch.compile(model).dynamo_ctx)]
    assert _trainer._compile_problem(default, "cuda") is None


class FunctionalClassifier(Classifier):
    """A training step that applies the layers' weights functionally: no module hook fires."""

    def training_step(self, batch, batch_idx):
        x, y = batch
        hidden = torch.tanh(F.linear(x, self.net[0].weight, self.net[0].bias))
        return F.cross_entropy(F.linear(hidden, self.net[2].weight, self.net[2].bias), y)


def test_a_training_step_bypassing_the_hooks_is_refused_at_the_first_step(tmp_path):
    cb = make_callback(tmp_path, **COLLECT_ONLY)
    with pytest.raises(ValueError, match="back-propagated without running any tracked layer's hooks"):
        fit(tmp_path, cb, seeded(FunctionalClassifier))


# -- manual optimisation -----------------------------------------------------------------------------

class ManualClassifier(Classifier):
    """The blob classifier optimised by hand: one optimizer, one ``manual_backward`` per step (the
    same updates as automatic optimisation)."""

    def __init__(self, backward_passes: int = 1):
        super().__init__()
        self.automatic_optimization = False
        self.backward_passes = backward_passes

    def training_step(self, batch, batch_idx):
        x, y = batch
        optimizer = self.optimizers()
        optimizer.zero_grad()
        for _ in range(self.backward_passes):  # e.g. one loss per optimizer, as in a GAN
            self.manual_backward(F.cross_entropy(self(x), y))
        optimizer.step()


def test_manual_optimization_collects_the_automatic_statistics_and_scores(tmp_path):
    automatic = collected(tmp_path / "automatic", seeded(Classifier))
    manual = collected(tmp_path / "manual", seeded(ManualClassifier))
    assert_statistics_close(manual, automatic, rtol=1e-6)
    assert float(manual.state["net.0"]["s_count"]) == 96  # every example of the epoch, once
    scores = {}
    for name, cls in [("automatic", Classifier), ("manual", ManualClassifier)]:
        cb = make_callback(tmp_path / f"{name}-scores", **EPOCHS)
        fit(tmp_path / f"{name}-scores", cb, seeded(cls))
        assert [r.step for r in cb.results] == [12]  # global_step advances with optimizer.step()
        scores[name] = cb.results[0].scores
    torch.testing.assert_close(scores["manual"], scores["automatic"])


class CountBatches(pl.Callback):
    def __init__(self):
        self.batches = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.batches += 1


def test_several_backward_passes_per_step_are_refused_at_the_first_step(tmp_path):
    counter = CountBatches()
    cb = make_callback(tmp_path, **COLLECT_ONLY)
    with pytest.raises(ValueError, match=r"training_step ran 2 backward passes in one step \(manual_backward calls"
                                         r".*call manual_backward once"):
        fit(tmp_path, cb, seeded(ManualClassifier, backward_passes=2), callbacks=[counter])
    assert counter.batches == 1

