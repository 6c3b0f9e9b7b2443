"""Language-model scale paths equal the plain ones: queries prepared layer by layer and chunk by
chunk, randomised truncation against the exact one, self-influence from rotated tokens, and the
per-layer sums that replace ``layer_scores [L, Q, N]`` in callback results."""

import math

import pytest
import torch
from torch.utils.data import Subset

import lightning_influence as li
from lightning_influence.analysis import layer_shares, result_layer_shares
from lightning_influence.engine.example_gradients import per_example_gradients
from lightning_influence.engine.queries import _example_gradient_batches, _not_finite, precondition_queries, randomized_truncate, truncate
from lightning_influence.engine.tracking import LayerTracker, layers_by_name
from lightning_influence.engine import passes
from tests.tiny_models import TinyTransformer, TokenData

RANK = 4
# The randomised truncation on a small model: scores within
# 1e-3 of the largest exact-truncation score (benchmarks/lm_scale.py reports it on a trained GPT).
RANDOMIZED_TOLERANCE = 1e-3


@pytest.fixture(scope="module")
def lm():
    torch.manual_seed(0)
    model, task = TinyTransformer(vocab=40, width=32, context=12), li.CausalLMTask()
    data = TokenData(n=24, length=12, vocab=40)
    factors = li.fit_factors(model, task, data, fisher="empirical", batch_size=8)
    return model, task, data, factors


def reference_queries(model, task, queries, factors, strategy_factors=None):
    """The plain algorithm: every query's whole gradient, preconditioned in float64 in one go."""
    factors = strategy_factors or factors
    layers = layers_by_name(model, factors.layer_names)
    lambdas = factors.damping_per_layer()
    tracker = LayerTracker(layers)
    collected = {layer.name: [] for layer in layers}
    with passes.evaluation_mode(model), tracker:
        for _, acts, grads in _example_gradient_batches(model, task, queries, tracker, 64, True, "", False):
            for layer, act, grad in zip(layers, acts, grads):
                collected[layer.name].append(per_example_gradients(act, grad).detach().double())
    return {name: factors.precondition(name, torch.cat(chunks), lambdas[name]) for name, chunks in collected.items()}


def prepared(model, task, queries, factors, **kwargs):
    layers = layers_by_name(model, factors.layer_names)
    return precondition_queries(model, task, queries, factors, layers, factors.damping_per_layer(), **kwargs)


def assert_relative(actual, expected, tolerance):
    error = float((actual.double() - expected.double()).abs().max() / expected.double().abs().max())
    assert error <= tolerance, f"relative error {error:.2e} above {tolerance:.0e}"


@pytest.mark.parametrize("strategy", ["ekfac", "diagonal"])
def test_full_rank_queries_equal_the_float64_reference_for_any_query_batch(lm, strategy):
    model, task, data, _ = lm
    factors = li.fit_factors(model, task, data, strategy, "empirical", batch_size=8)
    queries = Subset(data, range(7))
    expected = reference_queries(model, task, queries, factors)
    for batch_size in (7, 3):  # one batch, and batches of 3, 3, 1
        built, unusable = prepared(model, task, queries, factors, batch_size=batch_size)
        assert not built.low_rank and not unusable.any()
        for name, reference in expected.items():
            assert built.dense[name].dtype == torch.float32
            assert_relative(built.dense[name], reference, 1e-5)  # float32 round-off


def test_exact_truncation_is_the_truncated_reference(lm):
    model, task, data, factors = lm
    queries = Subset(data, range(5))
    expected = reference_queries(model, task, queries, factors)
    built, _ = prepared(model, task, queries, factors, query_rank=RANK, batch_size=2, truncation="exact")
    assert set(built.low_rank) == set(expected)
    for name, reference in expected.items():
        left, right = truncate(reference, RANK)
        assert_relative(built.dense_for(name), left @ right.transpose(1, 2), 1e-5)


def test_randomized_truncation_is_the_default_within_the_stated_tolerance_of_the_exact_one(lm):
    model, task, data, factors = lm
    queries = Subset(data, range(6))
    randomized = li.compute_influence(model, task, data, queries, factors, query_rank=RANK)
    assert randomized.meta["query_truncation"] == "randomized"
    exact = li.compute_influence(model, task, data, queries, factors, query_rank=RANK, query_truncation="exact")
    assert exact.meta["query_truncation"] == "exact"
    assert_relative(randomized.scores, exact.scores, RANDOMIZED_TOLERANCE)
    # and the truncation matters here: full rank differs by far more than the tolerance
    full = li.compute_influence(model, task, data, queries, factors)
    error = float((full.scores - exact.scores).abs().max() / exact.scores.abs().max())
    assert error > 100 * RANDOMIZED_TOLERANCE


def power_law_matrices(count, rows, columns, exponent, seed=0):
    """Matrices with singular values ``i^-exponent``: slowly falling past any rank, like the
    preconditioned query gradients of a trained GPT (there the fall is steeper, about ``i^-1.7``)."""
    generator = torch.Generator().manual_seed(seed)
    left = torch.linalg.qr(torch.randn(count, rows, rows, generator=generator, dtype=torch.float64)).Q
    right = torch.linalg.qr(torch.randn(count, columns, rows, generator=generator, dtype=torch.float64)).Q
    values = torch.arange(1, rows + 1, dtype=torch.float64) ** -exponent
    return (left * values) @ right.transpose(1, 2)


@pytest.mark.parametrize("rank", [8, 16])
@pytest.mark.parametrize("exponent, iterations", [(0.75, 4), (1.0, 3), (1.7, 2)])
def test_randomized_truncation_converges_on_slowly_falling_spectra(rank, exponent, iterations, monkeypatch):
    """Subspace iteration stops once it has converged: early on fast-falling spectra, never before
    the stated tolerance."""
    matrices = power_law_matrices(4, 128, 200, exponent=exponent)
    left, right = truncate(matrices, rank)
    exact = left @ right.transpose(1, 2)
    products = []
    real_qr = torch.linalg.qr
    monkeypatch.setattr(torch.linalg, "qr", lambda m: products.append(m.shape) or real_qr(m))
    left, right = randomized_truncate(matrices.float(), rank)
    assert len(products) == 1 + iterations  # the range found, then one orthonormalisation per iteration
    approx = left.double() @ right.double().transpose(1, 2)
    error = (approx - exact).flatten(1).norm(dim=1) / exact.flatten(1).norm(dim=1)
    assert float(error.max()) < RANDOMIZED_TOLERANCE / 3


def test_unknown_truncation_is_refused(lm):
    model, task, data, factors = lm
    with pytest.raises(ValueError, match="unknown truncation 'svd'"):
        prepared(model, task, Subset(data, [0]), factors, query_rank=RANK, truncation="svd")


def test_self_influence_equals_the_float64_quadratic_form(lm):
    model, task, data, factors = lm
    expected = reference_queries(model, task, data, factors)  # (G + λI)⁻¹ ∇ℓ(z) of each example ...
    layers = layers_by_name(model, factors.layer_names)
    tracker = LayerTracker(layers)
    grads_of = {layer.name: [] for layer in layers}
    with passes.evaluation_mode(model), tracker:  # ... dotted with its own gradient ∇ℓ(z) = -∇f(z)
        for _, acts, grads in _example_gradient_batches(model, task, data, tracker, 64, True, "", False):
            for layer, act, grad in zip(layers, acts, grads):
                grads_of[layer.name].append(per_example_gradients(act, grad).detach().double())
    reference = sum((expected[name] * torch.cat(grads_of[name])).sum((1, 2)) for name in expected)
    self_scores = li.compute_self_influence(model, task, data, factors, batch_size=5)
    assert_relative(self_scores, reference, 1e-5)
    pairwise = li.compute_influence(model, task, data, data, factors, self_influence=True, batch_size=5)
    torch.testing.assert_close(pairwise.self_scores, self_scores)


def test_layer_sums_give_the_layer_shares_of_the_dense_layer_scores(lm):
    model, task, data, factors = lm
    queries = Subset(data, range(4))
    result = li.compute_influence(model, task, data, queries, factors, per_layer=True, layer_sums=True, batch_size=5)
    assert result.get("layer_abs_sums").shape == (len(factors.layer_names), 4)
    without_dense = li.InfluenceResult(scores=result.scores, train_ids=result.train_ids, query_ids=result.query_ids,
                                       layer_names=result.layer_names, layer_abs_sums=result.get("layer_abs_sums"))
    torch.testing.assert_close(result_layer_shares(without_dense), layer_shares(result.layer_scores))


def test_session_keeps_sums_and_top_examples_and_their_layer_shares_are_unchanged(lm, tmp_path):
    model, task, data, factors = lm
    session = li.InfluenceSession(task, data, Subset(data, range(3)), scoring=dict(top_k=5, batch_size=8))
    dense = session.score(model, factors, per_layer=True)
    compact = session.score(model, factors)
    assert compact.layer_scores is None and compact.get("top_layer_scores").shape == (len(factors.layer_names), 3, 5)
    path = li.InfluenceSession.write(compact, factors, tmp_path / "result")
    loaded = li.InfluenceResult.load(path)
    for top_k in (None, 5, 3):
        torch.testing.assert_close(result_layer_shares(loaded, top_k), layer_shares(dense.layer_scores, top_k=top_k),
                                   rtol=1e-5, atol=1e-7)
    assert result_layer_shares(loaded, top_k=6) is None  # more than the kept examples: not claimed
    summary_dense, summary_compact = li.summarize(dense), li.summarize(loaded)
    assert summary_compact.scalars == pytest.approx(summary_dense.scalars, rel=1e-5)
    assert [f.alpha if f else math.nan for f in summary_compact.tail_fits] == pytest.approx(
        [f.alpha if f else math.nan for f in summary_dense.tail_fits], nan_ok=True)


def test_not_finite_flags_nan_and_inf_but_not_finite_values_that_overflow_a_sum():
    matrices = torch.zeros(4, 3, 5)
    matrices[1] = 3e38  # finite, but their float32 sum is inf
    matrices[2, 1, 1] = float("nan")
    matrices[3, 0, 4] = -float("inf")
    assert _not_finite(matrices).tolist() == [False, False, True, True]


def test_queries_left_in_the_eigenbasis_for_a_small_pool_give_the_scores_of_rotated_back_ones(lm):
    model, task, data, factors = lm
    queries = Subset(data, range(7))
    rotated_back, unusable = prepared(model, task, queries, factors)  # pool size unknown: every side rotated back
    assert not rotated_back.pool_bases
    seen = set()
    # 6 sequences of 12 tokens: pool tokens well below 7 queries times any width, both sides stay in the
    # eigenbasis; 12 sequences: only a side whose other width is large enough (fc's input side, out's output side)
    for pool in (Subset(data, range(6)), Subset(data, range(12))):
        kept, _ = prepared(model, task, queries, factors, pool_examples=len(pool))
        seen.update(tuple(basis is not None for basis in bases) for bases in kept.pool_bases.values())
        for name, reference in rotated_back.dense.items():
            assert_relative(kept.dense_for(name), reference, 1e-5)
        default = li.compute_influence(model, task, pool, queries, factors, per_token=True, batch_size=5)
        reference = li.compute_influence(model, task, pool, queries, factors, per_token=True, batch_size=5,
                                         prepared_queries=(rotated_back, unusable))
        assert_relative(default.scores, reference.scores, 1e-5)
        assert_relative(default.token_scores, reference.token_scores, 1e-5)
        pairs = torch.rand(7, len(pool), generator=torch.Generator().manual_seed(1)) < 0.3
        chosen = li.compute_influence(model, task, pool, queries, factors, per_token=True, batch_size=5,
                                      token_pairs=pairs)
        assert_relative(chosen.token_scores, reference.token_scores * pairs.unsqueeze(-1), 1e-5)
    assert seen == {(True, True), (True, False), (False, True)}


@pytest.mark.parametrize("query_rank", [None, RANK])
def test_token_scores_of_chosen_pairs_equal_the_dense_token_scores(lm, query_rank):
    model, task, data, factors = lm
    queries = Subset(data, range(5))
    dense = li.compute_influence(model, task, data, queries, factors, per_token=True, query_rank=query_rank,
                                 batch_size=7)
    pairs = torch.rand(5, len(data), generator=torch.Generator().manual_seed(0)) < 0.3
    chosen = li.compute_influence(model, task, data, queries, factors, per_token=True, per_layer=True,
                                  query_rank=query_rank, batch_size=7, token_pairs=pairs)
    assert_relative(chosen.scores, dense.scores * pairs, 1e-5)  # per example, not summed over tokens: round-off
    expected = dense.token_scores * pairs.unsqueeze(-1)
    assert_relative(chosen.token_scores, expected, 1e-5)
    assert float(expected.abs().max()) > 0 and not chosen.token_scores[~pairs].any()
    # only the chosen pairs are scored (the top examples' layer scores): no query meets every example
    assert not chosen.layer_scores[:, ~pairs].any() and not chosen.scores[~pairs].any()
    assert_relative(chosen.layer_scores.sum(0), chosen.scores, 1e-5)


@pytest.mark.parametrize("width", [100, 300, 515])
def test_blocked_gram_equals_the_full_product(width):
    from lightning_influence.engine.statistics import add_symmetric_gram_
    rows = torch.randn(200, width, generator=torch.Generator().manual_seed(width), dtype=torch.float64)
    total = torch.eye(width, dtype=torch.float64)
    add_symmetric_gram_(total, rows, alpha=0.5)
    assert torch.allclose(total, torch.eye(width, dtype=torch.float64) + 0.5 * rows.T @ rows, rtol=1e-12, atol=1e-10)
