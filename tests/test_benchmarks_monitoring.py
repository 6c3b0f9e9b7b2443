"""The monitoring benchmarks (per-step ledger on the digits LDS, trajectory on the arithmetic LM)
still run (``--quick``) and their ground truth is what they claim."""

import json
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("sklearn")
pytest.importorskip("pytorch_lightning")
BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import ledger_lds  # noqa: E402
import trajectory_lm  # noqa: E402


def run(script, tmp_path):
    out_json, out_md = tmp_path / "out.json", tmp_path / "out.md"
    script.main(["--quick", "--json", str(out_json), "--markdown", str(out_md)])
    assert out_md.read_text().startswith("## ")
    return json.loads(out_json.read_text())


def test_ledger_lds_quick_compares_ledger_checkpoint_and_trajectory(tmp_path):
    payload = run(ledger_lds, tmp_path)
    methods = payload["methods"]
    assert payload["coverage"]["curvature.collect_every_n_steps=1"] == 1.0
    assert {"final checkpoint", "ledger"} <= {name.split(" | ")[0] for name in methods}
    assert all(-1 <= m["lds"] <= 1 and m["ci"][0] <= m["lds"] <= m["ci"][1] for m in methods.values())
    assert all("minus_final" in m for name, m in methods.items() if not name.startswith("final"))


def test_planted_near_duplicates_are_the_relevant_examples_of_their_query():
    train, queries, relevant = trajectory_lm.corpus(dict(train_size=80, queries=5, copies=2), seed=0)
    query_texts = {p.text for p in queries.problems}
    for query, members in zip(queries.problems, relevant):
        assert len(members) >= 2
        for index in members:
            problem = train.problems[index]
            assert trajectory_lm.key(problem) == trajectory_lm.key(query) and problem.answer == query.answer
            assert problem.text not in query_texts
    assert len({p.text for p in train.problems}) == len(train) == 80


def test_average_precision_of_a_ranking():
    scores = torch.tensor([[3.0, 2.0, 1.0, 0.0], [3.0, 2.0, 1.0, 0.0]])
    values = trajectory_lm.average_precision(scores, [[0, 2], [3]])
    torch.testing.assert_close(values, torch.tensor([(1 + 2 / 3) / 2, 1 / 4], dtype=torch.float64))


def test_trajectory_lm_quick(tmp_path):
    payload = run(trajectory_lm, tmp_path)
    methods = payload["methods"]
    low, high = payload["removal_effect"]["ci"]
    assert low <= payload["removal_effect"]["nats"] <= high
    assert "final checkpoint" in methods and any(name.startswith("trajectory") for name in methods)
    assert all(0 <= m["average_precision"] <= 1 for m in methods.values())
