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
from lightning_influence.factors import CovarianceStatistics, accumulate_covariances
from lightning_influence.session import InfluenceSession
from tests.callback_models import planted_data

TEST_SETTINGS = dict(on_error="raise", show_progress=False, collect_every_n_steps=1, max_tokens_per_step=None)


def assert_statistics_equal(collected, offline):
    for name, parts in offline.state.items():
        for key, value in parts.items():
            torch.testing.assert_close(collected.state[name][key], value, rtol=1e-5, atol=1e-6, msg=f"{name}/{key}")


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
    from lightning_influence.integrations.fabric import InfluenceMonitor

    fabric = fabric_module.Fabric(accelerator="cpu", devices=1)
    train, val, _ = planted_data()
    model, optimizer = fabric.setup(classifier(), torch.optim.SGD(classifier().parameters(), lr=0.0))
    monitor = InfluenceMonitor(fabric, model, li.ClassificationTask(), train, Subset(val, range(4)),
                               output_dir=tmp_path, report=False, **TEST_SETTINGS)
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

    from lightning_influence.integrations.fabric import InfluenceMonitor

    fabric = fabric_module.Fabric(accelerator="cpu", devices=1, loggers=CSVLogger(str(tmp_path / "logs")))
    train, val, planted = planted_data()
    queries = Subset(val, range(4))
    net = classifier()
    model, optimizer = fabric.setup(net, torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.5))
    monitor = InfluenceMonitor(fabric, model, "classification", train, queries, top_k=3, batch_size=16,
                               output_dir=tmp_path / "influence", **TEST_SETTINGS)
    fabric_fit(fabric, monitor, model, optimizer, train, epochs=6)
    statistics = copied(monitor.statistics, li.select_layers(net))
    result = monitor.compute(epoch=5)
    assert result is not None and result.step == 72

    (saved,) = li.load_results(tmp_path / "influence")
    assert saved.step == 72 and saved.epoch == 5 and saved.path.name == "step=72"
    assert int(saved.top_k(1).indices[0, 0]) == planted and int(saved.get("top_ids")[0, 0]) == planted
    session = InfluenceSession(li.ClassificationTask(), train, queries, top_k=3, batch_size=16)
    expected, _ = session.compute(net, statistics, step=72)
    torch.testing.assert_close(saved.scores, expected.scores, rtol=1e-6, atol=1e-8)
    assert torch.equal(saved.get("top_ids"), expected.get("top_ids"))
    assert (saved.path / "report" / "summary.json").is_file()
    fabric.logger.finalize("success")
    with open(Path(fabric.logger.log_dir) / "metrics.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert any(row.get("influence/tail_alpha") not in (None, "") for row in rows), list(rows[0])
    monitor.close()


def test_fabric_refuses_callback_only_settings(tmp_path):
    from lightning_influence.integrations.fabric import InfluenceMonitor

    fabric = fabric_module.Fabric(accelerator="cpu", devices=1)
    train, val, _ = planted_data()
    with pytest.raises(ValueError, match="every_n_epochs does not apply here: call monitor.compute"):
        InfluenceMonitor(fabric, classifier(), "classification", train, val, every_n_epochs=1)
    with pytest.raises(ValueError, match="query_data='val' names a Lightning Trainer's split"):
        InfluenceMonitor(fabric, classifier(), "classification", train, "val")
