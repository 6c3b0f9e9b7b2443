"""Monitoring beyond snapshots: drift scalars Lightning callbacks act on, live self-influence, the
per-step influence ledger, and trajectory weighting."""

from __future__ import annotations

import json

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.callbacks import EarlyStopping
from torch.func import functional_call, grad, vmap
from torch.utils.data import DataLoader

import lightning_influence as li
from lightning_influence.results import META_FIELDS
from lightning_influence.analysis import monitors
from lightning_influence.loops.ledger import BatchIds
from tests.callback_models import planted_data
from tests.reliability_helpers import BlobData, Classifier, fit, make_callback

EPOCHS = dict(every_n_epochs=1, on_checkpoint=False, on_train_end=False)


def test_early_stopping_stops_a_run_on_an_influence_drift_scalar(tmp_path):
    """Drift needs two computations: the run stops right after the second one (epoch 1) instead of
    training all five epochs; the value reached ``trainer.callback_metrics`` and the result."""
    stopper = EarlyStopping(monitor="influence/drift/spearman", mode="max", stopping_threshold=-1.0, strict=False,
                            check_on_train_epoch_end=True)
    cb = make_callback(tmp_path, **EPOCHS)
    trainer, _ = fit(tmp_path, cb, callbacks=[stopper], max_epochs=5)
    assert stopper.stopped_epoch == 1 and trainer.current_epoch == 2
    assert len(cb.results) == 2
    value = float(trainer.callback_metrics["influence/drift/spearman"])
    assert -1.0 <= value <= 1.0
    assert cb.results[-1].meta["monitors"]["drift/spearman"] == pytest.approx(value)
    assert "drift/spearman" not in cb.results[0].meta["monitors"]  # nothing to drift from at the first
    # Callback results keep per-layer sums, not [L, Q, N]: the layer drift comes from them.
    assert cb.results[-1].layer_scores is None and 0.0 <= cb.results[-1].meta["monitors"]["drift/layer_js"] <= 1.0


def test_drift_scalars_measure_the_change_between_results():
    scores = torch.randn(3, 40, generator=torch.Generator().manual_seed(0))
    same = li.InfluenceResult(scores=scores.clone())
    drift = monitors.drift_scalars(li.InfluenceResult(scores=scores), same, k=5)
    assert drift["drift/spearman"] == pytest.approx(1.0)
    assert drift["drift/topk_churn@5"] == pytest.approx(0.0) and "drift/topk_churn" not in drift
    reversed_ = monitors.drift_scalars(li.InfluenceResult(scores=scores), li.InfluenceResult(scores=-scores), k=5)
    assert reversed_["drift/spearman"] == pytest.approx(-1.0)
    assert reversed_["drift/topk_jaccard@5"] == pytest.approx(0.0)


def test_results_saved_with_unlabelled_top_k_monitors_are_read_with_their_k():
    """Results written before the k was part of the name still load, and their churn is shown as
    the churn at the k they were computed with."""
    meta = {"config": {"top_k": 5}, "monitors": {"drift/topk_churn": 0.25, "drift/spearman": 0.5}}
    assert monitors.saved_monitors(meta) == {"drift/topk_churn@5": 0.25, "drift/spearman": 0.5}
    assert monitors.saved_monitors({"monitors": {"drift/topk_churn": 0.25}}) == {"drift/topk_churn": 0.25}


def test_max_top1_share_flags_a_query_resting_on_one_example():
    """The memorisation alert: one query whose positive influence is all on one example."""
    spread = torch.rand(2, 50, generator=torch.Generator().manual_seed(1))
    assert monitors.monitor_scalars(li.InfluenceResult(scores=spread))["max_top1_share"] < 0.2
    memorised = spread.clone()
    memorised[1] = -1.0
    memorised[1, 7] = 3.0
    assert monitors.monitor_scalars(li.InfluenceResult(scores=memorised))["max_top1_share"] == pytest.approx(1.0)


def test_live_self_influence_ranks_the_planted_mislabel_first_and_is_reported(tmp_path):
    """The planted training example (blob 0 with label 2) is the one the model must bend for: it
    tops the self-influence ranking, which is saved, logged as scalars and as a report table."""
    _, _, planted = planted_data()
    cb = make_callback(tmp_path, scoring=dict(self_influence=True), report=dict(mode="background"), **EPOCHS)
    trainer, _ = fit(tmp_path, cb, max_epochs=2)
    latest = cb.results[-1]
    assert latest.self_scores is not None and latest.self_scores.shape == (96,)
    assert int(latest.train_ids[latest.self_scores.argmax()]) == planted
    assert float(trainer.callback_metrics["influence/self/max"]) == pytest.approx(float(latest.self_scores.max()))
    assert f"self/topk_churn@{cb.config.scoring.top_k}" in latest.meta["monitors"]
    summary = json.loads((latest.path / "report" / "summary.json").read_text())
    assert summary["self_influence_examples"][0]["train_id"] == planted
    assert summary["scalars"]["self/max"] == pytest.approx(float(latest.self_scores.max()))


class _StepSpy(pl.Callback):
    """Per epoch: the queries the ledger uses (set at train start, then refreshed at each epoch's
    computation) and, per training step, the weights, the batch and the learning rate."""

    def __init__(self, ledger_holder):
        self.holder, self.epochs = ledger_holder, []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == 0:
            ledger = self.holder._loop.monitor.ledger
            self.epochs.append(({name: ledger.queries.dense_for(name).clone() for name in ("net.0", "net.2")}, []))
        params = {k: v.detach().clone() for k, v in pl_module.named_parameters()}
        lr = trainer.optimizers[0].param_groups[0]["lr"]
        self.epochs[-1][1].append((params, batch[0].clone(), batch[1].clone(), lr))


def _expected_ledger(model, queries, steps, train):
    """Σ_steps lr × ⟨preconditioned query, per-example gradient⟩ from torch.func, ids found by
    matching each batch row to the dataset (independent of the sampler tracing)."""
    total = torch.zeros(queries["net.0"].shape[0], len(train), dtype=torch.float64)
    x_all = train.tensors[0]

    def loss(params, x, y):
        return F.cross_entropy(functional_call(model, params, (x[None],)), y[None], reduction="sum")

    for params, x, y, lr in steps:
        grads = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)
        ids = torch.cdist(x, x_all).argmin(1)
        for name in ("net.0", "net.2"):
            full = torch.cat([grads[f"{name}.weight"], grads[f"{name}.bias"].unsqueeze(-1)], -1)  # [B, out, in+1]
            scores = torch.einsum("qoi,boi->qb", queries[name].double(), full.double())
            total.index_add_(1, ids, lr * scores)
    return total


@pytest.mark.parametrize("shuffle", [False, True])
def test_ledger_equals_the_learning_rate_weighted_per_step_scores(tmp_path, shuffle):
    """Every step collected: the ledger saved with each epoch's result equals the sum over that
    epoch's steps of lr × (query · per-example gradient), per example id — plain query gradients
    before the first computation, preconditioned ones after — also with a shuffled loader (ids
    traced through the sampler)."""
    train, val, _ = planted_data()
    cb = make_callback(tmp_path, scoring=dict(ledger=32), **EPOCHS)
    spy = _StepSpy(cb)
    model = Classifier()
    fit(tmp_path, cb, model, callbacks=[spy], max_epochs=2, datamodule=BlobData(train, val, batch_size=8,
                                                                               shuffle=shuffle))
    assert len(cb.results) == len(spy.epochs) == 2
    for result, (queries, steps) in zip(cb.results, spy.epochs):
        assert torch.equal(result.get("ledger_ids"), torch.arange(96))
        expected = _expected_ledger(model, queries, steps, train)
        torch.testing.assert_close(result.get("ledger_scores").double(), expected, rtol=1e-4, atol=1e-6)
        assert result.meta["ledger"]["captured"] == pytest.approx({"net.0": 1.0, "net.2": 1.0})
    second = cb.results[1]
    assert set(second.meta) <= set(META_FIELDS), "undeclared meta keys: add them to results.META_FIELDS"
    assert second.meta["window"]["optimizer_batches"] == 12
    assert second.meta["window"]["lr_sum"] == pytest.approx(12 * 0.1)


def test_ledger_refuses_a_loader_without_dataset_indices(tmp_path):
    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            train = planted_data()[0]
            return iter(train[i] for i in range(len(train)))

    with pytest.raises(ValueError, match="scoring.ledger needs the training DataLoader's dataset indices"):
        BatchIds(DataLoader(Stream(), batch_size=8))
    loader = DataLoader(planted_data()[0], batch_size=8, shuffle=True)
    ids = BatchIds(loader)
    for x, _ in loader:
        got = ids.next_batch(len(x))
        assert torch.equal(planted_data()[0].tensors[0][got], x)
    ids.release()
    assert type(loader.batch_sampler.sampler).__name__ == "RandomSampler"


def test_aggregate_weights_checkpoints_by_learning_rate_sums_or_recency():
    a = li.InfluenceResult(scores=torch.tensor([[1.0, 0.0]]), step=10, meta={"window": {"lr_sum": 3.0}})
    b = li.InfluenceResult(scores=torch.tensor([[0.0, 2.0]]), step=20, meta={"window": {"lr_sum": 1.0}})
    torch.testing.assert_close(li.aggregate([a, b], weighting="lr").scores, torch.tensor([[1.5, 1.0]]))
    # recency: equal shares (each divided by its mean |score|), the later one doubled
    torch.testing.assert_close(li.aggregate([a, b], weighting="recency").scores, torch.tensor([[1.0, 2.0]]))
    with pytest.raises(ValueError, match=r"weighting='lr' needs each result's meta\['window'\]\['lr_sum'\]"):
        li.aggregate([a, li.InfluenceResult(scores=torch.ones(1, 2), step=30)], weighting="lr")


def test_ledger_subspace_queries_are_exact_within_their_span_and_report_what_they_drop():
    """The ledger's shared query subspace: exact (equal to the low-rank contraction) when the
    queries span no more than its size; otherwise it scores with the projected queries and reports
    the share of their squared norm it keeps; chosen in the training gradients' metric, it keeps
    exactly the scores of gradients that stay where the curvature says they go."""
    from lightning_influence.loops.ledger import SubspaceQueries
    from lightning_influence.engine.queries import PreconditionedQueries
    from lightning_influence.engine.scoring import contract
    from lightning_influence.engine.tracking import TrackedLayer

    gen = torch.Generator().manual_seed(0)
    queries = PreconditionedQueries({"layer": torch.randn(5, 20, 24, generator=gen)}, rank=3)
    layer = TrackedLayer("layer", torch.nn.Linear(24, 20, bias=False), "linear")
    acts, grads = torch.randn(4, 7, 24, generator=gen), torch.randn(4, 7, 20, generator=gen)
    for size in (15, None):  # 5 queries x rank 3 = 15 directions per side; None: no projection
        exact = SubspaceQueries(queries, size=size)
        assert exact.captured["layer"] == pytest.approx(1.0)
        torch.testing.assert_close(exact.scores(layer, acts, grads), contract(queries, layer, acts, grads, False),
                                   rtol=1e-4, atol=1e-4)
    small = SubspaceQueries(queries, size=4)
    projected = small.dense_for("layer")
    expected = torch.einsum("qoi,bto,bti->qb", projected, grads, acts)
    torch.testing.assert_close(small.scores(layer, acts, grads), expected, rtol=1e-4, atol=1e-4)
    kept = projected.double().pow(2).sum() / queries.dense_for("layer").double().pow(2).sum()
    assert small.captured["layer"] == pytest.approx(float(kept), rel=1e-4)
    assert 0.1 < small.captured["layer"] < 0.9
    # In the training gradients' metric: the directions the gradients visit are kept.
    grads[..., 10:], acts[..., 10:] = 0, 0  # the training data never leave 10 directions per side ...
    visited = [torch.cat([torch.ones(10), torch.full((width - 10,), 1e-8)]) for width in (20, 24)]
    scales = {"layer": (torch.eye(20), visited[0], torch.eye(24), visited[1])}  # ... and the curvature says so
    weighted = SubspaceQueries(queries, size=10, scales=scales)
    torch.testing.assert_close(weighted.scores(layer, acts, grads), contract(queries, layer, acts, grads, False),
                               rtol=1e-4, atol=1e-4)
    assert SubspaceQueries(queries, size=None, scales=scales).captured["layer"] == pytest.approx(1.0)
    unweighted = SubspaceQueries(queries, size=10).scores(layer, acts, grads)
    assert not torch.allclose(unweighted, contract(queries, layer, acts, grads, False), rtol=1e-2, atol=1e-2)


def test_the_share_of_the_queries_the_ledger_keeps_is_a_fraction():
    """Kept whole, the share is a ratio of two sums of the same squares in another order, which
    rounded above 1 (``meta["ledger"]["captured"]`` of 1.0000000000000007)."""
    from lightning_influence.loops.ledger import SubspaceQueries
    from lightning_influence.engine.queries import PreconditionedQueries

    shares = []
    for seed in range(20):
        dense = torch.randn(3, 4, 5, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        shares.append(SubspaceQueries(PreconditionedQueries({"layer": dense}), size=None).captured["layer"])
    assert all(0.0 <= share <= 1.0 for share in shares) and shares == pytest.approx([1.0] * 20)
