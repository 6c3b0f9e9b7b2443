"""The curvature-approximation registry: the built-ins, and approximations defined here alone (one
file, one registration) working end to end through ``li.fit_factors`` and ``li.compute_influence``,
against the dense damped Gauss-Newton oracle or their closed form."""

import re
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import Subset

import lightning_influence as li
from lightning_influence.config import CurvatureConfig
from lightning_influence.engine.approximations import (
    CurvatureApproximation,
    approximation,
    approximation_names,
    register_approximation,
    unregister_approximation,
)
from lightning_influence.engine.oracle import dense_influence
from tests.tiny_models import classification_data, mlp, regression_data

BUILT_INS = ("ekfac", "kfac", "diagonal", "identity")
SCALE = 2.5


class PlainKFAC(CurvatureApproximation):
    """K-FAC from the covariances' eigendecomposition, preconditioning the formed gradient through
    the generic path (no eigenbasis declared: scoring does not rotate into it for this one)."""

    name = "test-plain-kfac"
    needs_covariances = True

    def layer_factors(self, layer, basis, corrected):
        assert corrected is None  # no correction pass was asked for
        return {key: basis[key] for key in ("q_a", "eig_a", "q_s", "eig_s")}

    def eigenvalues(self, parts):
        return torch.outer(parts["eig_s"], parts["eig_a"])

    def eigenvalue_mean(self, parts):
        return float(self.eigenvalues(parts).mean()), self.eigenvalues(parts).numel()

    def smallest_eigenvalue(self, parts):
        return float(self.eigenvalues(parts).min())

    def precondition(self, parts, grads, damping):
        q_s, q_a = parts["q_s"].to(grads.device, torch.float64), parts["q_a"].to(grads.device, torch.float64)
        rotated = q_s.T @ grads.double() @ q_a
        damped = self.eigenvalues(parts).to(grads.device) + damping
        return (q_s @ (rotated / damped) @ q_a.T).to(grads.dtype)

    def quadratic_form(self, parts, acts, grads, damping):
        gradients = torch.einsum("nto,nti->noi", grads, acts).double()
        return (gradients * self.precondition(parts, gradients, damping)).sum((1, 2))


class ScaledIdentity(CurvatureApproximation):
    """``G = SCALE · I``: no pass over the data; scores are the plain dot products over ``SCALE + λ``."""

    name = "test-scaled-identity"

    def layer_factors(self, layer, basis, corrected):
        assert basis is None and corrected is None
        return {"eigenvalues": torch.full((layer.d_out, layer.d_in), SCALE, dtype=torch.float64)}


@pytest.fixture
def registered():
    for cls in (PlainKFAC, ScaledIdentity):
        register_approximation(cls)
    yield
    for cls in (PlainKFAC, ScaledIdentity):
        unregister_approximation(cls.name)


def test_the_registry_lists_exactly_the_built_ins():
    assert approximation_names() == BUILT_INS
    capabilities = {name: (a.needs_covariances, a.needs_correction_pass, a.has_eigenbasis, a.can_shard, a.has_curvature)
                    for name in BUILT_INS for a in [approximation(name)]}
    assert capabilities == {"ekfac": (True, True, True, True, True), "kfac": (True, False, True, True, True),
                            "diagonal": (False, True, False, False, True),
                            "identity": (False, False, False, False, False)}
    with pytest.raises(ValueError, match="unknown strategy 'ekfca'; choose one of ekfac, kfac, diagonal, identity"):
        approximation("ekfca")
    with pytest.raises(TypeError):
        register_approximation(int)


def test_config_validation_uses_the_registry(registered):
    assert CurvatureConfig(strategy=ScaledIdentity.name).validate().strategy == ScaledIdentity.name
    unregister_approximation(ScaledIdentity.name)
    with pytest.raises(ValueError, match="curvature.strategy must be one of 'ekfac', 'kfac', 'diagonal', 'identity', "
                                         "'test-plain-kfac', got 'test-scaled-identity'"):
        CurvatureConfig(strategy=ScaledIdentity.name).validate()


def test_a_registered_kfac_variant_matches_the_dense_oracle_where_kfac_is_exact(registered, tmp_path):
    """A linear model with squared error: A ⊗ S is the Gauss-Newton exactly, so scores must match."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3)).double()
    task, data = li.RegressionTask(), regression_data()
    queries = Subset(data, range(5))
    factors = li.fit_factors(model, task, data, strategy=PlainKFAC.name, fisher="exact", batch_size=16,
                             dtype=torch.float64)
    assert factors.strategy == PlainKFAC.name and not factors.has_eigenbasis
    lambdas = factors.damping_per_layer()
    oracle = dense_influence(model, task, data, queries, factors.layer_names, lambdas)
    result = li.compute_influence(model, task, data, queries, factors=factors, per_layer=True)
    torch.testing.assert_close(result.scores.double(), oracle.scores, rtol=1e-6, atol=1e-6)
    assert result.meta["strategy"] == PlainKFAC.name
    # the same numbers as the built-in K-FAC (same damping heuristic), and a saved copy loads
    kfac = li.fit_factors(model, task, data, strategy="kfac", fisher="exact", batch_size=16, dtype=torch.float64)
    assert kfac.damping_per_layer() == pytest.approx(lambdas)
    reference = li.compute_influence(model, task, data, queries, factors=kfac)
    torch.testing.assert_close(result.scores, reference.scores, rtol=1e-6, atol=1e-8)
    factors.save(tmp_path / "factors")
    loaded = li.load_factors(tmp_path / "factors")
    assert loaded.approximation is approximation(PlainKFAC.name)
    again = li.compute_influence(model, task, data, queries, factors=loaded)
    torch.testing.assert_close(again.scores, result.scores)
    # self-influence through the approximation's quadratic form
    own = li.compute_self_influence(model, task, data, factors)
    torch.testing.assert_close(own.double(), oracle_self(model, task, data, factors.layer_names, lambdas),
                               rtol=1e-6, atol=1e-8)


def oracle_self(model, task, data, layer_names, lambdas):
    n = len(data)
    dense = dense_influence(model, task, data, data, layer_names, lambdas)
    # with the default measurement, query gradients are the training gradients: the diagonal is ∇ℓᵀ(G+λ)⁻¹∇ℓ
    return dense.scores.diagonal()[:n]


def test_a_registered_scaled_identity_has_its_closed_form(registered):
    torch.manual_seed(0)
    model, task, data = mlp(), li.ClassificationTask(), classification_data()
    queries = Subset(data, range(4))
    factors = li.fit_factors(model, task, data, strategy=ScaledIdentity.name, fisher="exact", batch_size=8)
    plain = li.fit_factors(model, task, data, strategy="identity", batch_size=8)
    assert factors.damping_per_layer() == pytest.approx({name: 0.1 * SCALE for name in factors.layer_names})
    dots = li.compute_influence(model, task, data, queries, factors=plain, per_layer=True)
    for damping in (None, 0.5):
        lam = 0.1 * SCALE if damping is None else damping
        got = li.compute_influence(model, task, data, queries, factors=factors, damping=damping, per_layer=True)
        torch.testing.assert_close(got.scores, dots.scores / (SCALE + lam), rtol=1e-5, atol=1e-7)
    own = li.compute_self_influence(model, task, data, factors, damping=0.5)
    torch.testing.assert_close(own, li.compute_self_influence(model, task, data, plain) / (SCALE + 0.5),
                               rtol=1e-5, atol=1e-7)


def test_an_approximation_that_cannot_shard_is_refused_for_sharded_factors(registered):
    from lightning_influence.engine import sharding

    with pytest.raises(ValueError, match="shard_factors needs strategy 'ekfac' or 'kfac', got 'test-plain-kfac'"):
        sharding.check_can_shard(PlainKFAC.name, "shard_factors needs")


STRATEGY_COMPARISON = re.compile(
    r"""(==|!=|\bin|\bnot in)\s*\(?\s*["'](ekfac|kfac|diagonal|identity)["']"""
    r"""|["'](ekfac|kfac|diagonal|identity)["']\s*(==|!=)""")


def test_strategy_names_are_compared_almost_nowhere_outside_the_registry():
    package = Path(li.__file__).parent
    found = [f"{path.relative_to(package)}:{number}"
             for path in package.rglob("*.py") if path.name != "approximations.py"
             for number, line in enumerate(path.read_text().splitlines(), 1) if STRATEGY_COMPARISON.search(line)]
    assert len(found) <= 5, found
