"""Fresh curvature at a checkpoint: the staleness of training-time covariances, and the refit of
stale layers from the correction pass (``curvature.refresh``)."""

from __future__ import annotations


import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Subset, TensorDataset

import lightning_influence as li
from lightning_influence.engine import freshness
from lightning_influence.engine.curvature_passes import accumulate_covariances, accumulate_eigenvalue_correction
from lightning_influence.engine.statistics import CovarianceStatistics
from lightning_influence.checkpoint.session import InfluenceSession
from lightning_influence.loops import shared
from tests.callback_models import make_module_class, planted_data
from tests.tiny_models import classification_data, mlp


def _random_rotation(d: int, seed: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return q


def test_staleness_is_zero_in_the_covariances_own_basis_and_large_in_an_unrelated_one():
    spectrum = torch.tensor([9.0, 4.0, 1.0, 0.5, 0.1], dtype=torch.float64)
    rotation = _random_rotation(5, 0)
    covariance = rotation @ torch.diag(spectrum) @ rotation.T
    fresh = {"a_sum": covariance * 7, "s_sum": covariance * 3}  # sums: the scale does not matter
    own = {"q_a": rotation, "q_s": rotation}
    unrelated = {"q_a": _random_rotation(5, 1), "q_s": _random_rotation(5, 2)}
    assert freshness.layer_staleness(own, fresh) == pytest.approx(0.0, abs=1e-12)
    assert freshness.layer_staleness(unrelated, fresh) > 0.3
    # A basis right on one side only: the off-diagonal energy of that side's factor alone.
    half = {"q_a": rotation, "q_s": unrelated["q_s"]}
    assert freshness.layer_staleness(half, fresh) == pytest.approx(
        1 - freshness.diagonal_energy(unrelated["q_s"], covariance), rel=1e-9)
    assert freshness.diagonal_energy(rotation, torch.zeros(5, 5)) == 1.0


def _data(n: int, seed: int = 0) -> TensorDataset:
    """Inputs with distinct variances per direction: an eigenbasis worth keeping (an isotropic
    covariance has none, and any basis is as good as another)."""
    x, y = classification_data(n, seed=seed).tensors
    return TensorDataset(x * torch.tensor([3.0, 2.0, 1.5, 1.0, 0.5, 0.25], dtype=x.dtype), y)


def _covariances(model, data, seed: int = 0, noise: float = 0.0) -> CovarianceStatistics:
    """Covariances of ``data`` at ``model``'s weights, optionally perturbed into another model's."""
    layers = li.select_layers(model)
    stats = accumulate_covariances(model, li.ClassificationTask(), data, layers, fisher="empirical", batch_size=12,
                                   dtype=torch.float64)  # float64 sums: halves and one sum agree to round-off
    generator = torch.Generator().manual_seed(seed)
    for parts in stats.state.values():
        for key in ("a_sum", "s_sum"):
            other = torch.randn(parts[key].shape, generator=generator)
            parts[key] += noise * (other @ other.T) * parts[key].diagonal().mean()
    return stats


def _same_factors(a: li.Factors, b: li.Factors, names) -> None:
    for name in names:
        for key in ("q_a", "q_s", "eigenvalues"):
            left, right = a.layers[name][key].double(), b.layers[name][key].double()
            if key.startswith("q_"):  # eigenvectors are defined up to sign
                left, right = left.abs(), right.abs()
            torch.testing.assert_close(left, right, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("strategy", ["ekfac", "kfac"])
def test_always_refreshing_is_a_refit_on_the_correction_examples(strategy):
    """However stale the training statistics, ``refresh="always"`` gives exactly the factors
    ``fit_factors`` fits from scratch on the same examples at the same weights."""
    torch.manual_seed(0)
    model, data = mlp(), classification_data(48)
    task = li.ClassificationTask()
    stale = _covariances(model, data, noise=5.0)
    refreshed = li.fit_factors(model, task, data, strategy, "empirical", covariances=stale, refresh="always",
                               batch_size=12, dtype=torch.float64)
    refit = li.fit_factors(model, task, data, strategy, "empirical", batch_size=12, dtype=torch.float64)
    names = refit.layer_names
    if strategy == "kfac":
        for name in names:
            for key in ("eig_a", "eig_s"):
                torch.testing.assert_close(refreshed.layers[name][key], refit.layers[name][key])
    else:
        _same_factors(refreshed, refit, names)
    report = refreshed.meta["curvature"]
    assert report["refreshed_layers"] == names and report["refreshed_fraction"] == 1.0
    assert report["staleness"] > report["fresh_staleness"] and report["refresh"] == "always"
    assert refreshed.meta["tokens_seen"] == refit.meta["tokens_seen"]


def test_fresh_statistics_are_kept_and_stale_ones_refreshed_by_auto():
    """Statistics gathered at the scored weights (on other examples of the same data) are kept by
    ``"auto"``; statistics of another model are replaced, giving the refit's factors."""
    torch.manual_seed(0)
    model, data = mlp(), _data(96)
    task = li.ClassificationTask()
    current = _covariances(model, _data(480, seed=3))
    kept = li.fit_factors(model, task, data, "ekfac", "empirical", covariances=current, refresh="auto", batch_size=12, dtype=torch.float64)
    report = kept.meta["curvature"]
    assert report["refreshed_layers"] == [] and report["staleness"] <= report["fresh_staleness"]
    never = li.fit_factors(model, task, data, "ekfac", "empirical", covariances=current, refresh="never", batch_size=12, dtype=torch.float64)
    _same_factors(kept, never, kept.layer_names)
    assert never.meta["curvature"]["per_layer"] == report["per_layer"]  # measured all the same
    stale = li.fit_factors(model, task, data, "ekfac", "empirical", covariances=_covariances(model, data, noise=5.0),
                           refresh="auto", batch_size=12, dtype=torch.float64)
    assert stale.meta["curvature"]["refreshed_layers"] == stale.layer_names
    _same_factors(stale, li.fit_factors(model, task, data, "ekfac", "empirical", batch_size=12, dtype=torch.float64), stale.layer_names)


def test_only_the_stale_layers_are_refreshed():
    """One layer's statistics are of the scored weights, the other's of another model: ``"auto"``
    refits the second only, whose factors then equal the refit's; the first keeps its basis."""
    torch.manual_seed(0)
    model, data = mlp(), _data(96)
    task = li.ClassificationTask()
    mixed = _covariances(model, _data(480, seed=3))
    first, second = list(mixed.state)
    mixed.state[second] = _covariances(model, data, noise=5.0).state[second]
    factors = li.fit_factors(model, task, data, "ekfac", "empirical", covariances=mixed, refresh="auto", batch_size=12, dtype=torch.float64)
    report = factors.meta["curvature"]
    assert report["refreshed_layers"] == [second] and report["refreshed_fraction"] == 0.5
    refit = li.fit_factors(model, task, data, "ekfac", "empirical", batch_size=12, dtype=torch.float64)
    _same_factors(factors, refit, [second])
    kept_basis = li.fit_factors(model, task, data, "ekfac", "empirical", covariances=mixed, refresh="never",
                                batch_size=12, dtype=torch.float64)
    _same_factors(factors, kept_basis, [first])


def test_a_single_correction_example_cannot_show_staleness_and_keeps_the_statistics():
    """The halves are alternate examples: one example leaves the second half empty, and nothing
    shows that the training statistics are staler than fresh ones."""
    torch.manual_seed(0)
    model, data = mlp(), _data(1)
    stale = _covariances(model, _data(48), noise=5.0)
    factors = li.fit_factors(model, li.ClassificationTask(), data, "ekfac", "empirical", covariances=stale,
                             refresh="auto", batch_size=12, dtype=torch.float64)
    report = factors.meta["curvature"]
    assert report["refreshed_layers"] == [] and report["fresh_staleness"] is None and report["staleness"] > 0


def test_the_halves_are_the_same_examples_however_the_data_is_batched():
    """Alternate examples, not alternate batches: the fresh halves (and so the decision) do not
    depend on the batch size, nor on how the correction examples are split between processes."""
    torch.manual_seed(0)
    model, data = mlp(), _data(40)
    layers = li.select_layers(model)
    halves = {}
    for batch_size in (8, 5):
        into = [CovarianceStatistics(layers, dtype=torch.float64) for _ in range(2)]
        accumulate_eigenvalue_correction(model, li.ClassificationTask(), data, layers, None,
                                         fisher="empirical", batch_size=batch_size, dtype=torch.float64,
                                         covariances_into=into)
        halves[batch_size] = into
    shares = [CovarianceStatistics(layers, dtype=torch.float64) for _ in range(2)]
    for start, stop in ((0, 15), (15, 40)):  # two processes' shares, 15 and 25 examples
        accumulate_eigenvalue_correction(model, li.ClassificationTask(), Subset(data, range(start, stop)),
                                         layers, None, fisher="empirical", batch_size=8,
                                         dtype=torch.float64, covariances_into=shares, first_example=start)
    for one, other in ((halves[8], halves[5]), (halves[8], shares)):
        for a, b in zip(one, other):
            for name in a.state:
                for key, value in a.state[name].items():
                    torch.testing.assert_close(value, b.state[name][key])
    assert float(halves[8][0].state["0"]["s_count"]) == float(halves[8][1].state["0"]["s_count"]) == 20


def _fit_with_callback(tmp_path, refresh: str, lr: float = 0.5):
    torch.manual_seed(0)
    train, val, _ = planted_data()
    module = make_module_class(pl)(lr=lr)
    callback = li.InfluenceCallback(task="classification", query_data=Subset(val, range(4)), train_data=train,
                                    every_n_epochs=None, on_train_end=True, output_dir=str(tmp_path / "influence"),
                                    curvature=dict(collect_every_n_steps=1, correction_batches=2, refresh=refresh),
                                    scoring=dict(batch_size=16, top_k=2), report=dict(mode="off", show_progress=False))
    trainer = pl.Trainer(max_epochs=3, callbacks=[callback], logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, DataLoader(train, batch_size=8, shuffle=True), DataLoader(val, batch_size=8))
    return module, callback, train, Subset(val, range(4))


def test_the_callbacks_result_when_always_refreshing_equals_a_refit_at_its_weights(tmp_path):
    """The callback refreshes at the checkpoint from its own correction examples: its scores are
    those of EK-FAC fitted from scratch on those examples at the final weights."""
    module, callback, train, queries = _fit_with_callback(tmp_path, "always")
    (result,) = callback.results
    session = InfluenceSession(li.ClassificationTask(), train, queries, curvature=dict(correction_batches=2),
                               scoring=dict(batch_size=16))
    correction = Subset(train, session.correction_ids().tolist())
    refit = li.fit_factors(module, li.ClassificationTask(), correction, "ekfac", "empirical", batch_size=16)
    expected = li.compute_influence(module, li.ClassificationTask(), train, queries, factors=refit, batch_size=16)
    torch.testing.assert_close(result.scores, expected.scores, rtol=1e-4, atol=1e-4 * float(expected.scores.abs().max()))
    curvature = result.meta["curvature"]
    assert curvature["refreshed_layers"] == refit.layer_names and 0 < curvature["staleness"] <= 1
    assert li.analysis.summarize(result).scalars["curvature_staleness"] == pytest.approx(curvature["staleness"])


def test_stale_statistics_used_without_refresh_are_warned_about(tmp_path, monkeypatch):
    monkeypatch.setattr(shared, "STALE_WARNING_GAP", -1.0)  # any measured gap is "large" here
    with pytest.warns(RuntimeWarning, match="stale.*refresh='auto'"):
        _, callback, _, _ = _fit_with_callback(tmp_path, "never")
    assert callback.results[0].meta["curvature"]["refreshed_layers"] == []


@pytest.mark.parametrize("value", ["sometimes", None, 0.2])
def test_an_unknown_curvature_refresh_is_refused(value):
    with pytest.raises(ValueError, match="curvature.refresh"):
        li.InfluenceCallback(task="classification", curvature={"refresh": value})
