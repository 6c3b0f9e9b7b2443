"""Layers reading the same input tensor (q/k/v, gate/up) share one activation covariance: found at
run time from the input tensor's identity, accumulated and decomposed once per group, with the
same statistics, factors and scores as per layer."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Subset

import lightning_influence as li
from lightning_influence.engine import distributed
from lightning_influence.engine.collector import StepStatistics
from lightning_influence.engine.factors import load_factors
from lightning_influence.engine.statistics import CovarianceStatistics
from lightning_influence.engine.oracle import dense_influence, factor_block
from lightning_influence.engine.tracking import LayerTracker, layers_by_name, select_layers
from tests.tiny_models import regression_data
from tests.tiny_models import train_recorded

hf = pytest.importorskip("tests.hf_models")

GROUPS = [group for i in range(2) for group in ([f"model.layers.{i}.self_attn.{p}_proj" for p in "qkv"],
                                                [f"model.layers.{i}.mlp.{p}_proj" for p in ("gate", "up")])]


def _collect(model, layers, examples, *, share: bool, steps: int = 3, **options) -> StepStatistics:
    """Statistics from a few SGD steps on the tiny Llama (padded batches), from the same start."""
    torch.manual_seed(1)
    task = li.CausalLMTask()
    statistics = StepStatistics(layers, task, loss_reduction="mean", share_inputs=share, **options)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    statistics.attach()
    try:
        train_recorded(statistics, list(DataLoader(examples, batch_size=4))[:steps],
                       lambda batch: task.loss(model, batch).mean(), optimizer)
    finally:
        statistics.detach()
    return statistics


def _assert_same_statistics(shared: CovarianceStatistics, separate: CovarianceStatistics) -> None:
    assert set(shared.state) == set(separate.state)
    for name in separate.state:
        for key, value in separate.state[name].items():
            torch.testing.assert_close(shared.state[name][key], value, rtol=1e-6, atol=1e-6, msg=f"{name}/{key}")


@pytest.mark.parametrize("max_tokens", [None, 20])
def test_llama_statistics_factors_and_scores_equal_with_and_without_sharing(max_tokens, tmp_path):
    """Tiny Llama, padded batches, optionally a token subset per step: q/k/v and gate/up are found
    as groups; the shared statistics equal the per-layer ones, hold less memory, and give the same
    factors (bases decomposed once per group, kept once in memory) and scores; saved factors load."""
    examples = hf.token_examples(12, seed=0, min_len=6)
    runs = {}
    for share in (True, False):
        model = hf.tiny_llama(seed=0)
        runs[share] = (model, _collect(model, select_layers(model), examples, share=share,
                                       max_tokens_per_step=max_tokens))
    (model, shared), (_, separate) = runs[True], runs[False]
    assert shared.stats.input_groups == GROUPS and separate.stats.input_groups == []
    _assert_same_statistics(shared.stats, separate.stats)
    for group in GROUPS:
        assert all(shared.stats.state[n]["a_sum"] is shared.stats.state[group[0]]["a_sum"] for n in group)
    d = 32  # hidden size: each q/k/v and gate/up group saves (members - 1) d x d sums, in stats and step buffer
    saved = sum(len(g) - 1 for g in GROUPS) * d * d * 4 * 2 + sum(len(g) - 1 for g in GROUPS) * 8 * 2
    assert separate.held_bytes() - shared.held_bytes() == saved

    task = li.CausalLMTask()
    factors = {share: li.fit_factors(model, task, examples, strategy="ekfac", fisher="empirical",
                                     covariances=run.stats, batch_size=4)
               for share, (_, run) in runs.items()}
    for name in factors[False].layer_names:
        for key, value in factors[False].layers[name].items():
            torch.testing.assert_close(factors[True].layers[name][key], value, rtol=1e-5, atol=1e-6)
    q, k = GROUPS[0][:2]
    assert factors[True].layers[q]["q_a"] is factors[True].layers[k]["q_a"]
    assert factors[True].held_bytes() < factors[False].held_bytes()
    queries = examples[:3]
    scores = {share: li.compute_influence(model, task, examples, queries, factors=f, batch_size=4).scores
              for share, f in factors.items()}
    torch.testing.assert_close(scores[True], scores[False], rtol=1e-5, atol=1e-5)
    factors[True].save(tmp_path / "factors")
    loaded = load_factors(tmp_path / "factors")
    torch.testing.assert_close(loaded.layers[k]["q_a"], factors[True].layers[k]["q_a"])


def test_offline_fit_shares_inputs_with_the_same_factors(monkeypatch):
    """``fit_factors``' own covariance pass groups the layers too: the same factors as per layer."""
    model = hf.tiny_llama(seed=0)
    task = li.CausalLMTask()
    examples = hf.token_examples(8, seed=3, min_len=6)
    shared = li.fit_factors(model, task, examples, strategy="kfac", fisher="empirical", batch_size=4)
    monkeypatch.setattr(LayerTracker, "input_groups", lambda self: [])
    separate = li.fit_factors(model, task, examples, strategy="kfac", fisher="empirical", batch_size=4)
    assert shared.layers[GROUPS[0][0]]["q_a"] is shared.layers[GROUPS[0][2]]["q_a"]
    for name in separate.layer_names:
        for key, value in separate.layers[name].items():
            torch.testing.assert_close(shared.layers[name][key], value, rtol=1e-6, atol=1e-8)


class TwoReaders(nn.Module):
    """Two linear layers reading one input tensor (a third reads an equal-valued copy of it)."""

    def __init__(self, copy: bool = False) -> None:
        super().__init__()
        self.first, self.second, self.third = nn.Linear(4, 3), nn.Linear(4, 3), nn.Linear(4, 3)
        self.copy = copy

    def forward(self, x):
        return self.first(x) + self.second(x) + self.third(x.clone() if self.copy else x * 1.0)


def test_two_layers_reading_one_input_match_the_dense_oracle():
    """Linear layers with squared error: K-FAC is exact per block, with the group's shared A too.
    ``third`` reads a tensor with the same values but other memory: never merged."""
    torch.manual_seed(0)
    model = TwoReaders(copy=True).double()
    task = li.RegressionTask()
    data = regression_data()
    factors = li.fit_factors(model, task, data, strategy="kfac", fisher="exact", batch_size=16, dtype=torch.float64)
    assert factors.layers["first"]["q_a"] is factors.layers["second"]["q_a"]
    assert factors.layers["third"]["q_a"] is not factors.layers["first"]["q_a"]
    lambdas = {name: factors.damping(name) for name in factors.layer_names}
    queries = Subset(data, range(5))
    oracle = dense_influence(model, task, data, queries, factors.layer_names, lambdas)
    for name in factors.layer_names:
        torch.testing.assert_close(factor_block(factors, name), oracle.blocks[name], rtol=1e-9, atol=1e-10)
    result = li.compute_influence(model, task, data, queries, factors=factors)
    torch.testing.assert_close(result.scores.double(), oracle.scores, rtol=1e-6, atol=1e-6)


def test_equal_values_in_other_tensors_are_not_merged():
    """Detection is by tensor identity: ``x * 1.0`` and ``x.clone()`` have x's values, not its memory."""
    for copy in (True, False):
        model = TwoReaders(copy=copy)
        tracker = LayerTracker(select_layers(model))
        with tracker, tracker.capture():
            model(torch.randn(5, 4))
            assert tracker.input_groups() == [["first", "second"]]


def test_partial_selection_and_sharded_owners_keep_groups_to_the_layers_held():
    """Only q tracked: no group. Sharded statistics (owners over 2 processes): each process groups
    the members of a group it owns, keeping its own copy where a group spans owners, and its sums
    equal the unsharded ones."""
    examples = hf.token_examples(8, seed=1, min_len=6)
    model = hf.tiny_llama(seed=0)
    only_q = _collect(model, layers_by_name(model, [GROUPS[0][0], GROUPS[1][0]]), examples, share=True, steps=1)
    assert only_q.stats.input_groups == []

    model = hf.tiny_llama(seed=0)
    reference = _collect(model, select_layers(model), examples, share=False)
    for rank in range(2):
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(distributed, "world_size", lambda: 2)
            patch.setattr(distributed, "rank", lambda: rank)
            model = hf.tiny_llama(seed=0)
            held = _collect(model, select_layers(model), examples, share=True, shard=True)
            owners = distributed.assign_owners({l.name: distributed.factor_cost(l.d_out, l.d_in)
                                                for l in held.layers}, size=2)
        mine = {name for name, owner in owners.items() if owner == rank}
        assert set(held.stats.state) == mine
        expected = [[n for n in g if n in mine] for g in GROUPS]
        assert held.stats.input_groups == [g for g in expected if len(g) > 1]
        for name in mine:
            for key, value in held.stats.state[name].items():
                torch.testing.assert_close(value, reference.stats.state[name][key], rtol=1e-6, atol=1e-6)


def test_groups_split_when_the_layers_stop_reading_one_tensor_and_on_loading_unshared_sums():
    """A group found on the first batch whose layers later read different tensors gets its own
    sums back (copies: equal until then); loading sums saved without sharing that differ splits too."""
    torch.manual_seed(0)
    model = TwoReaders().double()
    statistics = StepStatistics(select_layers(model), li.RegressionTask(), loss_reduction="mean")
    statistics.attach()
    for step, batch in enumerate(list(DataLoader(regression_data(), batch_size=8))[:4]):
        if step == 2:  # from now on, second reads a copy (equal values, other memory)
            model.forward = lambda x: model.first(x) + model.second(x.clone()) + model.third(x * 1.0)
        statistics.begin_batch(batch)
        loss = ((model(batch[0]) - batch[1]) ** 2).sum(-1).mean()
        statistics.begin_backward()
        loss.backward()
        statistics.end_batch()
        statistics.commit()
        assert statistics.stats.input_groups == ([["first", "second"]] if step < 2 else [])
    statistics.detach()
    state = statistics.stats.state
    assert state["first"]["a_sum"] is not state["second"]["a_sum"]
    torch.testing.assert_close(state["first"]["a_sum"], state["second"]["a_sum"])
    assert statistics.held_bytes() == sum(t.numel() * t.element_size() for t in statistics.stats.tensors()) * 2

    saved = statistics.stats.state_dict()
    for differing in (False, True):
        if differing:  # sums saved per layer from different token subsets
            saved["second/a_sum"] = saved["second/a_sum"] + 1.0
        grouped = CovarianceStatistics(select_layers(model))
        assert grouped.share_inputs([["first", "second"]]) == [["first", "second"]]
        grouped.load_state_dict(saved)
        assert grouped.input_groups == ([] if differing else [["first", "second"]])
        for key, value in saved.items():
            name, _, part = key.rpartition("/")
            torch.testing.assert_close(grouped.state[name][part].to(value.dtype), value, msg=key)
