"""The ``lightning-influence`` command line, run in-process on results saved to disk."""

import json
import re
import subprocess
import sys
import textwrap

import pytest
import torch

from lightning_influence.cli import main
from lightning_influence.results import InfluenceResult

NUM_QUERIES, NUM_TRAIN, LAYERS = 3, 40, ["encoder.fc1", "encoder.fc2"]
STEPS = (10, 20, 30)


def planted_top_id(step, q):
    """The training id given an outstanding score for query ``q`` at ``step``."""
    return 100 + (q * 7 + step) % NUM_TRAIN


def make_result(step, seed=None, train_ids=None):
    gen = torch.Generator().manual_seed(step if seed is None else seed)
    layer_scores = torch.randn(len(LAYERS), NUM_QUERIES, NUM_TRAIN, generator=gen).exp_()  # heavy-ish tail
    train_ids = torch.arange(100, 100 + NUM_TRAIN) if train_ids is None else train_ids
    for q in range(NUM_QUERIES):  # outstanding examples, seen by the first layer only
        column = planted_top_id(step, q) - 100
        layer_scores[0, q, column] = 1000.0
        layer_scores[0, q, (column + 1) % NUM_TRAIN] = -500.0  # the most harmful example
    return InfluenceResult(
        scores=layer_scores.sum(0), train_ids=train_ids, query_ids=torch.arange(NUM_QUERIES) * 2,
        layer_names=LAYERS, layer_scores=layer_scores, step=step, epoch=step // 10,
        meta={"strategy": "ekfac", "damping": 0.01},
    )


@pytest.fixture
def run_dir(tmp_path):
    run = tmp_path / "influence"
    for step in STEPS:
        make_result(step).save(run / f"step={step}")
    return run


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(err, *fragments):
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("lightning-influence: error: ")
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0]


def query_table(out, query_id):
    """The rows (lists of cells) of one query's top/bottom table in the terminal report."""
    block = out.split(f"query {query_id}\n", 1)[1]
    rows = []
    for line in block.splitlines()[2:]:
        if not line.startswith("  ") or not line.strip()[0].isdigit():
            break
        rows.append(line.split())
    return rows


def test_help_as_module_in_subprocess():
    proc = subprocess.run([sys.executable, "-m", "lightning_influence", "--help"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    for command in ("report", "compare", "score", "examples:"):
        assert command in proc.stdout


@pytest.mark.parametrize("command", ["report", "compare", "score"])
def test_subcommand_help_has_examples(capsys, command):
    code, out, _ = run_cli(capsys, command, "--help")
    assert code == 0
    assert "example" in out and f"lightning-influence {command}" in out


@pytest.mark.parametrize("argv", [[], ["report"], ["compare", "only_one"], ["report", "x", "--top-k", "0"],
                                  ["frobnicate"]])
def test_usage_errors_exit_2(capsys, argv):
    code, _, err = run_cli(capsys, *argv)
    assert code == 2
    assert "usage:" in err


def test_report_on_a_run(capsys, run_dir):
    code, out, err = run_cli(capsys, "report", run_dir, "--top-k", "3")
    assert code == 0, err
    assert "3 checkpoint(s), steps: 10, 20, 30" in out
    assert "strategy ekfac" in out
    for q in range(NUM_QUERIES):
        rows = query_table(out, q * 2)
        assert len(rows) == 3
        rank, top_id, top_score, bottom_id, bottom_score = rows[0]
        assert (rank, int(top_id)) == ("1", planted_top_id(30, q))  # the latest checkpoint's
        assert float(top_score) >= 1000 and float(bottom_score) < -490
        assert int(bottom_id) == 100 + (planted_top_id(30, q) - 100 + 1) % NUM_TRAIN
    for section in ("Tail fit", "Layer shares", "Trajectory over checkpoints"):
        assert f"== {section}" in out
    assert "tail verdict" in out and re.search(r"power law plausible|power law not supported", out)
    assert "topk_churn@3" in out  # the churn names the k it was measured at (--top-k)
    shares = dict(re.findall(r"^(encoder\.fc\d)\s+([0-9.]+)", out, flags=re.M))
    assert float(shares["encoder.fc1"]) > 0.8 > 0.2 > float(shares["encoder.fc2"])
    trajectory = out.split("== Trajectory over checkpoints ==\n", 1)[1].splitlines()
    assert [line.split()[0] for line in trajectory[2:5]] == ["10", "20", "30"]


def test_report_on_one_result_without_layers(capsys, tmp_path):
    result = make_result(20)
    plain = InfluenceResult(scores=result.scores, train_ids=result.train_ids, query_ids=result.query_ids, step=20)
    path = plain.save(tmp_path / "single")
    code, out, err = run_cli(capsys, "report", path)
    assert code == 0, err
    assert "1 checkpoint(s), steps: 20" in out
    assert "no per-layer scores" in out
    assert "Trajectory" not in out
    assert int(query_table(out, 0)[0][1]) == planted_top_id(20, 0)


def test_report_writes_html(capsys, run_dir, tmp_path):
    out_file = tmp_path / "reports" / "run.html"
    code, out, err = run_cli(capsys, "report", run_dir, "--html", out_file)
    assert code == 0, err
    assert f"HTML report written to {out_file}" in out
    page = out_file.read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>") and "data:image/png;base64," in page
    assert f"<td>{planted_top_id(30, 0)}</td>" in page


def test_compare_table(capsys, run_dir):
    code, out, err = run_cli(capsys, "compare", run_dir / "step=10", run_dir / "step=30")
    assert code == 0, err
    assert "(step 10)" in out and "(step 30)" in out
    assert re.search(r"spearman\s+-?\d\.\d{3}", out)
    assert "k=10" in out and "k=50" not in out  # k larger than the 40 training examples is left out
    # The planted best example of query 0 changed from step 10 to step 30.
    assert f"query 0: entered [{planted_top_id(30, 0)}," in out and f"left [{planted_top_id(10, 0)}," in out


def test_compare_json_matches_api(capsys, run_dir):
    from lightning_influence.analysis.compare import compare

    code, out, err = run_cli(capsys, "compare", run_dir / "step=10", run_dir / "step=30", "--json", "--k", "2", "7")
    assert code == 0, err
    payload = json.loads(out)  # strict JSON: no NaN
    assert payload["a"].endswith("step=10") and payload["b"].endswith("step=30")
    expected = compare(InfluenceResult.load(run_dir / "step=10"), InfluenceResult.load(run_dir / "step=30"),
                       ks=(2, 7)).to_dict()
    assert {k: v for k, v in payload.items() if k not in ("a", "b")} == json.loads(json.dumps(expected))
    assert set(payload["topk_jaccard"]) == {"2", "7"}  # the --k values reached compare()
    assert payload["steps"] == [10, 30] and len(payload["spearman"]) == NUM_QUERIES


def test_compare_run_directory_is_a_user_error(capsys, run_dir):
    code, _, err = run_cli(capsys, "compare", run_dir, run_dir / "step=30")
    assert code == 1
    assert_one_line_error(err, "run directory with 3 results")


def test_compare_disjoint_pools_is_a_user_error(capsys, tmp_path):
    a = make_result(10).save(tmp_path / "a")
    b = make_result(10, train_ids=torch.arange(5000, 5000 + NUM_TRAIN)).save(tmp_path / "b")
    code, _, err = run_cli(capsys, "compare", a, b)
    assert code == 1
    assert_one_line_error(err)


@pytest.mark.parametrize("command", [["report"], ["compare", "{path}"]])
def test_missing_path_is_one_line_error(capsys, tmp_path, command):
    missing = tmp_path / "does_not_exist"
    argv = [part.format(path=missing) for part in command] + [missing]
    code, out, err = run_cli(capsys, *argv)
    assert code == 1 and out == ""
    assert_one_line_error(err, str(missing))


@pytest.mark.parametrize("broken", ["tensors.safetensors", "meta.json"])
def test_corrupted_result_is_one_line_error(capsys, run_dir, broken):
    (run_dir / "step=20" / broken).write_bytes(b"\x00garbage{not what you expected")
    code, _, err = run_cli(capsys, "report", run_dir)
    assert code == 1
    assert_one_line_error(err, "corrupted")


def test_corrupted_result_from_console_script_has_no_traceback(run_dir):
    (run_dir / "step=30" / "tensors.safetensors").write_bytes(b"junk")
    proc = subprocess.run([sys.executable, "-m", "lightning_influence", "report", str(run_dir / "step=30")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert_one_line_error(proc.stderr, "corrupted")


def test_score_rejects_a_bad_import_path(capsys, tmp_path):
    checkpoint = tmp_path / "model.ckpt"
    checkpoint.write_bytes(b"")
    (tmp_path / "factors").mkdir()
    common = ["--checkpoint", checkpoint, "--train-data", "x:y", "--query-data", "x:y",
              "--factors", tmp_path / "factors", "--task", "classification", "--out", tmp_path / "out"]
    for model, fragment in [("no_such_module_xyz:Net", "cannot import 'no_such_module_xyz'"),
                            ("torch.nn:NoSuchLayer", "has no attribute 'NoSuchLayer'"),
                            ("torch.nn", "expected an import path")]:
        code, _, err = run_cli(capsys, "score", "--model", model, *common)
        assert code == 1
        assert_one_line_error(err, fragment)
    code, _, err = run_cli(capsys, "score", "--model", "torch.nn:Linear", *common[:-2], "--out", tmp_path / "o",
                           "--checkpoint", tmp_path / "missing.ckpt")
    assert code == 1
    assert_one_line_error(err, "missing.ckpt")


USER_MODULE = textwrap.dedent(
    """
    import torch
    from torch import nn
    import pytorch_lightning as pl


    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))

        def forward(self, x):
            return self.body(x)


    class LitNet(pl.LightningModule):
        def __init__(self, hidden=8):
            super().__init__()
            self.save_hyperparameters()
            self.model = nn.Sequential(nn.Linear(4, hidden), nn.Tanh(), nn.Linear(hidden, 3))

        def forward(self, x):
            return self.model(x)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return nn.functional.cross_entropy(self(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)


    def _data(seed, n):
        gen = torch.Generator().manual_seed(seed)
        x = torch.randn(n, 4, generator=gen)
        return torch.utils.data.TensorDataset(x, (x[:, 0] > 0).long() + (x[:, 1] > 1).long())


    def train_set():
        return _data(0, 24)


    def query_set():
        return _data(1, 5)
    """
)


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    package = tmp_path / "userpkg"
    package.mkdir()
    (package / "cli_models.py").write_text(USER_MODULE)
    monkeypatch.syspath_prepend(str(package))
    import cli_models

    yield cli_models
    sys.modules.pop("cli_models", None)


@pytest.mark.parametrize("kind", ["nn.Module", "LightningModule"])
def test_score_new_queries_from_checkpoint(capsys, tmp_path, user_module, kind):
    import lightning_influence as li

    torch.manual_seed(0)
    checkpoint = tmp_path / "model.ckpt"
    if kind == "nn.Module":
        model, class_path = user_module.Net(), "cli_models:Net"
        torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}}, checkpoint)
    else:
        import pytorch_lightning as pl

        model, class_path = user_module.LitNet(hidden=6), "cli_models:LitNet"
        trainer = pl.Trainer(max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                             enable_model_summary=False, default_root_dir=tmp_path)
        trainer.fit(model, torch.utils.data.DataLoader(user_module.train_set(), batch_size=8))
        trainer.save_checkpoint(checkpoint)
    model.eval()
    task = li.ClassificationTask()
    train, queries = user_module.train_set(), user_module.query_set()
    factors = li.fit_factors(model, task, train)
    # Factors given directly, or as the result directory the callback saves them in.
    factors_dir = tmp_path / "factors" if kind == "nn.Module" else tmp_path / "result" / "factors"
    factors.save(factors_dir)
    factors_arg = factors_dir if kind == "nn.Module" else factors_dir.parent
    expected = li.compute_influence(model, task, train, queries, factors=factors, per_layer=True)
    if kind != "nn.Module":  # a complete callback result: its own meta.json beside factors/
        expected.save(factors_dir.parent / "saved")
        for name in ("meta.json", "tensors.safetensors"):
            (factors_dir.parent / "saved" / name).replace(factors_dir.parent / name)

    code, out, err = run_cli(
        capsys, "score", "--checkpoint", checkpoint, "--model", class_path, "--train-data", "cli_models:train_set",
        "--query-data", "cli_models:query_set", "--factors", factors_arg, "--task", "classification",
        "--out", tmp_path / "scored", "--per-layer", "--self-influence", "--batch-size", "7",
    )
    assert code == 0, err
    assert "scored 5 queries against 24 training examples" in out
    scored = InfluenceResult.load(tmp_path / "scored")
    torch.testing.assert_close(scored.scores, expected.scores, rtol=1e-4, atol=1e-6)
    assert scored.layer_scores is not None and scored.meta["checkpoint"] == str(checkpoint)
    assert scored.self_scores.shape == (24,) and bool((scored.self_scores > 0).all())
