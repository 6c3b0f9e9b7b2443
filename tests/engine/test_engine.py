"""Engine invariants: decompositions, low-rank queries, self-influence, the sign convention,
merging statistics, persistence and layer selection."""


import pytest
import torch
from torch import nn
from torch.utils.data import Subset, TensorDataset

import lightning_influence as li
from lightning_influence.engine.curvature_passes import accumulate_covariances
from lightning_influence.engine.statistics import CovarianceStatistics
from lightning_influence.engine.queries import PreconditionedQueries
from lightning_influence.engine.scoring import contract
from lightning_influence.engine.tracking import LayerTracker
from tests.tiny_models import TinyTransformer, TokenData, classification_data, mlp


@pytest.fixture(scope="module")
def lm():
    torch.manual_seed(0)
    model, data = TinyTransformer().double(), TokenData(n=10)
    factors = li.fit_factors(model, li.CausalLMTask(), data, fisher="empirical", batch_size=4)
    return model, data, factors


def test_layer_and_token_scores_decompose_the_total(lm):
    model, data, factors = lm
    queries = Subset(data, [0, 3])
    result = li.compute_influence(model, li.CausalLMTask(), data, queries, factors=factors,
                                  per_layer=True, per_token=True, batch_size=4)
    assert result.layer_scores.shape == (len(factors.layer_names), 2, len(data))
    torch.testing.assert_close(result.layer_scores.sum(0), result.scores, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(result.token_scores.sum(-1), result.scores, rtol=1e-5, atol=1e-6)
    # padded positions carry no score, and the mask says which ones they are
    mask = data.attention_mask.bool()
    assert torch.equal(result.token_mask, mask)
    assert result.token_scores[:, ~mask].abs().max() == 0
    assert result.token_scores[:, mask].abs().max() > 0


def test_contraction_paths_agree(lm):
    model, data, factors = lm
    layer = next(l for l in li.select_layers(model) if l.name == "fc")
    torch.manual_seed(1)
    acts = torch.randn(5, 6, layer.d_in, dtype=torch.float64)
    grads = torch.randn(5, 6, layer.d_out, dtype=torch.float64)
    dense = torch.randn(3, layer.d_out, layer.d_in, dtype=torch.float64)
    expected = torch.einsum("qoi,bto,bti->qb", dense, grads, acts)
    queries = PreconditionedQueries({"fc": dense})
    torch.testing.assert_close(contract(queries, layer, acts, grads, per_token=False), expected)
    torch.testing.assert_close(contract(queries, layer, acts, grads, per_token=True).sum(-1), expected)
    many = PreconditionedQueries({"fc": dense.repeat(20, 1, 1)})  # more queries: materialising wins
    torch.testing.assert_close(contract(many, layer, acts, grads, per_token=False), expected.repeat(20, 1))
    low = PreconditionedQueries({"fc": dense}, rank=2)
    assert "fc" in low.low_rank
    torch.testing.assert_close(contract(low, layer, acts, grads, per_token=False),
                               torch.einsum("qoi,bto,bti->qb", low.dense_for("fc"), grads, acts))


def test_query_rank_exact_at_full_rank_and_degrades_gracefully():
    torch.manual_seed(0)
    model, task, data = mlp(d_in=6, hidden=8, d_out=4), li.ClassificationTask(), classification_data()
    factors = li.fit_factors(model, task, data, batch_size=16)
    queries = Subset(data, range(6))
    full = li.compute_influence(model, task, data, queries, factors=factors).scores
    # layers are [8 x 7] and [4 x 9]: rank 7 covers min(d_out, d_in + 1) of both
    exact = li.compute_influence(model, task, data, queries, factors=factors, query_rank=7).scores
    torch.testing.assert_close(exact, full, rtol=1e-5, atol=1e-6)
    errors = []
    for rank in (1, 2, 4):
        approx = li.compute_influence(model, task, data, queries, factors=factors, query_rank=rank).scores
        errors.append(float((approx - full).norm() / full.norm()))
    assert errors[0] > errors[1] > errors[2] > 0, errors
    assert errors[2] < 0.5, errors


def test_self_influence_is_the_diagonal_of_pairwise_scores():
    torch.manual_seed(0)
    model, task, data = mlp(), li.ClassificationTask(), classification_data(n=20)
    for strategy in ("ekfac", "kfac", "diagonal", "identity"):
        factors = li.fit_factors(model, task, data, strategy=strategy, batch_size=8)
        result = li.compute_influence(model, task, data, data, factors=factors, self_influence=True, batch_size=8)
        torch.testing.assert_close(result.self_scores, torch.diagonal(result.scores), rtol=1e-5, atol=1e-6)
        standalone = li.compute_self_influence(model, task, data, factors, batch_size=8)
        torch.testing.assert_close(standalone, result.self_scores)
        assert (standalone > 0).all()


def test_sign_convention_matches_retraining():
    """Up-weighting the top-scored example must lower the query loss more than the bottom one."""
    torch.manual_seed(0)
    x = torch.randn(60, 5, dtype=torch.float64)
    y = (x @ torch.randn(5, 3, dtype=torch.float64)).argmax(1)
    y[:6] = torch.randint(0, 3, (6,))  # some noisy labels give strongly harmful examples
    data = TensorDataset(x, y)
    query = TensorDataset(torch.randn(1, 5, dtype=torch.float64), torch.tensor([1]))
    task, decay = li.ClassificationTask(), 1e-2

    def train(weights, init=None):
        model = nn.Sequential(nn.Linear(5, 3)).double()
        if init is not None:
            model.load_state_dict(init)
        opt = torch.optim.LBFGS(model.parameters(), lr=1, max_iter=500, tolerance_grad=1e-12,
                                tolerance_change=1e-14, history_size=50, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            loss = (task.loss(model, (x, y)) * weights).mean() + decay * sum(p.square().sum() for p in model.parameters())
            loss.backward()
            return loss

        for _ in range(5):
            opt.step(closure)
        return model

    base = train(torch.ones(60))
    factors = li.fit_factors(base, task, data, strategy="ekfac", fisher="exact", batch_size=60)
    scores = li.compute_influence(base, task, data, query, factors=factors, damping=2 * decay).scores[0]
    top, bottom = int(scores.argmax()), int(scores.argmin())
    assert scores[top] > 0 > scores[bottom]

    def query_loss_after_upweighting(index):
        weights = torch.ones(60)
        weights[index] += 3.0
        model = train(weights, init=base.state_dict())
        with torch.no_grad():
            return float(task.loss(model, query.tensors)) - float(task.loss(base, query.tensors))

    assert query_loss_after_upweighting(top) < 0 < query_loss_after_upweighting(bottom)


def test_statistics_from_two_halves_merge_to_the_whole():
    torch.manual_seed(0)
    model, task, data = mlp(), li.ClassificationTask(), classification_data(n=40)
    layers = li.select_layers(model)
    kwargs = dict(fisher="empirical", batch_size=10, dtype=torch.float64)
    whole = accumulate_covariances(model, task, data, layers, **kwargs)
    first = accumulate_covariances(model, task, Subset(data, range(20)), layers, **kwargs)
    second = accumulate_covariances(model, task, Subset(data, range(20, 40)), layers, **kwargs)
    merged = first.merge_(second)
    for name in whole.state:
        for key in whole.state[name]:
            torch.testing.assert_close(merged.state[name][key], whole.state[name][key])
    # a round trip through state_dict (checkpoints, all_reduce) keeps everything
    restored = CovarianceStatistics(layers, dtype=torch.float64)
    restored.load_state_dict(merged.state_dict())
    from_merged = li.fit_factors(model, task, data, covariances=restored, fisher="empirical", batch_size=10)
    from_whole = li.fit_factors(model, task, data, fisher="empirical", batch_size=10)
    for name in from_whole.layer_names:
        torch.testing.assert_close(from_merged.eigenvalues(name), from_whole.eigenvalues(name), rtol=1e-4, atol=1e-7)
    other = CovarianceStatistics(li.select_layers(mlp(hidden=5)))
    with pytest.raises(ValueError, match="do not match"):
        other.load_state_dict(merged.state_dict())


def test_padding_is_excluded_from_counts():
    model, data = TinyTransformer().double(), TokenData(n=8)
    layers = li.select_layers(model)
    stats = accumulate_covariances(model, li.CausalLMTask(), data, layers, fisher="empirical", batch_size=4)
    real_tokens = float(data.attention_mask.sum())
    for layer in layers:
        assert float(stats.state[layer.name]["a_count"]) == real_tokens
        assert float(stats.state[layer.name]["s_count"]) == len(data)
    # the bias column of A counts exactly the real tokens too
    bias_entry = stats.state["fc"]["a_sum"][-1, -1]
    assert float(bias_entry) == pytest.approx(real_tokens)


def test_factors_and_results_round_trip(tmp_path, lm):
    model, data, factors = lm
    factors.save(tmp_path / "factors")
    loaded = li.load_factors(tmp_path / "factors")
    assert loaded.strategy == factors.strategy and loaded.layer_names == factors.layer_names
    result = li.compute_influence(model, li.CausalLMTask(), data, Subset(data, [1]), factors=loaded, per_layer=True)
    again = li.compute_influence(model, li.CausalLMTask(), data, Subset(data, [1]), factors=factors, per_layer=True)
    torch.testing.assert_close(result.scores, again.scores)
    result.save(tmp_path / "result")
    reloaded = li.InfluenceResult.load(tmp_path / "result")
    torch.testing.assert_close(reloaded.scores, result.scores)
    torch.testing.assert_close(reloaded.layer_scores, result.layer_scores)
    assert reloaded.layer_names == result.layer_names and reloaded.meta["strategy"] == "ekfac"
    # foreign and corrupted files fail with a clear error, never a pickle load
    with pytest.raises(li.FormatError, match="expected a 'lightning-influence/result'"):
        li.InfluenceResult.load(tmp_path / "factors")
    (tmp_path / "result" / "tensors.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(li.FormatError, match="corrupted"):
        li.InfluenceResult.load(tmp_path / "result").scores
    with pytest.raises(li.FormatError, match="no such directory"):
        li.load_factors(tmp_path / "missing")


class _SharedTwice(nn.Module):
    def __init__(self):
        super().__init__()
        self.layer = nn.Linear(4, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.layer(self.layer(x)))


class _Bypassed(nn.Module):
    """Applies ``proj`` through ``F.linear`` on its weight, as attention modules do: no hook fires."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(torch.nn.functional.linear(x, self.proj.weight, self.proj.bias).mean(1))


def test_layer_selection_errors_and_reports():
    model = mlp()
    with pytest.raises(li.TrackingError, match="did you mean '0.2'"):
        li.select_layers(nn.Sequential(model), layers=["0.22"])
    with pytest.raises(li.TrackingError, match="Tanh"):
        li.select_layers(model, layers=["1"])
    with pytest.raises(li.TrackingError, match="module types in this model: .*Tanh"):
        li.select_layers(nn.Sequential(nn.Tanh(), nn.ReLU()))
    assert [l.name for l in li.select_layers(model, layers=["*"], exclude=["2"])] == ["0"]
    with pytest.warns(DeprecationWarning, match="layers="):  # the former name of the argument
        assert [l.name for l in li.select_layers(model, include=["*"], exclude=["2"])] == ["0"]
    with pytest.raises(li.TrackingError, match="exclude"):
        li.select_layers(model, exclude=["nope"])
    with pytest.warns(UserWarning, match=r"skipping layers over the per-layer limit.*0 \("):
        kept = li.select_layers(nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 2)), max_layer_bytes=20_000)
    assert [l.name for l in kept] == ["1"]
    with pytest.raises(li.TrackingError, match="over the memory budget.*costliest layers: 0"):
        li.select_layers(nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 2)), memory_budget_bytes=20_000)


def test_hooks_that_never_fire_or_fire_twice_are_reported():
    data = TensorDataset(torch.randn(6, 4), torch.randint(0, 2, (6,)))
    with pytest.raises(li.TrackingError, match="more than once per forward pass: layer"):
        li.fit_factors(_SharedTwice(), li.ClassificationTask(), data)
    seq = TensorDataset(torch.randn(6, 3, 4), torch.randint(0, 2, (6,)))
    with pytest.raises(li.TrackingError, match="never called in the forward pass: proj"):
        li.fit_factors(_Bypassed(), li.ClassificationTask(), seq)
    # excluding it makes the rest work
    factors = li.fit_factors(_Bypassed(), li.ClassificationTask(), seq, exclude=["proj"])
    assert factors.layer_names == ["head"]


def test_gpt2_conv1d_and_tied_unembedding():
    model = TinyTransformer()
    names = [l.name for l in li.select_layers(model)]
    assert "qkv" in names  # duck-typed GPT-2 Conv1D
    layer = next(l for l in li.select_layers(model) if l.name == "qkv")
    assert (layer.d_out, layer.d_in) == (24, 9)
    model.head.weight = model.embed.weight  # tie the unembedding to the embedding
    assert "head" not in [l.name for l in li.select_layers(model)]


def test_tracker_gradient_hook_sees_the_users_backward():
    """The callback's mode: gradients captured from an ordinary loss.backward()."""
    model = mlp()
    seen = {}
    tracker = LayerTracker(li.select_layers(model), on_gradient=lambda layer, a, g: seen.__setitem__(layer.name, (a, g)))
    x, y = classification_data(n=5).tensors
    with tracker, tracker.capture():
        loss = nn.functional.cross_entropy(model(x), y, reduction="sum")
        loss.backward()
    assert set(seen) == {"0", "2"}
    acts, grads = seen["2"]
    expected = torch.einsum("bto,bti->oi", grads, acts)
    torch.testing.assert_close(expected[:, :-1], model[2].weight.grad)
    torch.testing.assert_close(expected[:, -1], model[2].bias.grad)


def test_bad_arguments_fail_fast():
    model, task, data = mlp(), li.ClassificationTask(), classification_data(n=8)
    with pytest.raises(ValueError, match="unknown strategy 'ekfca'"):
        li.fit_factors(model, task, data, strategy="ekfca")
    with pytest.raises(ValueError, match="unknown fisher"):
        li.fit_factors(model, task, data, fisher="approx")
    factors = li.fit_factors(model, task, data, batch_size=8)
    with pytest.raises(ValueError, match="damping must be a number from 0 to 1e"):
        li.compute_influence(model, task, data, data, factors=factors, damping=-1.0)
    with pytest.raises(ValueError, match="query_rank"):
        li.compute_influence(model, task, data, data, factors=factors, query_rank=0)


def test_engine_works_inside_inference_mode_and_leaves_global_rng_alone():
    """Lightning runs validation hooks under inference_mode; training relies on the global RNG."""
    model, task, data = mlp(), li.ClassificationTask(), classification_data(n=12)
    expected = li.compute_influence(model, task, data, Subset(data, [0]), batch_size=4).scores
    state = torch.random.get_rng_state()
    with torch.inference_mode():
        factors = li.fit_factors(model, task, data, batch_size=4)
        scores = li.compute_influence(model, task, data, Subset(data, [0]), factors=factors, batch_size=4).scores
    torch.testing.assert_close(scores, expected)
    assert torch.equal(torch.random.get_rng_state(), state)
