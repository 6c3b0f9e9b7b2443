import json
import math

import pytest
import torch

from lightning_influence.analysis import concentration
from lightning_influence.analysis.compare import (
    compare,
    js_divergence,
    kendall_tau_b,
    rank_biased_overlap,
    spearman,
    topk_jaccard,
    trajectory,
)
from lightning_influence.results import InfluenceResult

stats = pytest.importorskip("scipy.stats")


def make_result(scores, step=0, layer_weights=(0.3, 0.7), train_ids=None, query_ids=None, names=("enc", "dec")):
    layer_scores = torch.stack([w * scores for w in layer_weights])
    return InfluenceResult(
        scores=scores,
        train_ids=train_ids,
        query_ids=query_ids,
        layer_names=list(names),
        layer_scores=layer_scores,
        step=step,
        epoch=step // 10,
    )


@pytest.fixture
def scores():
    return torch.randn(3, 200, generator=torch.Generator().manual_seed(0)) ** 3


def test_spearman_and_kendall_match_scipy_with_ties():
    g = torch.Generator().manual_seed(1)
    a = torch.randn(4, 150, generator=g)
    b = a + torch.randn(4, 150, generator=g)
    a[:, :40] = a[:, :40].round()  # ties in both
    b[:, 20:60] = b[:, 20:60].round()
    ours_s, ours_k = spearman(a, b), kendall_tau_b(a, b)
    for q in range(4):
        assert ours_s[q].item() == pytest.approx(stats.spearmanr(a[q], b[q]).statistic, abs=1e-10)
        assert ours_k[q].item() == pytest.approx(stats.kendalltau(a[q], b[q]).statistic, abs=1e-10)


def test_kendall_subsample_is_seeded_and_close():
    g = torch.Generator().manual_seed(2)
    a = torch.randn(2, 3000, generator=g)
    b = a + 0.5 * torch.randn(2, 3000, generator=g)
    sub = kendall_tau_b(a, b, max_n=1000, seed=3)
    assert torch.equal(sub, kendall_tau_b(a, b, max_n=1000, seed=3))
    full = [stats.kendalltau(a[q], b[q]).statistic for q in range(2)]
    assert sub.tolist() == pytest.approx(full, abs=0.05)


def test_topk_overlaps_by_hand():
    a = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]])
    b = torch.tensor([[3.0, 4.0, 0.0, 1.0, 2.0]])  # top-2 swapped, top-3 {0,1,4} vs {0,1,2}
    assert topk_jaccard(a, b, 2).item() == pytest.approx(1.0)
    assert topk_jaccard(a, b, 3).item() == pytest.approx(2 / 4)
    # X_1 = 0, X_2 = 2: RBO = (2/2) 0.9^2 + (0.1/0.9) (0 * 0.9 + 1 * 0.81) = 0.9
    assert rank_biased_overlap(a, b, 2).item() == pytest.approx(0.9)
    assert rank_biased_overlap(a, a, 5).item() == pytest.approx(1.0)
    assert rank_biased_overlap(a, -a, 2).item() == pytest.approx(0.0)


def test_js_divergence():
    assert js_divergence(torch.tensor([0.2, 0.8]), torch.tensor([2.0, 8.0])) == pytest.approx(0.0, abs=1e-12)
    assert js_divergence(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])) == pytest.approx(1.0)


def test_compare_with_itself(scores):
    a = make_result(scores, step=10)
    found = compare(a, make_result(scores.clone(), step=20))
    assert found.steps == (10, 20) and found.n_query == 3 and found.n_train == 200
    torch.testing.assert_close(found.spearman, torch.ones(3, dtype=torch.float64))
    torch.testing.assert_close(found.kendall, torch.ones(3, dtype=torch.float64))
    assert found.topk_jaccard == {1: 1.0, 5: 1.0, 10: 1.0, 50: 1.0}
    assert all(v == pytest.approx(1.0) for v in found.topk_rbo.values())
    assert found.layer_js == pytest.approx(0.0, abs=1e-12)
    assert found.entered == [[], [], []] and found.left == [[], [], []]
    assert found.tail_alpha[0] == found.tail_alpha[1] is not None
    assert found.concentration[0] == concentration(scores)


def test_compare_with_reversed_scores(scores):
    found = compare(make_result(scores), make_result(-scores, layer_weights=(0.7, 0.3)))
    torch.testing.assert_close(found.spearman, -torch.ones(3, dtype=torch.float64))
    torch.testing.assert_close(found.kendall, -torch.ones(3, dtype=torch.float64))
    assert found.topk_jaccard[10] == 0.0 and found.topk_rbo[10] == pytest.approx(0.0)
    assert found.layer_js > 0.05
    top_a = scores.topk(10, dim=1).indices.tolist()
    assert [sorted(ids) for ids in found.left] == [sorted(ids) for ids in top_a]
    assert found.entered == (-scores).topk(10, dim=1).indices.tolist()  # in b's rank order


def test_permuted_and_partial_ids_are_matched(scores):
    train_ids = torch.arange(100, 300)
    a = make_result(scores, train_ids=train_ids, query_ids=torch.tensor([7, 8, 9]))
    perm = torch.randperm(200, generator=torch.Generator().manual_seed(4))
    q_perm = torch.tensor([2, 0, 1])
    b = make_result(scores[q_perm][:, perm], train_ids=train_ids[perm], query_ids=torch.tensor([9, 7, 8]))
    found = compare(a, b)
    torch.testing.assert_close(found.spearman, torch.ones(3, dtype=torch.float64))
    assert found.topk_jaccard[50] == 1.0 and found.entered == [[], [], []]
    assert found.query_ids == [7, 8, 9]
    # b scored a smaller pool and only one of the queries: compare on the intersection
    keep = perm[:120]
    c = make_result(scores[1:2][:, keep], train_ids=train_ids[keep], query_ids=torch.tensor([8]))
    partial = compare(a, c)
    assert (partial.n_query, partial.n_train) == (1, 120)
    assert partial.spearman.tolist() == pytest.approx([1.0])


def test_disjoint_ids_raise_clear_errors(scores):
    a = make_result(scores, step=1)
    other_pool = make_result(scores, step=2, train_ids=torch.arange(1000, 1200))
    with pytest.raises(ValueError, match=r"share 0 training ids.*1000\.\.1199"):
        compare(a, other_pool)
    with pytest.raises(ValueError, match="share 1 training ids"):
        compare(a, make_result(scores[:, :1], train_ids=torch.tensor([5])))
    with pytest.raises(ValueError, match="share 0 query ids"):
        compare(a, make_result(scores, query_ids=torch.tensor([10, 11, 12])))


def test_compare_small_pool_and_missing_layers(scores):
    small = scores[:, :8]
    a = InfluenceResult(scores=small, step=1)
    found = compare(a, InfluenceResult(scores=small.flip(1), step=2))
    assert list(found.topk_jaccard) == [1, 5]  # k above the pool size is left out
    assert found.layer_js is None and found.k_changes == 8


def test_comparison_outputs(scores):
    b_scores = scores + 0.5 * torch.randn(3, 200, generator=torch.Generator().manual_seed(5))
    found = compare(make_result(scores, step=100), make_result(b_scores, step=200, layer_weights=(0.5, 0.5)))
    payload = found.to_dict()
    text = json.dumps(payload, allow_nan=False)
    assert json.loads(text)["spearman_mean"] == pytest.approx(found.spearman.mean().item())
    assert payload["topk_jaccard"]["10"] == found.topk_jaccard[10]
    table = found.format_table()
    assert "step 100 -> step 200" in table and "3 queries, 200 training examples" in table
    assert f"{found.spearman.mean().item():.3f}" in table
    assert f"{found.layer_js:.3f}" in table
    assert f"query 0: entered {found.entered[0][:10]}".replace("]", "") in table.replace("]", "")


def test_trajectory(scores):
    later = scores + torch.randn(3, 200, generator=torch.Generator().manual_seed(6))
    results = [
        make_result(scores, step=10),
        make_result(scores.clone(), step=20),
        make_result(later, step=30, layer_weights=(0.5, 0.25, 0.25), names=("enc", "dec", "head")),
    ]
    series = trajectory(results, k=10)
    assert series["step"] == [10, 20, 30] and series["epoch"] == [1, 2, 3]
    assert "topk_churn" not in series  # churn at k=10 is named with its k: one name, one definition
    assert series["topk_churn@10"][:2] == [None, 0.0] and series["spearman_prev"][1] == pytest.approx(1.0)
    expected_churn = 1 - topk_jaccard(scores, later, 10).mean().item()
    assert series["topk_churn@10"][2] == pytest.approx(expected_churn)
    assert trajectory(results, k=5)["topk_churn@5"][2] == pytest.approx(1 - topk_jaccard(scores, later, 5).mean().item())
    assert series["spearman_prev"][2] == pytest.approx(spearman(scores, later).mean().item())
    assert series["top1pct_share"][0] == pytest.approx(concentration(scores)["top1pct_share"])
    assert series["tail_alpha"][0] == series["tail_alpha"][1] is not None
    assert series["layer_share/enc"] == pytest.approx([0.3, 0.3, 0.5])
    assert series["layer_share/head"][:2] == [None, None] and series["layer_share/head"][2] == pytest.approx(0.25)
    assert all(len(v) == 3 for v in series.values())
    json.dumps(series, allow_nan=False)


def test_trajectory_tolerates_unmatched_and_degenerate_checkpoints(scores):
    zero = InfluenceResult(scores=torch.zeros(3, 200), train_ids=torch.arange(500, 700), step=2)
    series = trajectory([make_result(scores, step=1), zero])
    assert series["topk_churn@10"] == [None, None] and series["spearman_prev"] == [None, None]
    assert series["tail_alpha"][1] is None and series["gini"][1] is None
    assert not math.isnan(series["gini"][0])


def test_the_tail_exponent_is_shown_with_its_plausibility_in_the_trajectory_and_the_comparison():
    """Where α is shown, the share of queries whose tail is a plausible power law is shown beside it
    (issue 24): the same share the result's summary logs."""
    from lightning_influence.analysis import summarize

    generator = torch.Generator().manual_seed(1)
    pareto = torch.rand(8, 3000, generator=generator).pow(-1 / 1.5)  # power-law tails: plausible
    lognormal = (2.0 * torch.randn(8, 3000, generator=generator)).exp()  # a log-normal: favoured over a power law
    results = [make_result(pareto.double(), step=10), make_result(lognormal.double(), step=20)]
    expected = [summarize(r).scalars["tail_plausible_fraction"] for r in results]
    assert expected[0] > expected[1]
    traj = trajectory(results)
    assert traj["tail_plausible_fraction"] == pytest.approx(expected)
    comparison = compare(*results)
    assert list(comparison.tail_plausible_fraction) == pytest.approx(expected)
    assert comparison.to_dict()["tail_plausible_fraction"] == pytest.approx(expected)
    assert "tail_plausible_fraction" in comparison.format_table()
