"""Every strategy against the dense damped Gauss-Newton influence on tiny models (fisher="exact",
the same per-layer damping on the dense block-diagonal matrix)."""

import pytest
import torch
from torch import nn
from torch.utils.data import Subset

import lightning_influence as li
from lightning_influence.engine.oracle import dense_influence, factor_block, gauss_newton_blocks
from lightning_influence.engine.tracking import layers_by_name
from tests.tiny_models import (
    TinyConvNet,
    TinyTransformer,
    TokenData,
    classification_data,
    image_data,
    mlp,
    regression_data,
)


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.flatten().double(), b.flatten().double()
    a, b = a - a.mean(), b - b.mean()
    return float((a @ b) / (a.norm() * b.norm()))


def oracle_for(model, task, train, queries, factors, damping=None):
    lambdas = {name: factors.damping(name, damping) for name in factors.layer_names}
    return dense_influence(model, task, train, queries, factors.layer_names, lambdas)


@pytest.mark.parametrize("strategy", ["kfac", "ekfac"])
def test_linear_regression_is_exact(strategy):
    """A linear model with squared error: A ⊗ S is the Gauss-Newton exactly, so scores must match."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3)).double()
    task = li.RegressionTask()
    data = regression_data()
    factors = li.fit_factors(model, task, data, strategy=strategy, fisher="exact", batch_size=16,
                             dtype=torch.float64)
    oracle = oracle_for(model, task, data, Subset(data, range(5)), factors)
    torch.testing.assert_close(factor_block(factors, "0"), oracle.blocks["0"], rtol=1e-9, atol=1e-10)
    result = li.compute_influence(model, task, data, Subset(data, range(5)), factors=factors, per_layer=True)
    torch.testing.assert_close(result.scores.double(), oracle.scores, rtol=1e-6, atol=1e-6)
    # Absolute damping too, and a damping the oracle did not use must NOT match (the test can fail).
    result = li.compute_influence(model, task, data, Subset(data, range(5)), factors=factors, damping=0.3)
    torch.testing.assert_close(result.scores.double(), oracle_for(model, task, data, Subset(data, range(5)),
                                                                  factors, 0.3).scores, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(result.scores.double(), oracle.scores, rtol=1e-3)


CASES = {
    # measured: ekfac 0.991 / 0.972 / 0.980, identity 0.82 / 0.74 / 0.90
    "mlp": lambda: (mlp(), li.ClassificationTask(), classification_data(), 0.97),
    "conv": lambda: (TinyConvNet().double(), li.ClassificationTask(), image_data(), 0.93),
    "transformer": lambda: (TinyTransformer().double(), li.CausalLMTask(), TokenData(n=10, length=5), 0.93),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_scores_track_the_dense_oracle(case):
    torch.manual_seed(0)
    model, task, data, margin = CASES[case]()
    queries = Subset(data, range(4))
    ekfac = li.fit_factors(model, task, data, strategy="ekfac", fisher="exact", batch_size=8)
    lambdas = {name: ekfac.damping(name) for name in ekfac.layer_names}  # the same λ_ℓ for every strategy
    oracle = dense_influence(model, task, data, queries, ekfac.layer_names, lambdas)
    correlations = {}
    for strategy in ("ekfac", "kfac", "diagonal", "identity"):
        factors = ekfac if strategy == "ekfac" else li.fit_factors(
            model, task, data, strategy=strategy, fisher="exact", batch_size=8)
        result = li.compute_influence(model, task, data, queries, factors=factors, damping=lambdas, batch_size=8)
        correlations[strategy] = pearson(result.scores, oracle.scores)
    assert correlations["ekfac"] > margin, correlations
    assert correlations["ekfac"] > correlations["identity"], correlations
    assert correlations["kfac"] > correlations["identity"] - 0.05, correlations


@pytest.mark.parametrize("case", sorted(CASES))
def test_ekfac_block_closer_than_kfac(case):
    """EK-FAC's eigenvalue correction minimises the Frobenius error within K-FAC's eigenbasis."""
    torch.manual_seed(0)
    model, task, data, _ = CASES[case]()
    ekfac = li.fit_factors(model, task, data, strategy="ekfac", fisher="exact", batch_size=8)
    kfac = li.fit_factors(model, task, data, strategy="kfac", fisher="exact", batch_size=8)
    blocks = gauss_newton_blocks(model, task, data, layers_by_name(model, ekfac.layer_names))
    for name, dense in blocks.items():
        error_ekfac = torch.linalg.norm(factor_block(ekfac, name) - dense)
        error_kfac = torch.linalg.norm(factor_block(kfac, name) - dense)
        assert error_ekfac <= error_kfac * (1 + 1e-9), (name, float(error_ekfac), float(error_kfac))
        # and the approximation is informative: better than no curvature at all
        assert error_ekfac < torch.linalg.norm(dense), name


def test_diagonal_block_matches_dense_diagonal():
    model, task, data = mlp(), li.ClassificationTask(), classification_data()
    factors = li.fit_factors(model, task, data, strategy="diagonal", fisher="exact", batch_size=16,
                             dtype=torch.float64)
    blocks = gauss_newton_blocks(model, task, data, layers_by_name(model, factors.layer_names))
    for name, dense in blocks.items():
        torch.testing.assert_close(factors.eigenvalues(name).reshape(-1), torch.diagonal(dense), rtol=1e-8, atol=1e-10)


def test_true_fisher_converges_to_exact():
    """Sampled targets average to the Gauss-Newton: many samples bring the S factor close."""
    torch.manual_seed(0)
    model, task, data = mlp(), li.ClassificationTask(), classification_data()
    exact = li.fit_factors(model, task, data, strategy="kfac", fisher="exact", batch_size=48)
    sampled = li.fit_factors(model, task, data, strategy="kfac", fisher="true", num_samples=400, batch_size=48)
    empirical = li.fit_factors(model, task, data, strategy="kfac", fisher="empirical", batch_size=48)
    for name in exact.layer_names:
        def s_matrix(f):
            parts = f.layers[name]
            return parts["q_s"] @ torch.diag(parts["eig_s"]) @ parts["q_s"].T
        target = s_matrix(exact)
        error_true = torch.linalg.norm(s_matrix(sampled) - target) / torch.linalg.norm(target)
        error_empirical = torch.linalg.norm(s_matrix(empirical) - target) / torch.linalg.norm(target)
        assert error_true < 0.12, (name, float(error_true))
        assert error_true < error_empirical, (name, float(error_true), float(error_empirical))
