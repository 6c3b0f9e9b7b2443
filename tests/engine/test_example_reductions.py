"""Per-example gradient reductions (the EK-FAC correction's squared sums, self-influence's quadratic
form, the pool's contraction with dense queries) formed block by block on the CPU must equal the
batched formulas up to float32 round-off."""
from types import SimpleNamespace

import pytest
import torch

from lightning_influence.engine import example_gradients as example_gradients_module
from lightning_influence.engine import scoring
from lightning_influence.engine.example_gradients import per_example_gradients, squared_example_gradients
from lightning_influence.engine.factors import Factors
from lightning_influence.engine.queries import PreconditionedQueries


def _random_tokens(examples, tokens, d_in, d_out, seed=0):
    generator = torch.Generator().manual_seed(seed)
    acts = torch.randn(examples, tokens, d_in, generator=generator)
    grads = torch.randn(examples, tokens, d_out, generator=generator)
    return acts, grads


def _orthogonal(size, generator):
    return torch.linalg.qr(torch.randn(size, size, generator=generator, dtype=torch.float64))[0]


def _factors(strategy, d_in, d_out, seed=1):
    generator = torch.Generator().manual_seed(seed)
    eigenvalues = torch.rand(d_out, d_in, generator=generator, dtype=torch.float64) ** 3
    parts = {}
    if strategy in ("ekfac", "kfac"):
        parts.update(q_a=_orthogonal(d_in, generator), q_s=_orthogonal(d_out, generator))
    if strategy == "kfac":
        parts.update(eig_a=torch.rand(d_in, generator=generator, dtype=torch.float64),
                     eig_s=torch.rand(d_out, generator=generator, dtype=torch.float64))
    elif strategy != "identity":
        parts["eigenvalues"] = eigenvalues
    return Factors(strategy, {"layer": parts})


@pytest.fixture(params=["blockwise", "batched"])
def reduction(request, monkeypatch):
    """Small blocks (several per example) or the batched formula, whatever the layer's size."""
    if request.param == "blockwise":
        monkeypatch.setattr(example_gradients_module, "EXAMPLE_BLOCK_ELEMENTS", 7 * 96)
        monkeypatch.setattr(example_gradients_module, "BLOCKWISE_MIN_ELEMENTS", 1)
        monkeypatch.setattr(scoring, "BATCH_BLOCK_ELEMENTS", 3 * 7 * 96)
    else:
        monkeypatch.setattr(example_gradients_module, "BLOCKWISE_MIN_ELEMENTS", 2**62)
    return request.param


def test_squared_example_gradients_equal_the_float64_formula(reduction):
    acts, grads = _random_tokens(5, 9, 96, 80)
    expected = per_example_gradients(acts.double(), grads.double()).square().sum(0)
    got = squared_example_gradients(acts, grads)
    torch.testing.assert_close(got.double(), expected, rtol=2e-5, atol=1e-4 * float(expected.max()))
    assert example_gradients_module.blockwise(acts, grads) == (reduction == "blockwise")


@pytest.mark.parametrize("strategy", ["ekfac", "kfac", "diagonal", "identity"])
@pytest.mark.parametrize("tokens", [3, 200])  # few tokens: rotated first; many: the formed gradient is rotated
def test_quadratic_form_equals_the_gradient_dotted_with_its_preconditioned_self(reduction, strategy, tokens):
    acts, grads = _random_tokens(4, tokens, 24, 40)
    factors = _factors(strategy, 24, 40)
    damping = 0.05
    gradients = per_example_gradients(acts.double(), grads.double())
    expected = (gradients * factors.precondition("layer", gradients, damping)).sum((1, 2))
    got = factors.example_quadratic_form("layer", acts, grads, damping)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, expected, rtol=3e-5, atol=0.0)
    if factors.has_eigenbasis:
        assert factors.rotates_tokens("layer", tokens) == (tokens == 3)


@pytest.mark.parametrize("storage", ["contiguous", "transposed"])
def test_pool_contraction_with_dense_queries_equals_the_float64_formula(reduction, storage):
    acts, grads = _random_tokens(5, 9, 96, 80)
    queries = torch.randn(6, 80, 96, generator=torch.Generator().manual_seed(2))
    expected = queries.double().flatten(1) @ per_example_gradients(acts.double(), grads.double()).flatten(1).T
    if storage == "transposed":  # as query preparation keeps them: [Q, d_out, d_in] viewing [Q, d_in, d_out]
        queries = queries.transpose(1, 2).contiguous().transpose(1, 2)
    prepared = PreconditionedQueries({"layer": queries})
    got = scoring.contract(prepared, SimpleNamespace(name="layer"), acts, grads, per_token=False)
    assert prepared.rows_transposed("layer") == (storage == "transposed")
    assert prepared.layout("layer", "rows", torch.float32).data_ptr() == queries.data_ptr()  # a view, no copy
    assert got.shape == (6, 5)
    torch.testing.assert_close(got.double(), expected, rtol=2e-5, atol=2e-5 * float(expected.abs().max()))


@pytest.mark.parametrize("tokens", [3, 200])  # few tokens: rotated first (stored transposed); many: formed, rotated
def test_preconditioned_queries_stored_transposed_equal_the_float64_preconditioning(tokens):
    acts, grads = _random_tokens(4, tokens, 24, 40)
    factors = _factors("ekfac", 24, 40)
    damping = 0.05
    expected = factors.precondition("layer", per_example_gradients(acts.double(), grads.double()), damping)
    rotated = factors.example_gradients_in_eigenbasis("layer", acts, grads, torch.float32, transposed=True)
    assert example_gradients_module.stored_transposed(rotated) == (tokens == 3)
    got = factors.rotate_from_eigenbasis("layer", factors.precondition_in_eigenbasis("layer", rotated, damping,
                                                                                     in_place=True))
    assert example_gradients_module.stored_transposed(got) == (tokens == 3)
    torch.testing.assert_close(got.double(), expected, rtol=0.0, atol=2e-5 * float(expected.abs().max()))
