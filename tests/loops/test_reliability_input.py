"""Reliability: bad input is refused before training with a message that says what to change (one
test per case; the list with the messages is in README.md, "Bad input"), memory limits, and no unpickling
of user-given files."""

from __future__ import annotations

import logging
import pickle
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from pytorch_lightning.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import IterableDataset, TensorDataset

import lightning_influence as li
from lightning_influence._io import FormatError
from lightning_influence.loops.callback import InfluenceCallback
from tests.callback_models import planted_data
from tests.reliability_helpers import (COLLECT_ONLY, BlobData, Classifier, assert_refused_before_training, fit,
                                       make_callback)

PACKAGE = Path(li.__file__).parent


# -- bad input: refused in __init__ --------------------------------------------------------------
def test_negative_damping():
    with pytest.raises(ValueError, match=r"damping must be a number from 0 to 1e\+30 .*or None for the per-layer "
                                         r"heuristic; got -0.1"):
        InfluenceCallback("classification", curvature=dict(damping=-0.1))


def test_unknown_strategy():
    with pytest.raises(ValueError, match="strategy must be one of 'ekfac', 'kfac', 'diagonal', 'identity', "
                                         "got 'ekfca'"):
        InfluenceCallback("classification", curvature=dict(strategy="ekfca"))


# -- bad input: refused at setup, before the first training batch -----------------------------------
def test_empty_query_set(tmp_path):
    empty = TensorDataset(torch.zeros(0, 2), torch.zeros(0, dtype=torch.long))
    assert_refused_before_training(tmp_path, make_callback(tmp_path, query_data=empty),
                                   "the query set is empty; pass query_data with at least one example")


class _DictQueries(torch.utils.data.Dataset):
    """Queries batched as dicts with keys the model's forward does not take."""

    def __len__(self):
        return 4

    def __getitem__(self, index):
        return {"input_ids": torch.zeros(2), "labels": torch.tensor(0)}


@pytest.mark.parametrize("queries,error", [
    (TensorDataset(torch.zeros(4, 3), torch.zeros(4, dtype=torch.long)), "shapes cannot be multiplied"),
    (_DictQueries(), "unexpected keyword argument 'input_ids'"),
    (TensorDataset(torch.zeros(4, 2), torch.full((4,), 7)), "out of bounds"),
], ids=["features", "keys", "labels"])
def test_query_set_the_model_cannot_take(tmp_path, queries, error):
    message = assert_refused_before_training(tmp_path, make_callback(tmp_path, query_data=queries),
                                             "the task cannot evaluate the model on a query batch")
    assert error in message and "check query_data / train_data or override Task.forward" in message


def test_unknown_module_names_suggest_close_matches(tmp_path):
    assert_refused_before_training(tmp_path, make_callback(tmp_path, curvature=dict(layers=["net.3"])),
                                   "include: no module named or matching 'net.3' in the model; did you mean "
                                   "'net.2', 'net.1', 'net.0'")
    assert_refused_before_training(tmp_path, make_callback(tmp_path, curvature=dict(exclude=["nett.2"])),
                                   "exclude: no module named or matching 'nett.2' in the model; did you mean 'net.2'")


class _AllFrozen(Classifier):
    """Only a temperature is trained; every linear layer is frozen."""

    def __init__(self):
        super().__init__()
        self.net.requires_grad_(False)
        self.temperature = nn.Parameter(torch.ones(()))

    def forward(self, x):
        return self.net(x) * self.temperature


def test_nothing_trackable(tmp_path):
    assert_refused_before_training(tmp_path, make_callback(tmp_path), r"no trackable layer found \(tracked: nn.Linear, "
                                   r"nn.Conv2d, GPT-2 Conv1D with trainable weights.*Linear x2.*; "
                                   r"frozen \(requires_grad=False\), so left out: net.0, net.2", _AllFrozen())


class _MeanLossTask(li.ClassificationTask):
    def loss_from_outputs(self, outputs, batch):
        return F.cross_entropy(outputs, batch[1])


def test_task_loss_not_per_example(tmp_path):
    assert_refused_before_training(tmp_path, make_callback(tmp_path, task=_MeanLossTask()),
                                   r"the task's loss must be per example, shape \(32,\), got \(\) on a training batch; "
                                   "return one value per example")


@pytest.mark.parametrize("settings,trainer_kwargs,message", [
    (dict(every_n_epochs=3), dict(max_epochs=2), "every_n_epochs=3 never fires with max_epochs=2; lower it or set "
                                                 "every_n_epochs=None"),
    (dict(every_n_epochs=None, every_n_train_steps=50), dict(max_steps=10), "every_n_train_steps=50 never fires "
                                                                           "with max_steps=10"),
    (dict(every_n_epochs=None, on_train_end=False), dict(enable_checkpointing=False),
     r"on_checkpoint is the only trigger but the trainer saves no checkpoints \(no ModelCheckpoint\)"),
], ids=["epochs", "steps", "checkpoints"])
def test_trigger_that_never_fires(tmp_path, settings, trainer_kwargs, message):
    assert_refused_before_training(tmp_path, make_callback(tmp_path, **settings), message, **trainer_kwargs)


def test_step_trigger_beyond_an_epoch_bounded_run_warns(tmp_path):
    """With max_epochs (not max_steps) bounding the run, the length is known only from the data: the
    callback warns rather than refuses (collecting without computing is a legitimate use)."""
    cb = make_callback(tmp_path, **COLLECT_ONLY)
    with pytest.warns(RuntimeWarning, match="every_n_train_steps=1000 is more than the 12 optimizer steps of this "
                                            "run and no other trigger is enabled, so influence will never be "
                                            "computed; lower it or set on_train_end=True"):
        fit(tmp_path, cb)
    assert cb.results == [] and cb.statistics.state["net.0"]["a_count"] == 96


def test_max_train_examples_larger_than_the_pool(tmp_path):
    assert_refused_before_training(tmp_path, make_callback(tmp_path, scoring=dict(max_train_examples=500)),
                                   r"max_train_examples=500 is larger than the candidate pool \(96 examples\); "
                                   "lower it or set it to None")


class _Stream(IterableDataset):
    def __iter__(self):
        yield from planted_data()[0]


def test_a_streaming_pool_without_ids(tmp_path):
    """An IterableDataset pool is read as a stream, whose items must be mappings with an integer id."""
    assert_refused_before_training(tmp_path, make_callback(tmp_path, train_data=_Stream()),
                                   r"item 0 of the streaming pool is a tuple, not a mapping: a streaming train_data "
                                   r"must yield dicts with a stable integer id under 'id'")


# -- memory ---------------------------------------------------------------------------------------
def _layer_bytes(d_in: int, d_out: int) -> int:
    """float32 A, S and eigenvalue matrix of a linear layer with bias."""
    return 4 * ((d_in + 1) ** 2 + d_out**2 + (d_in + 1) * d_out)


def test_memory_estimate_is_logged_at_setup(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="lightning_influence")
    fit(tmp_path, make_callback(tmp_path, **COLLECT_ONLY), Classifier(hidden=512), limit_train_batches=1)
    (record,) = [r for r in caplog.records if "lightning-influence: tracking" in r.getMessage()]
    statistics = 2 * (_layer_bytes(2, 512) + _layer_bytes(512, 3))  # sums + one step's buffer
    scores = 4 * 4 * 96 + 8 * 4 * 2  # float32 [queries, examples] + float64 per-layer sums [queries, 2 layers]
    assert record.getMessage() == (f"lightning-influence: tracking 2 layers; statistics {statistics / 2**20:.3g} MiB, "
                                   f"scores {scores / 2**20:.3g} MiB (4 queries x 96 training examples, and "
                                   "per-layer sums)")


def test_layers_over_the_per_layer_limit_are_skipped_with_a_warning(tmp_path):
    limit = (_layer_bytes(2, 16) + _layer_bytes(16, 3)) / 2 / 2**20  # between the two layers' sizes
    cb = make_callback(tmp_path, curvature=dict(max_layer_mb=limit), every_n_epochs=None, on_checkpoint=False)
    with pytest.warns(UserWarning, match=r"skipping layers over the per-layer limit of 0.00126 MiB: net.2 "
                                         r"\(0.00133 MiB\)$"):
        fit(tmp_path, cb, max_steps=2)
    (result,) = cb.results
    assert result.layer_names == ["net.0"] and torch.isfinite(result.scores).all()


def test_memory_budget_refused_up_front_naming_the_costliest_layers(tmp_path):
    message = assert_refused_before_training(tmp_path, make_callback(tmp_path, curvature=dict(memory_budget_mb=1.5)),
                                             "over the memory budget of 1.5 MiB", Classifier(hidden=512))
    assert "need 2.02 MiB" in message
    assert "costliest layers: net.2 (1.01 MiB), net.0 (1.01 MiB). Exclude some of them" in message


# -- security: nothing a user gives is unpickled -------------------------------------------------------
def test_package_never_unpickles():
    """Every torch.load passes weights_only=True; nothing calls pickle's loaders."""
    for path in PACKAGE.rglob("*.py"):
        source = path.read_text()
        assert not re.search(r"pickle\.(load|loads|Unpickler)\b|allow_pickle\s*=\s*True|weights_only\s*=\s*False",
                             source), path
        for call in re.finditer(r"torch\.load\(", source):
            assert "weights_only=True" in source[call.start():source.index("\n", call.start())], path


class _Payload:
    """Unpickling this creates ``marker``: proof that a loader executed the file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_results_and_factors_load_without_pickle(tmp_path, monkeypatch):
    result = li.InfluenceResult(scores=torch.randn(2, 5), train_ids=torch.arange(5), query_ids=torch.arange(2),
                                layer_names=["net.0"], step=3)
    result.save(tmp_path / "result")
    model = Classifier()
    li.fit_factors(model, li.ClassificationTask(), planted_data()[0], fisher="empirical").save(tmp_path / "factors")

    def forbidden(*args, **kwargs):
        raise AssertionError("a loader unpickled something")

    for name in ("load", "loads", "Unpickler"):
        monkeypatch.setattr(pickle, name, forbidden)
    monkeypatch.setattr(torch, "load", forbidden)
    torch.testing.assert_close(li.InfluenceResult.load(tmp_path / "result").scores, result.scores)
    assert li.load_factors(tmp_path / "factors").layer_names == ["net.0", "net.2"]


@pytest.mark.parametrize("writer", ["pickle", "torch.save"])
def test_malicious_pickle_where_a_result_is_expected_is_rejected_unexecuted(tmp_path, writer):
    marker = tmp_path / "pwned"
    run = tmp_path / "influence"
    li.InfluenceResult(scores=torch.zeros(1, 2), train_ids=torch.arange(2), query_ids=torch.arange(1),
                       layer_names=["net.0"], step=6).save(run / "step=6")
    model = Classifier()
    li.fit_factors(model, li.ClassificationTask(), planted_data()[0], fisher="empirical").save(run / "step=6/factors")
    for target in (run / "step=6/tensors.safetensors", run / "step=6/factors/tensors.safetensors"):
        with open(target, "wb") as fh:
            pickle.dump(_Payload(marker), fh) if writer == "pickle" else torch.save(_Payload(marker), fh)
    with pytest.raises(FormatError, match="corrupted or not a safetensors file"):
        li.load_results(run)[0].scores
    with pytest.raises(FormatError, match="corrupted or not a safetensors file"):
        li.load_factors(run / "step=6/factors")
    assert not marker.exists()


def test_checkpoints_resume_weights_only_and_the_cli_refuses_a_malicious_one(tmp_path):
    from lightning_influence import cli

    first = make_callback(tmp_path, every_n_epochs=1, on_checkpoint=False)
    fit(tmp_path, first, batch_size=16, enable_checkpointing=True, callbacks=[ModelCheckpoint(dirpath=tmp_path / "ckpt")])
    ckpt = next((tmp_path / "ckpt").glob("*.ckpt"))
    state = torch.load(ckpt, weights_only=True)["callbacks"][first.state_key]
    assert state["collector"]["stats"]["net.0/a_sum"].shape == (3, 3)
    cb = make_callback(tmp_path, every_n_epochs=1, on_checkpoint=False)
    train, val, _ = planted_data()
    from tests.reliability_helpers import make_trainer

    trainer = make_trainer(tmp_path, [cb], max_epochs=2)
    trainer.fit(Classifier(), BlobData(train, val, batch_size=16), ckpt_path=str(ckpt), weights_only=True)
    assert [r.step for r in cb.results] == [6, 12]

    marker = tmp_path / "pwned"
    torch.save({"state_dict": _Payload(marker)}, tmp_path / "evil.ckpt")
    with pytest.raises(cli.CommandError, match="cannot restore"):
        cli._load_model("tests.reliability_helpers:Classifier", tmp_path / "evil.ckpt")
    assert not marker.exists()
