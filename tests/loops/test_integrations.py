"""Other training loops over the same core: a Lightning Fabric loop (``InfluenceMonitor``) and the
Hugging Face Trainer (``InfluenceTrainerCallback``). Statistics from the loops' own steps equal an
offline pass; results land on disk as the callback's do."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

import lightning_influence as li
from lightning_influence.engine.curvature_passes import accumulate_covariances
from lightning_influence.engine.statistics import CovarianceStatistics
from lightning_influence.checkpoint.session import InfluenceSession
from tests.callback_models import merged_settings, planted_data

# no report unless a test turns it on (report={"mode": "background"}, merged with merged_settings)
TEST_SETTINGS = dict(on_error="raise", report=dict(mode="off", show_progress=False),
                     curvature=dict(collect_every_n_steps=1, max_tokens_per_step=None))


def assert_statistics_equal(collected, offline):
    """Equal up to float32 summation order, relative to each sum's norm (a sum's small entries
    carry its large entries' rounding)."""
    for name, parts in offline.state.items():
        for key, value in parts.items():
            error = float((collected.state[name][key] - value).double().norm())
            assert error <= 1e-6 * float(value.double().norm()) + 1e-7, (name, key, error)


def copied(statistics: CovarianceStatistics, layers) -> CovarianceStatistics:
    copy = CovarianceStatistics(layers)
    copy.merge_(statistics)
    return copy


# -- Lightning Fabric ---------------------------------------------------------------------------------
fabric_module = pytest.importorskip("lightning.fabric")


def classifier():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(2, 16), nn.Tanh(), nn.Linear(16, 3))


def fabric_fit(fabric, monitor, model, optimizer, train, *, epochs: int, accumulation: int = 1):
    """A Fabric loop with the monitor's three touch points; the loss is divided for accumulation."""
    loader = DataLoader(train, batch_size=8)
    for _ in range(epochs):
        for index, batch in enumerate(loader):
            with monitor.step(batch, accumulation=accumulation):
                loss = F.cross_entropy(model(batch[0]), batch[1]) / accumulation
                monitor.backward(loss)
            if (index + 1) % accumulation == 0:
                optimizer.step()
                optimizer.zero_grad()
                monitor.optimizer_step()


@pytest.mark.parametrize("accumulation", [1, 3])
def test_fabric_statistics_equal_offline_pass(tmp_path, accumulation):
    """With lr=0 the weights stay put: one epoch of the loop's statistics equals one offline pass."""
    from lightning_influence.loops.fabric import InfluenceMonitor

    fabric = fabric_module.Fabric(accelerator="cpu", devices=1)
    train, val, _ = planted_data()
    model, optimizer = fabric.setup(classifier(), torch.optim.SGD(classifier().parameters(), lr=0.0))
    monitor = InfluenceMonitor(fabric, model, li.ClassificationTask(), train, Subset(val, range(4)),
                               output_dir=tmp_path, **TEST_SETTINGS)
    fabric_fit(fabric, monitor, model, optimizer, train, epochs=1, accumulation=accumulation)
    offline = accumulate_covariances(model.module, li.ClassificationTask(), train, li.select_layers(model.module),
                                     fisher="empirical", batch_size=8)
    assert_statistics_equal(monitor.statistics, offline)
    assert monitor.global_step == 12 // accumulation


def test_fabric_results_rank_the_planted_copy_first_and_equal_the_sessions(tmp_path):
    """Training on the planted blobs: the near-copy of query 0 is its most helpful example; the
    result on disk equals InfluenceSession's for the same statistics and weights; scalars reach
    Fabric's logger."""
    from lightning.fabric.loggers import CSVLogger

    from lightning_influence.loops.fabric import InfluenceMonitor

    fabric = fabric_module.Fabric(accelerator="cpu", devices=1, loggers=CSVLogger(str(tmp_path / "logs")))
    train, val, planted = planted_data()
    queries = Subset(val, range(4))
    net = classifier()
    model, optimizer = fabric.setup(net, torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.5))
    monitor = InfluenceMonitor(fabric, model, "classification", train, queries, output_dir=tmp_path / "influence",
                               **merged_settings(TEST_SETTINGS, dict(scoring=dict(top_k=3, batch_size=16),
                                                                     report=dict(mode="background"))))
    fabric_fit(fabric, monitor, model, optimizer, train, epochs=6)
    statistics = copied(monitor.statistics, li.select_layers(net))
    result = monitor.compute(epoch=5)
    assert result is not None and result.step == 72

    (saved,) = li.load_results(tmp_path / "influence")
    assert saved.step == 72 and saved.epoch == 5 and saved.path.name == "step=72"
    assert int(saved.top_k(1).indices[0, 0]) == planted and int(saved.get("top_ids")[0, 0]) == planted
    session = InfluenceSession(li.ClassificationTask(), train, queries, scoring=dict(top_k=3, batch_size=16))
    expected, _ = session.compute(net, statistics, step=72)
    torch.testing.assert_close(saved.scores, expected.scores, rtol=1e-6, atol=1e-8)
    assert torch.equal(saved.get("top_ids"), expected.get("top_ids"))
    monitor.close()  # the report, completed in the background, is logged by now
    assert (saved.path / "report" / "summary.json").is_file()
    fabric.logger.finalize("success")
    with open(Path(fabric.logger.log_dir) / "metrics.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert any(row.get("influence/tail_alpha") not in (None, "") for row in rows), list(rows[0])


def test_fabric_refuses_callback_only_settings_and_a_ledger_without_ids(tmp_path):
    from lightning_influence.loops.fabric import InfluenceMonitor

    fabric = fabric_module.Fabric(accelerator="cpu", devices=1)
    train, val, _ = planted_data()
    with pytest.raises(ValueError, match="every_n_epochs does not apply here: call monitor.compute"):
        InfluenceMonitor(fabric, classifier(), "classification", train, val, every_n_epochs=1)
    with pytest.raises(ValueError, match="query_data='val' names a Lightning Trainer's split"):
        InfluenceMonitor(fabric, classifier(), "classification", train, "val")
    monitor = InfluenceMonitor(fabric, classifier(), "classification", train, val, scoring={"ledger": 32},
                               output_dir=tmp_path / "ledger", **TEST_SETTINGS)
    with pytest.raises(ValueError, match=r"scoring.ledger weighs each step by its learning rate: pass monitor.step"):
        with monitor.step(next(iter(DataLoader(train, batch_size=4)))):
            pass
    with pytest.raises(ValueError, match=r"scoring.ledger needs each training batch's example ids"):
        with monitor.step(next(iter(DataLoader(train, batch_size=4))), lr=0.1):
            pass
    monitor.close()


# -- Hugging Face Trainer -----------------------------------------------------------------------------
transformers = pytest.importorskip("transformers")
VOCAB, LENGTH = 24, 8


class TokenData(Dataset):
    """Integer token sequences with right padding (labels -100 and attention 0 on the padding)."""

    def __init__(self, size: int, seed: int) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, VOCAB, (size, LENGTH), generator=generator)
        self.lengths = torch.randint(4, LENGTH + 1, (size,), generator=generator)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int):
        mask = (torch.arange(LENGTH) < self.lengths[index]).long()
        return {"input_ids": self.ids[index], "attention_mask": mask,
                "labels": self.ids[index].masked_fill(mask == 0, -100)}


def tiny_gpt2():
    """A GPT-2 whose forward takes ``**kwargs``: the Trainer passes it ``num_items_in_batch``."""
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=VOCAB, n_positions=LENGTH, n_embd=16, n_layer=1, n_head=2,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return transformers.GPT2LMHeadModel(config)


class TinyLM(nn.Module):
    """A model without ``**kwargs``: the Trainer divides its token-mean loss for accumulation."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(VOCAB, 16)
        self.hidden = nn.Linear(16, 16)
        self.head = nn.Linear(16, VOCAB)

    def forward(self, input_ids, attention_mask=None, labels=None):
        logits = self.head(torch.tanh(self.hidden(self.embed(input_ids))))
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1), ignore_index=-100)
        return {"loss": loss, "logits": logits}


def hf_trainer(tmp_path, model, callback, *, learning_rate=0.0, accumulation=1, report_to=(), epochs=1, size=24):
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "hf"), per_device_train_batch_size=4, gradient_accumulation_steps=accumulation,
        learning_rate=learning_rate, num_train_epochs=epochs, use_cpu=True, dataloader_num_workers=0,
        save_strategy="no", report_to=list(report_to), logging_steps=1, disable_tqdm=True, seed=0,
    )
    return transformers.Trainer(model=model, args=args, train_dataset=TokenData(size, seed=0), callbacks=[callback])


def test_hf_accepts_the_ledger():
    from lightning_influence.loops.hf import InfluenceTrainerCallback

    assert InfluenceTrainerCallback("causal_lm", TokenData(4, seed=1), scoring={"ledger": 32}).config.scoring.ledger == 32  # was refused


def test_hf_takes_the_loss_reduction_from_the_curvature_group_too():
    """``curvature={"loss_reduction": ...}`` is honoured (the flat argument's default used to
    override it silently); Hugging Face's token mean stays the default, and two different values refuse."""
    from lightning_influence.loops.hf import InfluenceTrainerCallback

    def reduction(**settings):
        return InfluenceTrainerCallback("causal_lm", TokenData(4, seed=1), **settings).config.curvature.loss_reduction

    assert reduction() == "token_mean"
    assert reduction(curvature={"strategy": "kfac"}) == "token_mean"
    assert reduction(curvature={"loss_reduction": "sum"}) == "sum"
    assert reduction(curvature=li.CurvatureConfig(loss_reduction="sum")) == "sum"
    assert reduction(loss_reduction="sum") == "sum"
    with pytest.raises(ValueError, match="loss_reduction='sum' and curvature.loss_reduction='token_mean'"):
        reduction(loss_reduction="sum", curvature={"loss_reduction": "token_mean"})


@pytest.mark.parametrize("make_model", [tiny_gpt2, TinyLM], ids=["gpt2-num_items_in_batch", "module-divided-loss"])
def test_hf_trainer_statistics_equal_offline_pass(tmp_path, make_model):
    """lr=0, 6 micro-batches with 4 accumulated per step (so the last step accumulates 2): the
    statistics from the Trainer's steps equal one offline pass, whichever way the Trainer scales."""
    from lightning_influence.loops.hf import InfluenceTrainerCallback

    callback = InfluenceTrainerCallback(li.CausalLMTask(), TokenData(4, seed=1), on_train_end=False,
                                        every_n_train_steps=1000, **TEST_SETTINGS)
    model = make_model()
    trainer = hf_trainer(tmp_path, model, callback, accumulation=4)
    trainer.train()
    assert trainer.state.global_step == 2
    offline = accumulate_covariances(model, li.CausalLMTask(), TokenData(24, seed=0), li.select_layers(model),
                                     fisher="empirical", batch_size=4)
    assert_statistics_equal(callback.statistics, offline)


def test_hf_trainer_writes_results_and_logs_to_wandb(tmp_path, monkeypatch):
    """Influence every 3 steps and at the end, on disk under <output_dir>/influence and in the W&B
    run that report_to="wandb" started."""
    wandb = pytest.importorskip("wandb")
    from lightning_influence.loops.hf import InfluenceTrainerCallback
    from tests import wandb_reader

    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    callback = InfluenceTrainerCallback("causal_lm", TokenData(3, seed=1), every_n_train_steps=3, on_error="raise",
                                        curvature=dict(collect_every_n_steps=1), scoring=dict(top_k=2),
                                        report=dict(log_artifacts=False, show_progress=False))
    trainer = hf_trainer(tmp_path, tiny_gpt2(), callback, learning_rate=1e-2, report_to=["wandb"], size=20)
    trainer.train()
    run_dir = Path(wandb.run.dir).parent
    wandb.finish()
    results = li.load_results(tmp_path / "hf" / "influence")
    assert [(r.step, r.epoch, r.meta["reasons"]) for r in results] == [(3, 0, ["every_n_train_steps"]),
                                                                      (5, 0, ["train_end"])]
    assert results[0].scores.shape == (3, 20) and torch.isfinite(results[0].scores).all()
    assert [r.step for r in callback.results] == [3, 5]
    rows = wandb_reader.history(wandb_reader.skip_if_unsupported(run_dir))
    assert any("train/loss" in r for r in rows), "the Trainer's own metrics are in the same run"
    logged = [r["trainer/global_step"] for r in rows if "influence/tail_alpha" in r]
    assert logged == [3, 5]


def test_integrations_import_no_framework_they_do_not_need():
    """``transformers`` and ``lightning`` stay optional: importing the package, the integrations
    package and the Fabric helper (duck-typed over Fabric) loads neither."""
    import subprocess
    import sys

    code = ("import sys, lightning_influence, lightning_influence.loops, lightning_influence.loops.fabric; "
            "print(sorted(m for m in ('transformers', 'lightning', 'peft') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=str(Path(__file__).resolve().parents[2]))
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
