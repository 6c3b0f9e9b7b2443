"""One analysis of a run (compare.RunAnalysis), shared by the publisher, the HTML report and the CLI;
run identity checks; the one number formatter."""

import importlib
import json
import math
import os

import numpy as np
import pytest
import torch

from lightning_influence._format import format_number
from lightning_influence.cli import main
from lightning_influence.analysis.compare import RunAnalysis, compare, trajectory
from lightning_influence.reporting import ResultPublisher
from lightning_influence.reporting.html import write_html_report
from lightning_influence.reporting.publisher import REPORT_DIR, SUMMARY_FILE
from lightning_influence.results import InfluenceResult, check_same_run

from tests.reporting_helpers import make_result

compare_module = importlib.import_module("lightning_influence.analysis.compare")  # li.compare is the function
distribution_module = importlib.import_module("lightning_influence.analysis.distribution")


def run_result(step, run_id, pool_size, *, path=None, seed=None):
    """A result stamped with the run identity the callback writes into ``meta["run"]``."""
    result = make_result(step, seed=step if seed is None else seed, tokens=False)
    result.meta["run"] = {"id": run_id, "pool_size": pool_size, "pool_fingerprint": f"fp-{run_id}",
                          "model": "TinyLM", "task": "CausalLMTask", "config": {}}
    if path is not None:
        result.save(path)
    return result


@pytest.fixture
def tail_fits(monkeypatch):
    """Counts the per-checkpoint tail fits (the expensive part of a trajectory row)."""
    calls = []
    real = distribution_module.fit_query_tails
    monkeypatch.setattr(distribution_module, "fit_query_tails", lambda scores: calls.append(1) or real(scores))
    return calls


# -- the run analysis ------------------------------------------------------------------------------


def test_run_analysis_analyses_only_the_new_result(tail_fits, monkeypatch):
    results = [make_result(step, seed=step) for step in (10, 20, 30)]
    summaries = []
    real_summarize = compare_module.summarize
    monkeypatch.setattr(compare_module, "summarize", lambda r: summaries.append(r.step) or real_summarize(r))
    run = RunAnalysis(k=4)
    for count, result in enumerate(results, 1):
        analysis = run.add(result)
        assert len(tail_fits) == count  # one new row per result, earlier rows are kept
    assert analysis.result is results[-1] and analysis.previous is results[1] and len(run) == 3
    assert summaries == []  # nothing summarised until asked
    assert analysis.summary is analysis.summary and summaries == [30]
    expected = trajectory(results, k=4)
    assert analysis.trajectory == expected == run.trajectory()
    assert expected["step"] == [10, 20, 30] and expected["topk_churn@4"][0] is None
    assert analysis.summary.scalars["tail_alpha"] == pytest.approx(expected["tail_alpha"][-1])
    reference = compare(results[1], results[2], top_k_changes=4)
    assert analysis.comparison.steps == (20, 30)
    assert analysis.comparison.entered == reference.entered and analysis.comparison.left == reference.left
    first = RunAnalysis().add(results[0])
    assert first.trajectory is None and first.comparison is None and first.previous is None


def test_trajectory_of_a_rewritten_result_is_not_stale(tmp_path):
    """Results saved again into the same directory (a rerun) must not reuse the old tail fits,
    even when the file times match (coarse file-system clocks, copies that keep times)."""
    path = tmp_path / "step=2"
    first = make_result(1, seed=1)
    make_result(2, seed=2, path=path)
    meta = path / "meta.json"
    old_times = (meta.stat().st_atime_ns, meta.stat().st_mtime_ns)
    before = trajectory([first, InfluenceResult.load(path)])["tail_alpha"][1]
    rewritten = make_result(2, seed=3)
    rewritten.scores.mul_(torch.linspace(0.2, 5.0, rewritten.num_train))  # a different tail
    expected = trajectory([first, rewritten])["tail_alpha"][1]
    assert expected != pytest.approx(before)
    rewritten.save(path, overwrite=True)
    os.utime(meta, ns=old_times)
    assert trajectory([first, InfluenceResult.load(path)])["tail_alpha"][1] == pytest.approx(expected)


def read_trajectory(result):
    payload = json.loads((result.path / REPORT_DIR / SUMMARY_FILE).read_text())
    return payload["trajectory"]


@pytest.fixture
def saved_run(tmp_path):
    """Saved results and the callback's history of them: loaded copies, oldest first."""
    saved = [make_result(step, seed=step, path=tmp_path / f"step={step}", tokens=False) for step in (1, 2, 3)]
    return saved, [InfluenceResult.load(r.path) for r in saved]


def test_publisher_analyses_each_result_once_whatever_the_history(saved_run, tail_fits):
    saved, history = saved_run
    publisher = ResultPublisher(max_queries=1)
    publisher.publish(saved[0], step=1, history=history[:1])  # a history ending with the new result
    assert read_trajectory(saved[0]) is None
    publisher.publish(saved[1], step=2, history=history[:2])
    publisher.publish(saved[2], step=3, history=history[:2])  # a history of the earlier results only
    assert read_trajectory(saved[2])["step"] == [1, 2, 3]
    assert len(tail_fits) == 3  # one analysis per result


def test_a_new_publisher_analyses_a_resumed_history_once(saved_run, tail_fits, tmp_path):
    saved, history = saved_run
    publisher = ResultPublisher(max_queries=1)
    publisher.publish(saved[2], step=3, history=history)
    assert read_trajectory(saved[2])["step"] == [1, 2, 3] and len(tail_fits) == 3
    unrelated = make_result(9, seed=9, path=tmp_path / "other", tokens=False)
    publisher.publish(unrelated, step=9)  # no history: a report of that result alone, as before
    assert read_trajectory(unrelated) is None


# -- run identity ----------------------------------------------------------------------------------


def test_check_same_run_names_the_runs_and_how_to_proceed():
    quick = [run_result(step, "quick-run", 300) for step in (10, 20)]
    full = run_result(10, "full-run", 1500)
    check_same_run(quick)
    check_same_run([make_result(5), *quick])  # results without a run identity are older ones: they pass
    with pytest.raises(ValueError) as caught:
        check_same_run([*quick, full])
    message = str(caught.value)
    for fragment in ("2 different training runs", "'quick-run'", "pool of 300", "steps 10, 20", "'full-run'",
                     "pool of 1500", "model TinyLM", "allow_different_runs=True", "--allow-different-runs"):
        assert fragment in message
    check_same_run([*quick, full], allow_different_runs=True)


def test_compare_trajectory_and_run_analysis_refuse_another_run():
    quick, full = run_result(10, "quick-run", 300), run_result(20, "full-run", 1500)
    with pytest.raises(ValueError, match="pool of 300.*pool of 1500"):
        compare(quick, full)
    assert compare(quick, full, allow_different_runs=True).steps == (10, 20)
    with pytest.raises(ValueError, match="different training runs"):
        trajectory([quick, full])
    assert trajectory([quick, full], allow_different_runs=True)["step"] == [10, 20]
    run = RunAnalysis()
    run.add(make_result(5))  # an older result without identity
    run.add(quick)
    with pytest.raises(ValueError, match="quick-run.*full-run"):
        run.add(full)
    assert len(run) == 2 and run.latest.result is quick  # the refused result left the run unchanged
    assert RunAnalysis(allow_different_runs=True).extend([quick, full]).previous is quick


def test_html_report_refuses_two_runs(tmp_path):
    results = [run_result(10, "quick-run", 300), run_result(20, "full-run", 1500)]
    with pytest.raises(ValueError, match="different training runs"):
        write_html_report(results, tmp_path / "mixed.html")
    assert not (tmp_path / "mixed.html").exists()
    page = write_html_report(results, tmp_path / "both.html", allow_different_runs=True).read_text()
    assert '<section id="comparison">' in page and "Previous vs latest checkpoint (step 10" in page


def cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_report_and_compare_refuse_a_directory_mixing_two_runs(capsys, tmp_path):
    """The README's bad flow: the quick example, then the full one, into the same directory."""
    run_dir = tmp_path / "influence"
    for step in (10, 20):
        run_result(step, "quick-run", 300, path=run_dir / f"step={step}")
    for step in (30, 40):
        run_result(step, "full-run", 1500, path=run_dir / f"step={step}")
    code, out, err = cli(capsys, "report", run_dir)
    assert code == 1 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lightning-influence: error: ")
    for fragment in ("'quick-run' (pool of 300", "steps 10, 20", "'full-run' (pool of 1500", "steps 30, 40",
                     "--allow-different-runs"):
        assert fragment in lines[0]
    code, out, err = cli(capsys, "report", run_dir, "--allow-different-runs", "--top-k", "2")
    assert code == 0, err
    assert "4 checkpoint(s), steps: 10, 20, 30, 40" in out and "== Trajectory over checkpoints" in out

    code, _, err = cli(capsys, "compare", run_dir / "step=20", run_dir / "step=30")
    assert code == 1 and "pool of 300" in err and "pool of 1500" in err
    code, out, err = cli(capsys, "compare", run_dir / "step=20", run_dir / "step=30", "--allow-different-runs")
    assert code == 0 and "step 20 -> step 30" in out, err


# -- one number formatter -----------------------------------------------------------------------------


def test_format_number():
    assert format_number(1.23456789) == "1.235" and format_number(0.5, ".3f") == "0.500"
    assert format_number(None) == format_number(math.nan) == format_number(-math.inf) == "-"
    assert format_number(None, missing="") == ""
    assert format_number(12) == "12" and format_number("ekfac") == "ekfac" and format_number(True) == "True"
    assert format_number(torch.tensor(2.5)) == "2.5" and format_number(torch.tensor([7])) == "7"
    assert format_number(np.float64(1 / 3)) == "0.3333" and format_number(np.int64(4)) == "4"


def test_comparison_table_shows_undefined_numbers_as_dashes():
    flat = InfluenceResult(scores=torch.zeros(2, 30), step=1)  # constant: no rank correlation, no tail
    table = compare(flat, InfluenceResult(scores=torch.zeros(2, 30), step=2)).format_table()
    spearman_row = next(line for line in table.splitlines() if line.strip().startswith("spearman"))
    assert spearman_row.split()[1:] == ["-", "-", "-"]
    assert "nan" not in table
