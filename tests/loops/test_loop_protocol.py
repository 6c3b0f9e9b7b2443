"""One loop protocol (``loops.protocol.LoopProtocol``) under every loop: the same tiny language model
trained with the same steps by a plain loop calling the protocol, the Lightning callback, a Fabric
loop and the Hugging Face Trainer gives equal statistics, scores, ledgers, monitors and
``meta["window"]``."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, SequentialSampler

import lightning_influence as li
from lightning_influence.config import InfluenceConfig
from lightning_influence.loops.protocol import LoopProtocol
from tests.loops.test_integrations import TinyLM, TokenData, fabric_module, transformers

import pytorch_lightning as pl

LR, BATCH, POOL, STEPS = 0.1, 4, 28, 7  # 7 optimizer steps, every 2nd collected, influence at 3 and 6
SETTINGS = dict(on_error="raise", report=dict(mode="off", show_progress=False),
                curvature=dict(collect_every_n_steps=2, max_tokens_per_step=None, loss_reduction="token_mean"),
                scoring=dict(ledger=32, top_k=2, batch_size=8))
TRIGGERS = dict(every_n_epochs=None, every_n_train_steps=3, on_checkpoint=False, on_train_end=False)


def pool():
    return TokenData(POOL, seed=0)


def queries():
    return TokenData(3, seed=1)


def plain_loop(tmp_path):
    """The protocol without any framework: a loop calling its events."""
    model = TinyLM()
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    config = InfluenceConfig.from_mapping(dict(task=li.CausalLMTask(), train_data=pool(), query_data=queries(),
                                               output_dir=str(tmp_path / "plain"), **TRIGGERS, **SETTINGS)).validate()
    loop = LoopProtocol(config, model, output_dir=tmp_path / "plain", is_global_zero=True)
    loop.attach(model)
    loader = DataLoader(pool(), batch_size=BATCH)
    loop.start(loader)
    for step, batch in enumerate(loader):
        loop.on_batch_start(batch, step, lr=optimizer.param_groups[0]["lr"])
        loss = model(**batch)["loss"]
        loop.on_before_backward(loss)
        loss.backward()
        loop.on_batch_end()
        optimizer.step()
        optimizer.zero_grad()
        loop.on_optimizer_step()
        loop.on_train_step(model, step + 1, 0, last_batch=step + 1 == STEPS)
    loop.on_train_end(model, STEPS, 0)
    statistics = loop.statistics.stats
    loop.close()
    return loop.results, statistics


class _LM(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.model = TinyLM()

    def forward(self, **inputs):
        return self.model(**inputs)

    def training_step(self, batch, batch_idx):
        return self.model(**batch)["loss"]

    def train_dataloader(self):
        return DataLoader(pool(), batch_size=BATCH)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=LR)


def lightning_loop(tmp_path):
    callback = li.InfluenceCallback(task=li.CausalLMTask(), query_data=queries(), train_data=pool(),
                                    output_dir=str(tmp_path / "lightning"), **TRIGGERS, **SETTINGS)
    trainer = pl.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0, accelerator="cpu", devices=1,
                         limit_val_batches=0, default_root_dir=str(tmp_path), callbacks=[callback])
    trainer.fit(_LM())
    return callback.results, callback.statistics


def fabric_loop(tmp_path):
    from lightning_influence.loops.fabric import InfluenceMonitor

    fabric = fabric_module.Fabric(accelerator="cpu", devices=1)
    net = TinyLM()
    model, optimizer = fabric.setup(net, torch.optim.SGD(net.parameters(), lr=LR))
    monitor = InfluenceMonitor(fabric, model, li.CausalLMTask(), pool(), queries(), output_dir=tmp_path / "fabric",
                               **SETTINGS)
    for step, batch in enumerate(DataLoader(pool(), batch_size=BATCH)):
        ids = torch.arange(step * BATCH, min((step + 1) * BATCH, POOL))  # the loop knows its examples
        with monitor.step(batch, optimizer=optimizer, ids=ids):
            monitor.backward(model(**batch)["loss"])
        optimizer.step()
        optimizer.zero_grad()
        monitor.optimizer_step()
        if monitor.global_step % 3 == 0:
            monitor.compute(epoch=0)
    statistics = monitor.statistics
    monitor.close()
    return monitor.results, statistics


class _SequentialTrainer(transformers.Trainer if transformers else object):
    def _get_train_sampler(self, train_dataset=None):
        return SequentialSampler(train_dataset if train_dataset is not None else self.train_dataset)


def hf_loop(tmp_path):
    from lightning_influence.loops.hf import InfluenceTrainerCallback

    curvature = {k: v for k, v in SETTINGS["curvature"].items() if k != "loss_reduction"}  # an argument here
    hf_settings = dict(SETTINGS, curvature=curvature)
    callback = InfluenceTrainerCallback(li.CausalLMTask(), queries(), train_data=pool(), every_n_train_steps=3,
                                        on_train_end=False, output_dir=str(tmp_path / "hf-influence"), **hf_settings)
    model = TinyLM()
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "hf"), per_device_train_batch_size=BATCH, num_train_epochs=1, use_cpu=True,
        dataloader_num_workers=0, save_strategy="no", report_to=[], disable_tqdm=True, seed=0, max_grad_norm=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    trainer = _SequentialTrainer(model=model, args=args, train_dataset=pool(), callbacks=[callback],
                                 optimizers=(optimizer, scheduler))
    trainer.train()
    return callback.results, callback.statistics


def _sums(statistics):
    """The statistics' tensors in layer order (the Lightning module's layers are ``model.``-prefixed)."""
    return [tensor for _, parts in sorted((name.split(".")[-1], parts) for name, parts in statistics.state.items())
            for _, tensor in sorted(parts.items())]


LOOPS = {"lightning": lightning_loop, "fabric": fabric_loop, "hf": hf_loop}


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    return plain_loop(tmp_path_factory.mktemp("plain"))


def test_plain_loop_runs_the_cadence_triggers_monitors_and_ledger(plain):
    results, statistics = plain
    assert [(r.step, r.meta["reasons"]) for r in results] == [(3, ["every_n_train_steps"]),
                                                               (6, ["every_n_train_steps"])]
    first, second = results
    assert first.meta["steps_collected"] == 2 and second.meta["steps_collected"] == 1  # steps 0, 2 | 4
    assert first.meta["window"] == {"optimizer_batches": 3, "lr_sum": pytest.approx(3 * LR)}
    assert second.meta["window"] == {"optimizer_batches": 3, "lr_sum": pytest.approx(3 * LR)}
    # The ledger: the collected steps' examples (steps 0 and 2, then 4), each step weighted lr × 2.
    assert first.get("ledger_ids").tolist() == list(range(0, 4)) + list(range(8, 12))
    assert second.get("ledger_ids").tolist() == list(range(16, 20))
    assert first.get("ledger_scores").shape == (3, 8) and torch.isfinite(first.get("ledger_scores")).all()
    assert second.meta["monitors"] and set(second.meta["monitors"]) >= set(first.meta["monitors"])
    assert float(statistics.state[next(iter(statistics.state))]["s_count"]) > 0  # step 6 collected, not computed


@pytest.mark.parametrize("loop", list(LOOPS))
def test_every_loop_equals_the_plain_protocol(tmp_path, plain, loop):
    results, statistics = LOOPS[loop](tmp_path)
    expected, expected_statistics = plain
    assert [r.step for r in results] == [r.step for r in expected]
    for sums, want in zip(_sums(statistics), _sums(expected_statistics), strict=True):
        torch.testing.assert_close(sums, want, rtol=1e-5, atol=1e-7)
    for result, want in zip(results, expected):
        assert result.meta["window"]["optimizer_batches"] == want.meta["window"]["optimizer_batches"]
        assert result.meta["window"]["lr_sum"] == pytest.approx(want.meta["window"]["lr_sum"])
        assert result.meta["steps_collected"] == want.meta["steps_collected"]
        torch.testing.assert_close(result.scores, want.scores, rtol=1e-4, atol=1e-6)
        assert torch.equal(result.get("ledger_ids"), want.get("ledger_ids"))
        torch.testing.assert_close(result.get("ledger_scores"), want.get("ledger_scores"), rtol=1e-4, atol=1e-7)
        assert set(result.meta["monitors"]) == set(want.meta["monitors"])
        for name, value in want.meta["monitors"].items():
            assert result.meta["monitors"][name] == pytest.approx(value, rel=1e-4, abs=1e-6), name


def test_true_fisher_from_a_fabric_loop_equals_the_plain_protocols(tmp_path, monkeypatch):
    """fisher="true": Fabric now reuses the model's captured outputs, as the plain loop does."""
    monkeypatch.setitem(SETTINGS["curvature"], "fisher", "true")
    monkeypatch.setitem(SETTINGS["scoring"], "ledger", None)
    (results, statistics), (expected, expected_statistics) = fabric_loop(tmp_path), plain_loop(tmp_path)
    for sums, want in zip(_sums(statistics), _sums(expected_statistics), strict=True):
        torch.testing.assert_close(sums, want, rtol=1e-5, atol=1e-7)
    for result, want in zip(results, expected, strict=True):
        torch.testing.assert_close(result.scores, want.scores, rtol=1e-4, atol=1e-6)


def test_the_extending_page_s_loop_equals_the_plain_protocol(tmp_path, plain):
    """The "Adding a training loop" example of docs/concepts/extending.md, run as written."""
    from pathlib import Path

    page = (Path(__file__).resolve().parents[2] / "docs" / "concepts" / "extending.md").read_text()
    section = page.split("## Adding a training loop", 1)[1]
    namespace: dict = {}
    exec(section.split("```python", 1)[1].split("```", 1)[0], namespace)
    model = TinyLM()
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    settings = {**SETTINGS, "scoring": {**SETTINGS["scoring"], "ledger": None}}  # no ids without a loader
    loop = namespace["MyLoopInfluence"](model, li.CausalLMTask(), pool(), queries(), tmp_path / "mine",
                                        **TRIGGERS, **settings)
    for step, batch in enumerate(DataLoader(pool(), batch_size=BATCH)):
        loop.batch_start(batch, step, optimizer.param_groups[0]["lr"])
        loss = model(**batch)["loss"]
        loop.before_backward(loss)
        loss.backward()
        loop.batch_end()
        optimizer.step()
        optimizer.zero_grad()
        loop.optimizer_step()
        loop.step_end(model, step + 1, 0, step + 1 == STEPS)
    loop.train_end(model, STEPS, 0)
    expected, _ = plain
    assert [r.step for r in loop.results] == [r.step for r in expected] and loop.results
    for mine, theirs in zip(loop.results, expected):
        torch.testing.assert_close(mine.scores, theirs.scores)
