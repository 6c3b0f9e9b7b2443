"""The checkpoint procedure without Lightning: a plain PyTorch loop, and the same results from the
callback and from the command line's ``score``, which both run through ``InfluenceSession``."""

from __future__ import annotations

import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

import lightning_influence as li
from lightning_influence.cli import main
from lightning_influence.engine.collector import StepStatistics
from lightning_influence.checkpoint.session import InfluenceSession
from tests.callback_models import planted_data
from tests.reliability_helpers import Classifier, fit, make_callback, seeded
from tests.tiny_models import train_recorded


def test_a_plain_pytorch_loop_gets_results_through_the_session(tmp_path):
    """Statistics from the loop's own steps, influence at two checkpoints, written atomically with
    their factors: the planted near-copy of query 0 is its most helpful example at the end."""
    torch.manual_seed(0)
    train, val, planted = planted_data()
    model = nn.Sequential(nn.Linear(2, 16), nn.Tanh(), nn.Linear(16, 3))
    task = li.ClassificationTask()
    statistics = StepStatistics(li.select_layers(model), task, loss_reduction="mean")
    session = InfluenceSession(task, train, torch.utils.data.Subset(val, range(4)),
                               scoring=dict(top_k=3, batch_size=16))
    session.check(model, statistics.layers)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.5)
    statistics.attach()
    written = []
    for epoch in range(6):
        train_recorded(statistics, DataLoader(train, batch_size=8),
                       lambda batch: F.cross_entropy(model(batch[0]), batch[1]), optimizer)
        if epoch % 3 == 2:
            state = torch.random.get_rng_state()
            result, factors = session.compute(model, statistics.stats, step=(epoch + 1) * 12, epoch=epoch)
            assert torch.equal(torch.random.get_rng_state(), state)  # training randomness untouched
            written.append(session.write(result, factors, tmp_path / f"step={result.step}"))
            statistics.reset()
    statistics.detach()
    results = li.load_results(tmp_path)
    assert [r.step for r in results] == [36, 72] and [p.name for p in written] == ["step=36", "step=72"]
    final = results[-1]
    assert final.scores.shape == (4, 96) and final.meta["run"]["pool_size"] == 96
    assert int(final.top_k(1).indices[0, 0]) == planted
    assert int(final.get("top_ids")[0, 0]) == planted and final.get("top_token_scores").shape == (4, 3, 1)
    assert li.load_factors(li.results.factors_path(final)).strategy == "ekfac"


DATA_MODULE = textwrap.dedent(
    """
    from torch.utils.data import Subset

    from tests.callback_models import planted_data


    def train_set():
        return planted_data()[0]


    def query_set():
        return Subset(planted_data()[1], range(4))
    """
)


def test_cli_score_reproduces_the_callbacks_result(tmp_path, monkeypatch, capsys):
    """The callback's result at the end of training, re-scored from the final checkpoint and the
    factors saved with it: the same scores, top examples and per-token scores."""
    cb = make_callback(tmp_path, every_n_epochs=None, on_checkpoint=False, on_train_end=True,
                       scoring=dict(top_k=3))
    trainer, _ = fit(tmp_path, cb, seeded(Classifier), max_epochs=2)
    checkpoint = tmp_path / "final.ckpt"
    trainer.save_checkpoint(checkpoint)
    (saved,) = cb.results
    (tmp_path / "cli_data.py").write_text(DATA_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        code = main(["score", "--checkpoint", str(checkpoint), "--model", "tests.reliability_helpers:Classifier",
                     "--train-data", "cli_data:train_set", "--query-data", "cli_data:query_set",
                     "--factors", str(saved.path), "--task", "classification", "--out", str(tmp_path / "scored"),
                     "--top-k", "3", "--batch-size", "32"])
    finally:
        sys.modules.pop("cli_data", None)
    assert code == 0, capsys.readouterr().err
    scored = li.InfluenceResult.load(tmp_path / "scored")
    torch.testing.assert_close(scored.scores, saved.scores, rtol=1e-5, atol=1e-7)
    for name in ("top_ids", "bottom_ids"):
        assert torch.equal(scored.get(name), saved.get(name)), name
    torch.testing.assert_close(scored.get("top_token_scores"), saved.get("top_token_scores"), rtol=1e-5, atol=1e-7)
    assert scored.meta["damping"] == pytest.approx(saved.meta["damping"])
