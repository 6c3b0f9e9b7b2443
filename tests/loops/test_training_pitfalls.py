"""Training set-ups that used to give wrong or no results without a word: activation
checkpointing, a loss reduced otherwise than declared, and a run moved or copied before resuming."""

from __future__ import annotations

import re
import shutil
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from torch import nn

from tests.callback_models import planted_data
from tests.reliability_helpers import COLLECT_ONLY, BlobData, Classifier, fit, make_callback, seeded

EPOCHS = dict(every_n_epochs=1, on_checkpoint=False, on_train_end=False)


class CheckpointedClassifier(Classifier):
    """The blob classifier with its output layer under ``torch.utils.checkpoint`` in training (its
    input requires gradients, as Hugging Face arranges for reentrant checkpointing)."""

    def __init__(self, use_reentrant: bool):
        super().__init__()
        self.use_reentrant = use_reentrant

    def forward(self, x):
        if self.training:
            return checkpoint(lambda h: self.net[2](self.net[1](h)), self.net[0](x), use_reentrant=self.use_reentrant)
        return self.net(x)


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_activation_checkpointing_counts_each_layer_once(tmp_path, use_reentrant):
    """Checkpointing recomputes forwards in the backward pass (non-reentrant: a second hook call;
    reentrant: the only call with gradients). Either way each layer is counted once per step: the
    statistics equal the plain run's, and the computation gives a result (it used to give none)."""
    cb = make_callback(tmp_path, on_error="raise", **EPOCHS)
    fit(tmp_path, cb, seeded(CheckpointedClassifier, use_reentrant))
    assert [r.step for r in cb.results] == [12]
    checkpointed = make_callback(tmp_path / "a", **COLLECT_ONLY)
    fit(tmp_path / "a", checkpointed, seeded(CheckpointedClassifier, use_reentrant))
    plain = make_callback(tmp_path / "b", **COLLECT_ONLY)
    fit(tmp_path / "b", plain, seeded(Classifier))
    assert checkpointed.statistics.state.keys() == plain.statistics.state.keys()
    for name, parts in plain.statistics.state.items():
        for key, value in parts.items():
            torch.testing.assert_close(checkpointed.statistics.state[name][key], value, msg=f"{name}/{key}")


class TwiceClassifier(Classifier):
    """A training step that runs the model twice (e.g. two augmented views): per-example
    gradients of the two uses would be mixed up."""

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y) + F.cross_entropy(self(x + 0.01), y)


def test_a_training_step_running_the_model_twice_is_refused_at_the_first_step(tmp_path):
    cb = make_callback(tmp_path, on_error="warn", **EPOCHS)
    with pytest.raises(ValueError, match=r"ran more than once in one training step: net\.2 \(x2\), net\.0 \(x2\)"):
        fit(tmp_path, cb, seeded(TwiceClassifier))


class SumLossClassifier(Classifier):
    """Returns the summed loss (or a scaled mean) while the callback is told ``loss_reduction="mean"``."""

    def __init__(self, scale: float = 1.0, reduction: str = "sum"):
        super().__init__()
        self.scale, self.reduction = scale, reduction

    def training_step(self, batch, batch_idx):
        x, y = batch
        return self.scale * F.cross_entropy(self(x), y, reduction=self.reduction)


@pytest.mark.parametrize("model_args, declared, expected", [
    ((1.0, "sum"), "mean", r"is 8x what loss_reduction='mean' predicts .*; set loss_reduction='sum'"),
    ((100.0, "mean"), "mean", r"is 100x what loss_reduction='mean' predicts .*; return the task's loss"),
    ((1.0, "mean"), "sum", r"is 0\.125x what loss_reduction='sum' predicts .*; set loss_reduction='mean'"),
])
def test_a_loss_reduced_otherwise_than_declared_is_reported_once(tmp_path, model_args, declared, expected):
    cb = make_callback(tmp_path, curvature=dict(loss_reduction=declared), **COLLECT_ONLY)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(tmp_path, cb, seeded(SumLossClassifier, *model_args))
    found = [str(w.message) for w in caught if "predicts from the task's per-example losses" in str(w.message)]
    assert len(found) == 1, found
    assert re.search(expected, found[0]), found[0]


@pytest.mark.parametrize("declared", ["mean", "sum"])
def test_a_matching_loss_reduction_is_not_reported(tmp_path, declared):
    cb = make_callback(tmp_path, curvature=dict(loss_reduction=declared), **COLLECT_ONLY)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(tmp_path, cb, seeded(SumLossClassifier, 1.0, declared))
    assert not [w for w in caught if "predicts from the task's per-example losses" in str(w.message)]


@pytest.mark.parametrize("how", ["moved", "copied"])
def test_a_moved_or_copied_run_resumes_with_its_own_results(tmp_path, how):
    """Result directories are stored relative to output_dir: after moving (or copying) a run, the
    resumed callback lists its earlier results from the new place, and never reads the old one."""
    from pytorch_lightning.callbacks import ModelCheckpoint

    original = tmp_path / "original"
    ckpt = ModelCheckpoint(dirpath=str(original / "ckpt"), save_top_k=-1)
    fit(original, make_callback(original, **EPOCHS), seeded(Classifier), callbacks=[ckpt], max_epochs=1,
        enable_checkpointing=True)
    moved = tmp_path / "moved"
    (shutil.move if how == "moved" else shutil.copytree)(str(original), str(moved))
    if how == "copied":
        shutil.rmtree(original / "influence")  # reading the old place would now find nothing
    resumed = make_callback(moved, **EPOCHS)
    ckpt = ModelCheckpoint(dirpath=str(moved / "ckpt"), save_top_k=-1)
    fit(moved, resumed, seeded(Classifier), callbacks=[ckpt], max_epochs=2, enable_checkpointing=True,
        ckpt_path=str(moved / "ckpt" / "epoch=0-step=12.ckpt"))
    assert [r.step for r in resumed.results] == [12, 24]
    assert all(str(r.path).startswith(str(moved)) for r in resumed.results)


class AttentionClassifier(Classifier):
    """A TransformerEncoderLayer over two tokens, taking dict batches ``{"x": ..., "y": ...}``."""

    def __init__(self):
        super().__init__()
        del self.net
        self.embed = nn.Linear(1, 8)
        self.encoder = nn.TransformerEncoderLayer(8, nhead=2, dim_feedforward=16, dropout=0.0, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.encoder(self.embed(x.unsqueeze(-1))).mean(1))

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self(batch["x"]), batch["y"])

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", F.cross_entropy(self(batch["x"]), batch["y"]))


def _dict_batches(examples):
    x, y = zip(*examples)
    return {"x": torch.stack(x), "y": torch.stack(y)}


def test_multihead_attention_and_dict_batches_in_the_callback(tmp_path):
    """Used to fail at fit start (out_proj never fires) and on {x, y} batches (labels passed to
    forward): now out_proj is left out with one warning and the run has its result."""
    from torch.utils.data import DataLoader

    train, val, _ = planted_data()
    datamodule = BlobData(train, val, batch_size=8, shuffle=False)
    datamodule.train_dataloader = lambda: DataLoader(train, batch_size=8, collate_fn=_dict_batches)
    datamodule.val_dataloader = lambda: DataLoader(val, batch_size=8, collate_fn=_dict_batches)
    cb = make_callback(tmp_path, **EPOCHS)
    with pytest.warns(UserWarning, match=r"not tracking encoder\.self_attn\.out_proj"):
        fit(tmp_path, cb, seeded(AttentionClassifier), datamodule=datamodule)
    (result,) = cb.results
    assert "encoder.self_attn.out_proj" not in result.layer_names and "encoder.linear1" in result.layer_names
    assert torch.isfinite(result.scores).all() and result.scores.shape == (4, 96)


def test_more_queries_than_the_validation_set_is_reported(tmp_path):
    cb = make_callback(tmp_path, num_queries=64, **COLLECT_ONLY)
    with pytest.warns(RuntimeWarning, match=r"num_queries=64 but the val dataset holds 16 examples; using all 16"):
        fit(tmp_path, cb, seeded(Classifier))


def test_a_non_finite_pool_example_is_reported_and_never_ranked(tmp_path):
    """One NaN example in the candidate pool, inside the correction subset: it used to make every
    score NaN there (and rank first for every query elsewhere). Now the other scores are finite, the
    example is never among the top or bottom examples, and the result names it."""
    from torch.utils.data import TensorDataset

    train, val, planted = planted_data()
    x, y = train.tensors
    pool_x = x.clone()
    pool_x[5] = float("nan")
    cb = make_callback(tmp_path, train_data=TensorDataset(pool_x, y), curvature=dict(correction_batches=None),
                       scoring=dict(top_k=3), **EPOCHS)
    with pytest.warns(UserWarning, match="non-finite"):
        fit(tmp_path, cb, seeded(Classifier), max_epochs=3)
    result = cb.results[-1]
    assert result.meta["nonfinite_train_ids"] == [5]
    assert torch.isnan(result.scores[:, 5]).all()
    others = torch.cat([result.scores[:, :5], result.scores[:, 6:]], 1)
    assert torch.isfinite(others).all()
    for name in ("top_ids", "bottom_ids"):
        assert not (result.get(name) == 5).any()
    assert int(result.get("top_ids")[0, 0]) == planted
