"""InfluenceCallback with real Trainers on tiny models: ranking, triggers, files, resume, training
untouched, both Lightning packages, configuration."""

from __future__ import annotations

import dataclasses
import inspect
import json
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint

import lightning_influence as li
from lightning_influence.loops.callback import InfluenceCallback
from lightning_influence.config import InfluenceConfig
from lightning_influence.engine.curvature_passes import accumulate_covariances
from tests.callback_models import make_datamodule_class, make_module_class, merged_settings, planted_data

Classifier = make_module_class(pl)
BlobData = make_datamodule_class(pl)
QUIET = dict(logger=False, enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
             accelerator="cpu", devices=1)


def callback(tmp_path, **kwargs):
    defaults = dict(task=li.ClassificationTask(), num_queries=4, output_dir=str(tmp_path / "influence"),
                    on_error="raise", report=dict(mode="off", show_progress=False),
                    curvature=dict(collect_every_n_steps=1))
    return InfluenceCallback(**merged_settings(defaults, kwargs))


def fit(tmp_path, cb, *, max_epochs=3, model_kwargs=None, data_kwargs=None, callbacks=(), seed=0, **trainer_kwargs):
    pl.seed_everything(seed, verbose=False)
    train, val, planted = planted_data()
    model = Classifier(**(model_kwargs or {}))
    data = BlobData(train, val, **(data_kwargs or {}))
    kwargs = dict(QUIET, max_epochs=max_epochs, default_root_dir=str(tmp_path))
    kwargs.update(trainer_kwargs)
    trainer = pl.Trainer(callbacks=[c for c in [cb, *callbacks] if c is not None], **kwargs)
    trainer.fit(model, data)
    return trainer, model, planted


# -- the product in one test ----------------------------------------------------------------------------
def test_planted_near_copy_ranked_first_and_results_on_disk(tmp_path):
    cb = callback(tmp_path)
    trainer, model, planted = fit(tmp_path, cb, max_epochs=4)
    results = cb.results
    assert [r.step for r in results] == [6, 12, 18, 24]  # one per epoch (96 examples / 16)
    final = results[-1]
    assert final.scores.shape == (4, 96)
    assert int(final.scores[0].argmax()) == planted
    assert int(final.get("top_ids")[0, 0]) == planted
    assert torch.equal(final.query_ids, torch.arange(4))
    # Top/bottom-k carry per-token and per-layer scores that sum to theirs; over the whole pool only
    # the per-layer sums are kept (no [L, Q, N]).
    top_ids, top_tokens = final.get("top_ids"), final.get("top_token_scores")
    assert top_ids.shape == (4, 10) and top_tokens.shape == (4, 10, 1)
    positions = torch.searchsorted(final.train_ids, top_ids)
    torch.testing.assert_close(top_tokens.sum(-1), final.scores.gather(1, positions), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(final.get("top_layer_scores").sum(0), final.scores.gather(1, positions),
                               atol=1e-5, rtol=1e-4)
    assert final.layer_scores is None and final.get("layer_abs_sums").shape == (2, 4)
    assert torch.equal(final.get("bottom_ids")[:, 0], final.train_ids[final.scores.argmin(1)])
    # On disk: result directories under output_dir, factors next to them, lazily loaded handles.
    on_disk = li.load_results(tmp_path / "influence")
    assert [r.step for r in on_disk] == [6, 12, 18, 24]
    assert on_disk[0]._tensor_file is not None  # nothing read until a tensor is used
    torch.testing.assert_close(on_disk[-1].scores, final.scores)
    factors = li.load_factors(Path(final.path) / "factors")
    assert factors.strategy == "ekfac" and factors.layer_names == ["net.0", "net.2"]
    rescored = li.compute_influence(model, li.ClassificationTask(), planted_data()[0],
                                    torch.utils.data.Subset(planted_data()[1], range(4)), factors)
    torch.testing.assert_close(rescored.scores, final.scores, atol=1e-4, rtol=1e-3)
    meta = final.meta
    assert meta["n_pool"] == 96 and meta["n_query"] == 4 and meta["strategy"] == "ekfac"
    assert set(meta["timings"]) >= {"factors", "scores", "token_scores"}
    assert meta["checkpoint_path"].endswith("epoch=3-step=24.ckpt") and Path(meta["checkpoint_path"]).is_file()
    assert "every_n_epochs" in meta["reasons"] and "checkpoint" in meta["reasons"]


def test_lightning_pytorch_import_path(tmp_path):
    import lightning.pytorch as lpl

    from lightning_influence.lightning import InfluenceCallback as LightningInfluenceCallback

    assert issubclass(LightningInfluenceCallback, lpl.Callback) and not issubclass(LightningInfluenceCallback, pl.Callback)
    assert not issubclass(InfluenceCallback, lpl.Callback)
    lpl.seed_everything(0, verbose=False)
    train, val, planted = planted_data()
    cb = LightningInfluenceCallback(li.ClassificationTask(), num_queries=2, output_dir=str(tmp_path / "out"),
                                    on_error="raise", report=dict(mode="off", show_progress=False), every_n_epochs=None,
                                    on_checkpoint=False)
    trainer = lpl.Trainer(max_epochs=4, callbacks=[cb], default_root_dir=str(tmp_path), **QUIET)
    trainer.fit(make_module_class(lpl)(), make_datamodule_class(lpl)(train, val))
    assert [r.step for r in cb.results] == [24]
    assert int(cb.results[0].scores[0].argmax()) == planted


# -- never change training ------------------------------------------------------------------------------
@pytest.mark.parametrize("fisher", ["empirical", "true"])
def test_final_weights_identical_with_and_without_callback(tmp_path, fisher):
    run = dict(max_epochs=2, model_kwargs=dict(dropout=0.3), precision="32-true")
    _, plain, _ = fit(tmp_path / "plain", None, **run)
    cb = callback(tmp_path, every_n_train_steps=4, every_n_epochs=None, on_checkpoint=False,
                  curvature=dict(fisher=fisher, max_tokens_per_step=8))
    trainer, tracked, _ = fit(tmp_path / "tracked", cb, **run)
    assert [r.step for r in cb.results] == [4, 8, 12]  # computations mid-training happened
    for (name, a), (_, b) in zip(plain.state_dict().items(), tracked.state_dict().items()):
        assert torch.equal(a, b), name
    assert all(m.training for m in tracked.modules())


# -- triggers ------------------------------------------------------------------------------------------
def test_triggers_one_computation_per_step_none_in_sanity_check(tmp_path):
    cb = callback(tmp_path, every_n_train_steps=4, every_n_epochs=1)
    saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=8, save_top_k=-1)
    fit(tmp_path, cb, max_epochs=2, callbacks=[saver], num_sanity_val_steps=2)
    steps = [r.step for r in cb.results]
    # steps 4 and 8 (every 4), 6 (epoch end), 12 (epoch end, every 4, train end): once each
    assert steps == [4, 6, 8, 12]
    by_step = {r.step: r for r in cb.results}
    assert by_step[8].meta["reasons"] == ["every_n_train_steps", "checkpoint"]
    assert by_step[8].meta["checkpoint_path"] == str(tmp_path / "ckpt" / "epoch=1-step=8.ckpt")
    assert by_step[12].meta["reasons"] == ["every_n_train_steps", "every_n_epochs", "train_end"]
    assert by_step[4].meta["checkpoint_path"] is None
    # the index in the last checkpoint agrees
    state = torch.load(tmp_path / "ckpt" / "epoch=1-step=8.ckpt", weights_only=True)["callbacks"][cb.state_key]
    assert [e["step"] for e in state["index"]] == [4, 6, 8]
    # each result counts the steps its statistics hold (since the previous computation), and all of them
    assert [by_step[s].meta["steps_collected"] for s in (4, 6, 8, 12)] == [4, 2, 2, 4]
    assert [by_step[s].meta["steps_collected_total"] for s in (4, 6, 8, 12)] == [4, 6, 8, 12]


def test_checkpoint_only_trigger_from_validation_hook(tmp_path):
    """ModelCheckpoint saves in on_validation_end (inference mode): the callback leaves it."""
    cb = callback(tmp_path, every_n_epochs=None, on_train_end=False)
    saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="val_loss", save_top_k=-1)
    fit(tmp_path, cb, max_epochs=2, callbacks=[saver])
    assert [r.step for r in cb.results] == [6, 12]
    assert [r.meta["reasons"] for r in cb.results] == [["checkpoint"], ["checkpoint"]]
    assert cb.results[1].meta["checkpoint_path"] == str(tmp_path / "ckpt" / "epoch=1-step=12.ckpt")
    assert torch.isfinite(cb.results[1].scores).all() and cb.results[1].scores.abs().sum() > 0


# -- statistics from training steps equal an offline pass ---------------------------------------------------
@pytest.mark.parametrize("reduction,accumulate", [("mean", 1), ("mean", 2), ("sum", 1)])
def test_training_statistics_equal_offline_pass(tmp_path, reduction, accumulate):
    """With lr=0 the weights stay put, so one epoch of training-step statistics must equal one offline
    pass over the same data: checks the rescaling for the loss reduction and gradient accumulation."""
    import torch.nn.functional as F

    class SumLoss(Classifier):
        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.cross_entropy(self(x), y, reduction="sum")

    cb = callback(tmp_path, every_n_epochs=None, on_checkpoint=False, on_train_end=False, every_n_train_steps=1000,
                  curvature=dict(loss_reduction=reduction, collect_every_n_steps=1))
    pl.seed_everything(0, verbose=False)
    train, val, _ = planted_data()
    model = (SumLoss if reduction == "sum" else Classifier)(lr=0.0)
    trainer = pl.Trainer(callbacks=[cb], max_epochs=1, accumulate_grad_batches=accumulate,
                         default_root_dir=str(tmp_path), **QUIET)
    trainer.fit(model, BlobData(train, val, batch_size=8, shuffle=False))
    layers = cb.statistics.state
    offline = accumulate_covariances(model, li.ClassificationTask(), train,
                                     li.select_layers(model), fisher="empirical", batch_size=8)
    for name, parts in offline.state.items():
        for key, value in parts.items():
            torch.testing.assert_close(layers[name][key], value, rtol=1e-5, atol=1e-6, msg=f"{name}/{key}")


def test_true_fisher_reuses_outputs_or_runs_an_extra_pass(tmp_path):
    """Sampling from the step's outputs and from an extra forward give the same statistics (no dropout)."""
    stats = []
    for call_self in (True, False):  # training_step calls self(x) (outputs reused) or self.net(x) (extra pass)
        cb = callback(tmp_path / str(call_self), every_n_epochs=None, on_checkpoint=False, on_train_end=False,
                      every_n_train_steps=1000, curvature=dict(fisher="true"))
        fit(tmp_path / str(call_self), cb, max_epochs=1, model_kwargs=dict(call_self=call_self))
        stats.append(cb.statistics.state)
    for name in stats[0]:
        for key in stats[0][name]:
            torch.testing.assert_close(stats[0][name][key], stats[1][name][key], rtol=1e-4, atol=1e-6)


# -- resume ------------------------------------------------------------------------------------------
class _Kill(pl.Callback):
    def __init__(self, epoch):
        self.epoch = epoch

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == self.epoch:
            raise RuntimeError("killed")


def test_resume_from_epoch_checkpoint_matches_uninterrupted_run(tmp_path):
    settings = dict(every_n_epochs=2, on_checkpoint=False, scoring=dict(max_train_examples=40))
    run = dict(data_kwargs=dict(shuffle=False), max_epochs=4)

    full = callback(tmp_path / "full", **settings)
    fit(tmp_path / "full", full, callbacks=[ModelCheckpoint(dirpath=tmp_path / "full/ckpt", save_top_k=-1)], **run)

    first = callback(tmp_path / "resumed", **settings)
    with pytest.raises(RuntimeError, match="killed"):
        fit(tmp_path / "resumed", first, callbacks=[ModelCheckpoint(dirpath=tmp_path / "resumed/ckpt", save_top_k=-1),
                                                    _Kill(epoch=3)], **run)
    ckpt = tmp_path / "resumed/ckpt/epoch=2-step=18.ckpt"
    state = torch.load(ckpt, weights_only=True)["callbacks"][first.state_key]
    assert state["collector"]["stats"]["net.0/a_count"] > 0  # the checkpoint holds a window in progress
    second = callback(tmp_path / "resumed", **settings)
    pl.seed_everything(0, verbose=False)
    train, val, _ = planted_data()
    trainer = pl.Trainer(callbacks=[second, ModelCheckpoint(dirpath=tmp_path / "resumed/ckpt", save_top_k=-1)],
                         max_epochs=4, default_root_dir=str(tmp_path / "resumed"), **QUIET)
    trainer.fit(Classifier(), BlobData(train, val, shuffle=False), ckpt_path=str(ckpt))

    assert [r.step for r in second.results] == [r.step for r in full.results] == [12, 24]
    for a, b in zip(full.results, second.results):
        assert torch.equal(a.train_ids, b.train_ids) and len(a.train_ids) == 40
        torch.testing.assert_close(a.scores, b.scores, rtol=1e-4, atol=1e-6)
    fa, fb = (li.load_factors(Path(r.results[-1].path) / "factors") for r in (full, second))
    for name in fa.layers:
        for key in fa.layers[name]:
            torch.testing.assert_close(fa.layers[name][key].abs(), fb.layers[name][key].abs(), rtol=1e-4, atol=1e-6)


def test_resume_with_other_configuration_is_refused(tmp_path):
    cb = callback(tmp_path, every_n_epochs=1)
    fit(tmp_path, cb, max_epochs=1, callbacks=[ModelCheckpoint(dirpath=tmp_path / "ckpt")])
    ckpt = next((tmp_path / "ckpt").glob("*.ckpt"))
    train, val, _ = planted_data()
    for changed, match in ((dict(curvature=dict(strategy="kfac")), "strategy: checkpoint 'ekfac' vs now 'kfac'"),
                           (dict(curvature=dict(layers=["net.2"])), "track other layers")):
        other = callback(tmp_path, every_n_epochs=1, **changed)
        trainer = pl.Trainer(callbacks=[other], max_epochs=2, default_root_dir=str(tmp_path), **QUIET)
        with pytest.raises(ValueError, match=match):
            trainer.fit(Classifier(), BlobData(train, val), ckpt_path=str(ckpt))


# -- trajectory ----------------------------------------------------------------------------------------
def test_aggregate_callback_results(tmp_path):
    cb = callback(tmp_path, scoring=dict(max_train_examples=30))
    fit(tmp_path, cb, max_epochs=3)
    results = cb.results
    combined = li.aggregate(results)
    assert combined.scores.shape == results[0].scores.shape
    expected = sum(r.scores.double() / r.scores.abs().mean() for r in results) / len(results)
    torch.testing.assert_close(combined.scores.double(), expected, rtol=1e-5, atol=1e-6)
    assert combined.meta["aggregated_steps"] == [6, 12, 18]


# -- reporting -----------------------------------------------------------------------------------------
def test_results_are_published_to_loggers_and_report_files(tmp_path):
    from pytorch_lightning.loggers import CSVLogger

    cb = InfluenceCallback(li.ClassificationTask(), num_queries=1, every_n_epochs=None, on_checkpoint=False,
                           on_error="raise", scoring=dict(top_k=3), report=dict(show_progress=False))
    fit(tmp_path, cb, max_epochs=1, logger=CSVLogger(tmp_path, name="csv"))
    (result,) = cb.results
    assert Path(result.path).parent == Path(tmp_path / "csv" / "version_0" / "influence")  # <log_dir>/influence
    summary = json.loads((Path(result.path) / "report" / "summary.json").read_text())
    assert summary["step"] == 6
    metrics = (tmp_path / "csv" / "version_0" / "metrics.csv").read_text().splitlines()[0]
    assert "influence/" in metrics


# -- configuration -------------------------------------------------------------------------------------
def test_config_dataclass_mirrors_the_signature():
    """One keyword per config field: the common settings flat, each group whole (``None``: its defaults)."""
    params = inspect.signature(InfluenceCallback.__init__).parameters
    fields = {f.name: f for f in dataclasses.fields(InfluenceConfig)}
    named = [name for name, p in params.items() if name != "self" and p.kind is not inspect.Parameter.VAR_KEYWORD]
    assert list(fields) == named
    for name, field in fields.items():
        default = params[name].default
        if field.default_factory is not dataclasses.MISSING:  # a group
            assert default is None, name
            continue
        expected = inspect.Parameter.empty if field.default is dataclasses.MISSING else field.default
        assert default == expected, name


def test_from_config_with_omegaconf_and_hydra_style_yaml(tmp_path):
    from omegaconf import OmegaConf

    base = OmegaConf.structured(InfluenceConfig)
    cfg = OmegaConf.merge(base, OmegaConf.create(
        "task: classification\nnum_queries: 8\nevery_n_train_steps: 16\n"
        "curvature: {exclude: [net.2], covariance_dtype: float64}\n"))
    cb = InfluenceCallback.from_config(cfg)
    assert isinstance(cb.task, li.ClassificationTask)
    assert cb.config.every_n_train_steps == 16 and cb.config.curvature.exclude == ("net.2",)
    assert cb.config.curvature.covariance_dtype == "float64"
    with pytest.raises(ValueError, match="unknown InfluenceConfig fields \\['nonsense'\\]"):
        InfluenceCallback.from_config({"task": "classification", "nonsense": 1})


def test_lightning_cli_introspects_the_arguments():
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_class_arguments(InfluenceCallback, "cb")
    cfg = parser.parse_args(["--cb.task=regression", "--cb.every_n_epochs=2", '--cb.curvature={"fisher": "true"}'])
    cb = parser.instantiate_classes(cfg).cb  # as LightningCLI builds it: the groups instantiated too
    assert isinstance(cb, InfluenceCallback)
    assert isinstance(cb.task, li.RegressionTask) and cb.config.every_n_epochs == 2
    assert cb.config.curvature.fisher == "true"


@pytest.mark.parametrize("kwargs,field", [
    (dict(curvature=dict(strategy="ekfca")), "strategy"),
    (dict(curvature=dict(fisher="exact")), "fisher"),
    (dict(curvature=dict(damping=-1.0)), "damping"),
    (dict(num_queries=0), "num_queries"),
    (dict(every_n_epochs=0), "every_n_epochs"),
    (dict(curvature=dict(loss_reduction="avg")), "loss_reduction"),
    (dict(window="sliding"), "window"),  # the deprecated flat name, refused before its FutureWarning
    (dict(curvature={"ema_decay": 1.0}), "ema_decay"),
    (dict(curvature=dict(covariance_dtype="bfloat16")), "covariance_dtype"),
    (dict(query_data="train"), "query_data"),
    (dict(task="translation"), "task"),
    (dict(curvature=dict(layers="net.0")), "layers"),
    (dict(scoring=dict(max_train_examples=-3)), "max_train_examples"),
    (dict(every_n_epochs=None, on_checkpoint=False, on_train_end=False), "trigger"),
    (dict(every_n_train_steps=2, curvature=dict(collect_every_n_steps=5), every_n_epochs=None),
     "collect_every_n_steps"),
])
def test_invalid_arguments_fail_in_init_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        InfluenceCallback(**{"task": "classification", **kwargs})


# -- mixed precision ----------------------------------------------------------------------------------
def _collect_under(tmp_path, **trainer_kwargs):
    cb = callback(tmp_path, every_n_epochs=None, on_checkpoint=False, on_train_end=False, every_n_train_steps=1000)
    pl.seed_everything(0, verbose=False)
    train, val, _ = planted_data()
    model = Classifier(lr=0.0)  # weights fixed: statistics comparable with one offline pass
    trainer = pl.Trainer(callbacks=[cb], max_epochs=1, default_root_dir=str(tmp_path), **QUIET, **trainer_kwargs)
    trainer.fit(model, BlobData(train, val, batch_size=8, shuffle=False))
    return cb, model, train


def _assert_stats_close(cb, model, data, rtol):
    offline = accumulate_covariances(model, li.ClassificationTask(), data, li.select_layers(model),
                                     fisher="empirical", batch_size=8)
    for name, parts in offline.state.items():
        for key, value in parts.items():
            got = cb.statistics.state[name][key]
            assert got.dtype == value.dtype  # float32 sums, float64 counts
            torch.testing.assert_close(got, value, rtol=rtol, atol=rtol * value.abs().max().item(), msg=f"{name}/{key}")


def test_fp16_loss_scale_is_undone_and_skipped_steps_dropped(tmp_path):
    from pytorch_lightning.plugins.precision import MixedPrecision

    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**24)  # overflows first: the scaler skips steps
    cb, model, train = _collect_under(tmp_path, plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)])
    assert scaler.is_enabled() and scaler.get_scale() < 2.0**24
    skipped = cb.steps_skipped
    assert 0 < skipped < 12
    kept = torch.utils.data.Subset(train, range(8 * skipped, len(train)))  # unshuffled: the first steps were skipped
    _assert_stats_close(cb, model, kept, rtol=2e-2)


def test_bf16_autocast_accumulates_in_float32(tmp_path):
    cb, model, train = _collect_under(tmp_path, precision="bf16-mixed")
    assert cb.steps_skipped == 0
    _assert_stats_close(cb, model, train, rtol=3e-2)
