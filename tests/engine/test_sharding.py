"""Curvature sharded across processes (``shard_factors=True``): gloo process groups of 2 and 4 CPU
processes give the statistics, factors and scores of one process that saw every batch, each rank
holding about ``1/world`` of the factors; sharded factors saved by 4 processes load on 1 and on 2.
Also the memory levers of a single process: ``statistics_device`` and ``eigenbasis_dtype``."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lightning_influence as li
from lightning_influence.engine import distributed
from lightning_influence.engine.factors import Factors
from tests import sharding_helpers as helpers
from tests.ddp_script import main as train_planted


@pytest.fixture(scope="module")
def reference():
    """One process that saw every batch (the sums the sharded runs must reproduce)."""
    model, train, queries = helpers.model_and_data()
    statistics = helpers.collect(model, train)
    run = helpers.session(train, queries, curvature=dict(fisher="empirical"))
    stats = run.reduce_statistics(statistics)
    factors = run.fit_factors(model, stats, step=3)
    return {"model": model, "train": train, "queries": queries, "stats": stats, "factors": factors,
            "result": run.score(model, factors, step=3)}


def _close(actual, expected, **tolerance):
    """Scores reach ~130 here: float32 sums added in another order differ by ~1e-4 of that."""
    torch.testing.assert_close(actual, expected, **({"rtol": 1e-3, "atol": 1e-3} | tolerance))


def _check_against_reference(ranks, reference, world):
    """Scores equal the single process's; each layer's statistics and factors live on exactly one
    rank and equal the single process's; per-rank factor bytes are about 1/world of the total."""
    single = reference["factors"]
    held = {}
    for rank, saved in enumerate(ranks):
        sharded = saved["empirical_sharded"]
        _close(sharded["scores"], reference["result"].scores)
        assert torch.equal(sharded["top_ids"], reference["result"].get("top_ids"))
        for key, value in sharded["stats"].items():
            _close(value, reference["stats"].state[key.rpartition("/")[0]][key.rpartition("/")[2]])
        for name, parts in sharded["factors"].items():
            assert name not in held, f"{name} held by ranks {held[name]} and {rank}"
            held[name] = rank
            # sorted: float32 sums added in another order turn near-degenerate eigenvectors, not the spectrum
            _close(parts["eigenvalues"].flatten().sort().values,
                   single.layers[name]["eigenvalues"].flatten().sort().values, rtol=1e-3, atol=1e-8)
    assert sorted(held) == sorted(single.layer_names)
    total = single.held_bytes()
    largest = max(sum(t.numel() * t.element_size() for t in parts.values()) for parts in single.layers.values())
    per_rank = [saved["empirical_sharded"]["held_bytes"] for saved in ranks]
    assert sum(per_rank) == total
    assert max(per_rank) <= total / world + largest
    return per_rank, total


def test_two_processes_shard_the_curvature_and_score_as_one(tmp_path, reference):
    """Sharded: the single process's statistics, factors (eigenvalues; eigenvectors of near-degenerate
    eigenvalues are not comparable) and scores, half the factor bytes per rank; with sampled targets
    (fisher="true") the same scores as the unsharded run of the same process group (each share's
    correction keeps its rank's seed). Saved one file per owner, the factors load whole in one
    process and give the same scores."""
    ranks = helpers.spawn(helpers.fit_and_score, 2, tmp_path,
                          [("empirical", True), ("true", True), ("true", False)])
    per_rank, total = _check_against_reference(ranks, reference, world=2)
    assert max(per_rank) <= 0.55 * total  # measured 0.51 (layers of 873, 3 x 1801 and 741 elements)
    for saved in ranks:
        _close(saved["true_sharded"]["scores"], saved["true_replicated"]["scores"])
        assert not torch.allclose(saved["true_sharded"]["scores"], reference["result"].scores, rtol=1e-3)
        # the preconditioned queries broadcast from their owners, and the statistics reduced to them
        assert saved["true_sharded"]["traffic"]["received"] > 0
    files = sorted(p.name for p in (tmp_path / "step=3" / "factors").iterdir())
    assert files == ["meta.json", "shard-00000.safetensors", "shard-00001.safetensors"]
    loaded = li.load_factors(tmp_path / "step=3" / "factors")
    assert not loaded.is_sharded and sorted(loaded.layers) == sorted(reference["factors"].layer_names)
    rescored = li.compute_influence(reference["model"], li.ClassificationTask(), reference["train"],
                                    reference["queries"], factors=loaded, batch_size=helpers.BATCH)
    _close(rescored.scores, reference["result"].scores)
    assert li.load_results(tmp_path)[0].path.name == "step=3"  # a complete result, shards included


@pytest.fixture(scope="module")
def four(tmp_path_factory):
    path = tmp_path_factory.mktemp("four")
    return path, helpers.spawn(helpers.fit_and_score, 4, path, [("empirical", True)])


def test_four_processes_shard_the_curvature_and_their_factors_load_in_one(four, reference):
    path, ranks = four
    per_rank, total = _check_against_reference(ranks, reference, world=4)
    assert max(per_rank) <= 0.3 * total  # measured 0.26: one 1801-element layer on each of 3 ranks
    saved = path / "step=3" / "factors"
    assert len(list(saved.glob("shard-*.safetensors"))) == 4
    one = li.load_factors(saved)
    rescored = li.compute_influence(reference["model"], li.ClassificationTask(), reference["train"],
                                    reference["queries"], factors=one, batch_size=helpers.BATCH)
    _close(rescored.scores, reference["result"].scores)


def test_factors_saved_by_four_processes_load_sharded_on_two(four, reference, tmp_path):
    """Each of two processes reads only the layers it owns now, and the scores are the same."""
    two = helpers.spawn(helpers.load_and_score, 2, tmp_path, str(four[0] / "step=3" / "factors"))
    assert sorted(two[0]["held"] + two[1]["held"]) == sorted(reference["factors"].layer_names)
    assert not set(two[0]["held"]) & set(two[1]["held"])
    for rank in two:
        _close(rank["scores"], reference["result"].scores)


def test_ownership_is_balanced_by_size_and_the_same_everywhere():
    costs = {"a": 100, "b": 60, "c": 50, "d": 40, "e": 10}
    owners = distributed.assign_owners(costs, 2)
    load = [sum(c for n, c in costs.items() if owners[n] == r) for r in range(2)]
    assert owners == {"a": 0, "b": 1, "c": 1, "d": 0, "e": 1} and load == [140, 120]
    assert list(owners) == list(costs)  # in the layers' order
    assert distributed.assign_owners(costs, 2) == owners
    assert set(distributed.assign_owners(costs, 8).values()) == {0, 1, 2, 3, 4}


def test_statistics_on_the_cpu_equal_the_default(reference):
    """``statistics_device="cpu"`` through the collector and through fit_factors: the same sums and
    factors (on this CPU-only machine both live on the CPU; on a GPU each layer's product is computed
    there and crosses to the CPU sums)."""
    model, train = reference["model"], reference["train"]
    on_cpu = helpers.collect(model, train, statistics_device="cpu")
    assert on_cpu.statistics_device == torch.device("cpu")
    for name, parts in reference["stats"].state.items():
        for key, value in parts.items():
            assert on_cpu.stats.state[name][key].device.type == "cpu"
            _close(on_cpu.stats.state[name][key], value, rtol=0, atol=0)
    task = li.ClassificationTask()
    default = li.fit_factors(model, task, train, fisher="empirical", batch_size=helpers.BATCH)
    moved = li.fit_factors(model, task, train, fisher="empirical", batch_size=helpers.BATCH, statistics_device="cpu")
    for name, parts in default.layers.items():
        for key, value in parts.items():
            _close(moved.layers[name][key], value, rtol=0, atol=0)


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])  # measured 2.7e-7, 3.7e-3
def test_eigenbases_in_lower_precision_stay_within_tolerance_of_float64(reference, dtype, tolerance):
    """Bases stored in float32 / bfloat16 (the eigenvalue correction runs in the stored basis):
    scores within ``tolerance`` of the float64 bases', relative to the largest score."""
    model, train, queries = reference["model"], reference["train"], reference["queries"]
    task = li.ClassificationTask()
    exact = li.fit_factors(model, task, train, fisher="empirical", batch_size=helpers.BATCH)
    lowered = li.fit_factors(model, task, train, fisher="empirical", batch_size=helpers.BATCH, eigenbasis_dtype=dtype)
    assert all(parts["q_a"].dtype == dtype and parts["q_s"].dtype == dtype for parts in lowered.layers.values())
    assert lowered.held_bytes() < exact.held_bytes()
    scores = [li.compute_influence(model, task, train, queries, factors=f, batch_size=helpers.BATCH).scores
              for f in (exact, lowered)]
    error = float((scores[1] - scores[0]).abs().max() / scores[0].abs().max())
    assert error <= tolerance
    # float32 bases change nothing (scoring rotates float32 gradients in float32 anyway); bfloat16 does
    assert error == 0 if dtype == torch.float32 else error > 0


def test_sharded_factors_refuse_self_influence_other_strategies_and_plain_scoring():
    _, train, queries = helpers.model_and_data()
    with pytest.raises(ValueError, match="self_influence needs every layer's factors"):
        helpers.session(train, queries, curvature=dict(shard_factors=True), scoring=dict(self_influence=True))
    with pytest.raises(ValueError, match="curvature.shard_factors needs curvature.strategy 'ekfac' or 'kfac'"):
        helpers.session(train, queries, curvature=dict(shard_factors=True, strategy="diagonal"))
    elsewhere = Factors("ekfac", {}, owners={"x": 1}, summaries={"x": (1.0, 4, 0.5)})
    assert elsewhere.damping_per_layer() == {"x": 0.1}  # from the owner's summary alone
    model, train, queries = helpers.model_and_data()
    with pytest.raises(ValueError, match="sharded across processes"):
        li.compute_influence(model, li.ClassificationTask(), train, queries, factors=elsewhere)


def test_the_callback_under_ddp_with_sharded_factors_matches_one_process(tmp_path):
    """``InfluenceCallback(shard_factors=True)`` in a Lightning DDP run of 2 processes: the
    single process's scores and top examples, and the result's factors saved one file per owner."""
    script = Path(__file__).resolve().parents[1] / "ddp_script.py"
    run = subprocess.Popen([sys.executable, str(script), str(tmp_path / "ddp"), "ddp-sharded"],
                           env=dict(os.environ, PYTHONWARNINGS="ignore"), stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)
    train_planted(tmp_path / "single", "single")  # the reference, in this process meanwhile
    output, _ = run.communicate(timeout=300)
    assert run.returncode == 0, f"DDP run failed:\n{output[-4000:]}"
    single, ddp = (torch.load(tmp_path / mode / "summary.pt", weights_only=True) for mode in ("single", "ddp"))
    assert ddp["world_size"] == 2 and ddp["result_dirs"] == single["result_dirs"] == ["step=12"]
    _close(ddp["scores"], single["scores"])
    assert torch.equal(ddp["top_ids"], single["top_ids"])
    assert ddp["factor_files"] == ["meta.json", "shard-00000.safetensors", "shard-00001.safetensors"]
    assert single["factor_files"] == ["meta.json", "tensors.safetensors"]
    assert not list((tmp_path / "ddp" / "influence").glob(".*factor-shards"))  # staging removed
