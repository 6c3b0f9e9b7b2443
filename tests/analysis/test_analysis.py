import json
import math
import warnings

import numpy as np
import pytest
import torch

from lightning_influence.analysis import (
    concentration,
    fit_power_law,
    fit_query_tails,
    group_layer_names,
    layer_shares,
    summarize,
    token_distribution,
)
from lightning_influence.results import InfluenceResult

powerlaw = pytest.importorskip("powerlaw")


def pareto(n, alpha, xmin=1.0, seed=0):
    """Continuous power law p(x) ~ x^-alpha above xmin, by inverse-CDF sampling."""
    u = np.random.default_rng(seed).random(n)
    return xmin * (1.0 - u) ** (-1.0 / (alpha - 1.0))


def body_and_tail(n=2000, alpha=2.5, seed=0):
    """Uniform body on [0.1, 1) below a power-law tail from 1: the true xmin is 1."""
    rng = np.random.default_rng(seed)
    return np.concatenate([rng.uniform(0.1, 1.0, n // 4), pareto(n - n // 4, alpha, seed=seed + 1)])


def reference_fit(data, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return powerlaw.Fit(data, verbose=False, **kwargs)


# -- power-law tail --------------------------------------------------------------------------------


def test_pareto_exponent_within_three_standard_errors_and_accurate_on_average():
    errors = []
    for seed in range(5):
        fit = fit_power_law(pareto(10_000, 2.5, seed=seed), compare_alternatives=False)
        assert abs(fit.alpha - 2.5) < 3 * fit.sigma, (seed, fit)
        assert fit.sigma == pytest.approx((fit.alpha - 1) / math.sqrt(fit.n_tail))
        assert fit.n == 10_000 and fit.xmin >= 1.0
        errors.append(abs(fit.alpha - 2.5))
    assert np.mean(errors) < 0.05


def test_exponent_with_fixed_xmin_matches_powerlaw_package():
    data = body_and_tail(seed=3)
    ours = fit_power_law(data, xmin=1.0, compare_alternatives=False)
    theirs = reference_fit(data, xmin=1.0)
    assert ours.alpha == pytest.approx(theirs.power_law.alpha, rel=1e-6)
    assert ours.n_tail == int((data >= 1.0).sum())
    assert ours.ks == pytest.approx(theirs.power_law.D, abs=1.0 / ours.n_tail)


def test_xmin_search_matches_powerlaw_package():
    data = body_and_tail(seed=4)
    theirs = reference_fit(data)
    exhaustive = fit_power_law(data, max_xmin_candidates=len(data), compare_alternatives=False)
    # powerlaw measures the KS distance on one side of each jump of the empirical CDF, we take the
    # supremum over both sides, so the chosen xmin may differ by a neighbouring value
    assert exhaustive.xmin == pytest.approx(theirs.xmin, rel=0.02)
    assert exhaustive.alpha == pytest.approx(theirs.alpha, rel=1e-2)
    assert exhaustive.ks <= fit_power_law(data, xmin=theirs.xmin, compare_alternatives=False).ks
    # the default coarse-to-fine search lands in the same neighbourhood
    default = fit_power_law(data, compare_alternatives=False)
    assert default.xmin == pytest.approx(theirs.xmin, rel=0.1)
    assert default.alpha == pytest.approx(theirs.alpha, rel=1e-2)
    assert default.ks <= theirs.D + 1.0 / default.n_tail


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::RuntimeWarning")  # powerlaw's own fits
def test_likelihood_ratio_tests_agree_with_powerlaw_package():
    rng = np.random.default_rng(5)
    # data, sign of R against the exponential, whether powerlaw computes the same numbers (powerlaw
    # caps alpha at 3 and its exponential pdf underflows far in a power-law tail)
    cases = (
        (pareto(3000, 2.2, seed=5), 1, False),
        (rng.exponential(size=3000) + 0.5, -1, True),
        (rng.lognormal(mean=0.0, sigma=0.8, size=3000), -1, True),
    )
    for data, exp_sign, comparable in cases:
        theirs = reference_fit(data, xmin=float(np.quantile(data, 0.2)))
        ours = fit_power_law(data, xmin=theirs.xmin)
        r_exp, _ = theirs.distribution_compare("power_law", "exponential")
        r_log, _ = theirs.distribution_compare("power_law", "lognormal")
        assert np.sign(ours.exponential_R) == np.sign(r_exp) == exp_sign
        assert 0.0 <= ours.exponential_p <= 1.0 and 0.0 <= ours.lognormal_p <= 1.0
        if comparable:
            assert ours.exponential_R == pytest.approx(r_exp, rel=1e-6)
            assert ours.lognormal_R == pytest.approx(r_log, rel=1e-6)
    # a clearly log-normal sample: the log-normal is favoured, significantly
    assert ours.lognormal_R < 0 and ours.lognormal_p < 0.05


def test_bootstrap_p_value_separates_power_law_from_exponential():
    good = fit_power_law(pareto(1000, 2.5, seed=6), bootstrap=40, compare_alternatives=False, seed=1)
    exponential = np.random.default_rng(6).exponential(size=1000) + 1.0
    bad = fit_power_law(exponential, xmin=1.0, bootstrap=40, compare_alternatives=False)
    assert good.p_value > 0.1
    assert bad.p_value < 0.1
    again = fit_power_law(pareto(1000, 2.5, seed=6), bootstrap=40, compare_alternatives=False, seed=1)
    assert again.p_value == good.p_value  # private, seeded generator


def test_fit_drops_nonpositive_and_nonfinite_values_and_accepts_tensors():
    data = pareto(2000, 3.0, seed=7)
    noisy = torch.tensor(np.concatenate([data, -data, [0.0, np.nan, np.inf]]))
    assert fit_power_law(noisy, compare_alternatives=False) == fit_power_law(data, compare_alternatives=False)


def test_fit_rejects_too_little_data_with_clear_message():
    with pytest.raises(ValueError, match="min_tail=10 positive"):
        fit_power_law([-1.0, 0.0, 1.0, 2.0])
    with pytest.raises(ValueError, match="1-D"):
        fit_power_law(np.ones((3, 30)))
    with pytest.raises(ValueError):
        fit_power_law(np.ones(50))  # one distinct value: no exponent
    with pytest.raises(ValueError, match="xmin"):
        fit_power_law(pareto(100, 2.5), xmin=1e6)


def test_fit_to_dict_is_strict_json():
    fit = fit_power_law(pareto(500, 2.5))
    payload = fit.to_dict()
    json.dumps(payload, allow_nan=False)
    assert payload["alpha"] == fit.alpha and payload["p_value"] is None


def lognormal_sample(n=10000, seed=0):
    """A log-normal sample whose searched tail (1,471 values above xmin) is long enough for the
    likelihood-ratio test to tell it from a power law (shorter tails of a log-normal look like one)."""
    return np.random.default_rng(seed).lognormal(0.0, 1.0, size=n)


def test_tail_verdict_calls_a_power_law_plausible_and_a_lognormal_not():
    power_law = fit_power_law(pareto(3000, 2.5, seed=11))
    assert power_law.plausible is True and power_law.favoured_alternative is None
    assert power_law.label == "power law plausible"
    lognormal = fit_power_law(lognormal_sample())
    assert lognormal.lognormal_R < 0 and lognormal.lognormal_p < 0.1
    assert lognormal.plausible is False and lognormal.favoured_alternative == "lognormal"
    assert lognormal.label == "heavy tail, power law not supported (lognormal favoured)"
    # the exponential is favoured by an exponential sample above a fixed xmin
    exponential = fit_power_law(np.random.default_rng(6).exponential(size=3000) + 1.0, xmin=1.0)
    assert exponential.favoured_alternative == "exponential" and exponential.plausible is False
    untested = fit_power_law(pareto(3000, 2.5, seed=11), compare_alternatives=False)
    assert untested.plausible is None and "not tested" in untested.label


def test_summary_logs_the_share_of_plausible_power_law_tails():
    rows = [pareto(10000, 2.5, seed=12), lognormal_sample(), pareto(10000, 3.0, seed=13), lognormal_sample()]
    summary = summarize(InfluenceResult(scores=torch.tensor(np.stack(rows))))
    assert [fit.plausible for fit in summary.tail_fits] == [True, False, True, False]
    assert summary.scalars["tail_plausible_fraction"] == pytest.approx(0.5)
    assert summary.to_dict()["tail_fits"][1]["label"].startswith("heavy tail, power law not supported")


def test_query_tails_positive_abs_and_degenerate_rows():
    data = torch.tensor(pareto(1000, 2.5, seed=8))
    scores = torch.stack([data, -data, torch.zeros(1000)])
    positive = fit_query_tails(scores, compare_alternatives=False)
    assert positive[0] is not None and positive[1] is None and positive[2] is None
    absolute = fit_query_tails(scores, use="abs", compare_alternatives=False)
    assert absolute[1].alpha == pytest.approx(positive[0].alpha)
    with pytest.raises(ValueError):
        fit_query_tails(scores, use="negative")


# -- concentration ---------------------------------------------------------------------------------


def gini_by_pairs(x):
    """Gini as the mean absolute difference over all pairs, divided by twice the mean."""
    x = np.asarray(x, dtype=float)
    return np.abs(x[:, None] - x[None, :]).sum() / (2 * len(x) ** 2 * x.mean())


def test_concentration_by_hand():
    values = np.arange(100.0) - 49.0  # positives 1..50, total 1275
    found = concentration(values)
    assert found["top1pct_share"] == pytest.approx(50 / 1275)
    assert found["top10pct_share"] == pytest.approx(sum(range(41, 51)) / 1275)
    assert found["positive_fraction"] == pytest.approx(0.5)
    assert found["gini"] == pytest.approx(gini_by_pairs(np.clip(values, 0, None)))
    assert concentration([0.0, 0.0, 0.0, 1.0])["gini"] == pytest.approx(0.75)
    assert concentration(np.ones(10))["gini"] == pytest.approx(0.0)
    assert concentration(np.ones(10))["top1pct_share"] == pytest.approx(0.1)  # at least one example


def test_concentration_of_a_matrix_is_the_mean_over_queries_and_skips_undefined_rows():
    rng = np.random.default_rng(9)
    rows = rng.standard_normal((3, 400))
    found = concentration(torch.tensor(rows))
    for key in found:
        assert found[key] == pytest.approx(np.mean([concentration(row)[key] for row in rows]))
    with_dead_row = concentration(np.vstack([rows[:1], -np.ones((1, 400))]))
    assert with_dead_row["gini"] == pytest.approx(concentration(rows[0])["gini"])
    assert with_dead_row["positive_fraction"] == pytest.approx(concentration(rows[0])["positive_fraction"] / 2)
    assert math.isnan(concentration(-np.ones(5))["gini"])


# -- layers ----------------------------------------------------------------------------------------


def test_layer_shares_sum_to_one_and_ignore_sign():
    layer_scores = torch.randn(5, 3, 200, generator=torch.Generator().manual_seed(0))
    shares = layer_shares(layer_scores)
    assert shares.shape == (3, 5)
    torch.testing.assert_close(shares.sum(1), torch.ones(3, dtype=torch.float64))
    torch.testing.assert_close(shares, layer_shares(-layer_scores))
    expected = layer_scores.abs().sum(2).T.double()
    torch.testing.assert_close(shares, expected / expected.sum(1, keepdim=True))


def test_layer_shares_top_k_uses_each_querys_most_influential_examples():
    layer_scores = torch.randn(4, 2, 50, generator=torch.Generator().manual_seed(1))
    shares = layer_shares(layer_scores, top_k=5)
    for q in range(2):
        top = layer_scores[:, q].sum(0).topk(5).indices
        torch.testing.assert_close(shares[q], layer_shares(layer_scores[:, q : q + 1, top])[0])


def test_layer_share_groups():
    layer_scores = torch.randn(7, 2, 30, generator=torch.Generator().manual_seed(2))
    shares = layer_shares(layer_scores)
    grouped = layer_shares(layer_scores, groups=3)  # blocks of 3, 2, 2 layers
    torch.testing.assert_close(grouped, torch.stack([shares[:, :3].sum(1), shares[:, 3:5].sum(1), shares[:, 5:].sum(1)], 1))
    explicit = layer_shares(layer_scores, groups=[[0, 6], [3]])
    torch.testing.assert_close(explicit.sum(1), torch.ones(2, dtype=torch.float64))
    assert layer_shares(layer_scores, groups=9).shape == (2, 7)  # at most one block per layer
    names = [f"h{i}" for i in range(7)]
    assert group_layer_names(names, 3) == ["h0..h2", "h3..h4", "h5..h6"]
    assert group_layer_names(names, [[0, 6], [3]]) == ["h0+h6", "h3"]
    with pytest.raises(ValueError):
        layer_shares(layer_scores, groups=[[0, 7]])
    with pytest.raises(ValueError):
        layer_shares(layer_scores[0])


def test_layer_shares_nan_for_query_without_influence():
    layer_scores = torch.zeros(2, 2, 10)
    layer_scores[0, 0] = 1.0
    shares = layer_shares(layer_scores)
    assert shares[0].tolist() == [1.0, 0.0] and torch.isnan(shares[1]).all()


# -- tokens ----------------------------------------------------------------------------------------


def test_token_distribution_by_hand():
    scores = torch.tensor([[0.0, 3.0, 0.0, 0.0], [1.0, -1.0, 1.0, 1.0], [1.0, -2.0, 5.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[True, True, True, True], [True, True, True, True], [True, True, False, False], [False] * 4])
    found = token_distribution(scores, mask)
    ratio = found["l2_l1_ratio"]
    assert ratio[0] == pytest.approx(1.0) and ratio[1] == pytest.approx(0.5)
    assert ratio[2] == pytest.approx(math.sqrt(5) / 3)  # the masked 5.0 is ignored
    assert math.isnan(ratio[3])
    assert found["spurious"].tolist() == [True, False, True, False]
    assert found["top_token"].tolist() == [1, 0, 1, -1]


def test_token_distribution_broadcasts_a_per_example_mask():
    scores = torch.randn(3, 5, 6)
    mask = torch.rand(5, 6) > 0.3
    found = token_distribution(scores, mask)
    assert found["l2_l1_ratio"].shape == (3, 5)
    masked = scores * mask
    torch.testing.assert_close(found["l2_l1_ratio"][1, 2], (masked[1, 2].norm() / masked[1, 2].abs().sum()).double())


# -- summary ---------------------------------------------------------------------------------------


def heavy_tailed_result(n_query=4, n_train=800, seed=0):
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(n_query, n_train, generator=g) ** 3
    layer_scores = torch.stack([0.25 * scores, 0.75 * scores])
    tokens = torch.randn(n_query, n_train, 5, generator=g)
    return InfluenceResult(
        scores=scores,
        layer_names=["block.0", "block.1"],
        layer_scores=layer_scores,
        token_scores=tokens,
        token_mask=torch.ones(n_train, 5, dtype=torch.bool),
        step=7,
    )


def test_summarize_scalars():
    result = heavy_tailed_result()
    summary = summarize(result)
    scalars = summary.scalars
    fits = fit_query_tails(result.scores)
    assert scalars["tail_alpha"] == pytest.approx(float(np.median([f.alpha for f in fits])))
    abs_fits = fit_query_tails(result.scores, use="abs")
    assert scalars["tail_alpha_abs"] == pytest.approx(float(np.median([f.alpha for f in abs_fits])))
    assert scalars["layer_share/block.0"] == pytest.approx(0.25) and scalars["layer_share/block.1"] == pytest.approx(0.75)
    assert scalars["gini"] == pytest.approx(concentration(result.scores)["gini"])
    assert scalars["score_abs_mean"] == pytest.approx(result.scores.abs().mean().item(), rel=1e-5)
    ratio = token_distribution(result.token_scores)["l2_l1_ratio"]
    assert scalars["spurious_fraction"] == pytest.approx((ratio > 2 / 3).double().mean().item())
    assert len(summary.tail_fits) == 4 and summary.layer_shares.shape == (4, 2)
    assert all(not name.startswith("influence/") for name in scalars)
    json.dumps(summary.to_dict(), allow_nan=False)


def test_summarize_uses_top_k_token_scores_and_bootstrap():
    result = heavy_tailed_result(n_query=2, n_train=300)
    top = InfluenceResult(scores=result.scores, top_token_scores=torch.tensor([[[1.0, 0.0, 0.0], [1.0, 1.0, 1.0]]] * 2))
    summary = summarize(top, bootstrap=5)
    assert summary.scalars["spurious_fraction"] == pytest.approx(0.5)
    assert 0.0 <= summary.scalars["tail_p_value"] <= 1.0
    assert summary.layer_shares is None and not any(k.startswith("layer_share") for k in summary.scalars)


@pytest.mark.parametrize(
    "scores",
    [torch.zeros(3, 40), torch.full((3, 40), float("nan")), -torch.rand(3, 40), torch.rand(3, 5)],
    ids=["zeros", "nan", "negative", "too-few"],
)
def test_summarize_never_raises_on_degenerate_scores(scores):
    summary = summarize(InfluenceResult(scores=scores, layer_names=["a"], layer_scores=scores[None]))
    assert "tail_alpha" not in summary.scalars
    assert all(math.isfinite(v) for v in summary.scalars.values())
    json.dumps(summary.to_dict(), allow_nan=False)
