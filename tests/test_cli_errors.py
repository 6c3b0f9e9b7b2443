"""The ``lightning-influence`` command refuses bad input with one line and exit status 1 (or a usage
error, status 2), never a traceback, and never deletes a directory it did not write."""

import json
import textwrap

import pytest
import torch

import lightning_influence as li
from lightning_influence.cli import build_parser, main
from lightning_influence.results import InfluenceResult

USER_MODULE = textwrap.dedent(
    """
    import torch
    from torch import nn


    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))

        def forward(self, x):
            return self.body(x)


    class NeedsWidth(Net):
        def __init__(self, width):
            super().__init__()


    def train_set():
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(12, 4, generator=gen)
        return torch.utils.data.TensorDataset(x, (x[:, 0] > 0).long())


    def query_set():
        return torch.utils.data.Subset(train_set(), [0, 1, 2])


    def as_tuple():
        return train_set().tensors


    def as_string():
        return "train.csv"
    """
)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A user module, a checkpoint of its ``Net`` and factors fitted on its training set."""
    root = tmp_path_factory.mktemp("cli_errors")
    (root / "user.py").write_text(USER_MODULE)
    namespace = {}
    exec(compile(USER_MODULE, "user.py", "exec"), namespace)
    torch.manual_seed(0)
    model = namespace["Net"]()
    torch.save(model.state_dict(), root / "model.ckpt")
    li.fit_factors(model, li.ClassificationTask(), namespace["train_set"](), fisher="empirical").save(root / "factors")
    return root


def score_args(saved, tmp_path, **overrides):
    args = {"--checkpoint": saved / "model.ckpt", "--model": f"{saved / 'user.py'}:Net",
            "--train-data": f"{saved / 'user.py'}:train_set", "--query-data": f"{saved / 'user.py'}:query_set",
            "--factors": saved / "factors", "--task": "classification", "--out": tmp_path / "scored"}
    args.update(overrides)
    return ["score"] + [str(part) for pair in args.items() for part in pair]


def run_cli(capsys, argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code, err, *fragments):
    lines = err.strip().splitlines()
    assert code == 1, err
    assert len(lines) == 1 and lines[0].startswith("lightning-influence: error: "), err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


# -- --out never deletes what the command did not write -----------------------------------------------


def test_score_out_refuses_a_directory_with_user_files(capsys, saved, tmp_path):
    out = tmp_path / "scored"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    code, _, err = run_cli(capsys, score_args(saved, tmp_path))
    assert_one_line_error(code, err, str(out), "not a lightning-influence result")
    assert (out / "thesis.tex").read_text() == "years of work"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scored"]  # no temporary left behind


def test_score_out_replaces_a_previous_result_only_with_overwrite(capsys, saved, tmp_path):
    assert run_cli(capsys, score_args(saved, tmp_path))[0] == 0
    first = InfluenceResult.load(tmp_path / "scored").scores

    code, _, err = run_cli(capsys, score_args(saved, tmp_path))
    assert_one_line_error(code, err, "already holds a saved lightning-influence/result", "--overwrite")

    code, out, err = run_cli(capsys, score_args(saved, tmp_path, **{"--query-data": f"{saved / 'user.py'}:train_set"})
                             + ["--overwrite"])
    assert code == 0, err
    replaced = InfluenceResult.load(tmp_path / "scored").scores
    assert replaced.shape == (12, 12) and first.shape == (3, 12)


def test_score_out_may_be_an_empty_directory(capsys, saved, tmp_path):
    (tmp_path / "scored").mkdir()
    code, _, err = run_cli(capsys, score_args(saved, tmp_path))
    assert code == 0, err
    assert InfluenceResult.load(tmp_path / "scored").num_queries == 3


# -- bad numbers are usage errors ----------------------------------------------------------------------


@pytest.mark.parametrize("damping", ["nan", "inf", "-inf", "1e300", "-0.5", "tiny"])
def test_damping_must_be_finite_and_non_negative(capsys, damping):
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(["score", "--checkpoint", "c", "--model", "m:M", "--train-data", "d:t",
                                   "--query-data", "d:q", "--factors", "f", "--task", "classification",
                                   "--out", "o", f"--damping={damping}"])
    assert exit_.value.code == 2
    assert "--damping" in capsys.readouterr().err


@pytest.mark.parametrize("damping", ["0", "0.001", "1e3"])
def test_reasonable_damping_is_accepted(damping):
    args = build_parser().parse_args(["score", "--checkpoint", "c", "--model", "m:M", "--train-data", "d:t",
                                      "--query-data", "d:q", "--factors", "f", "--task", "classification",
                                      "--out", "o", "--damping", damping])
    assert args.damping == float(damping)


# -- one line, not a traceback ---------------------------------------------------------------------------


@pytest.mark.parametrize("garbage", ["random bytes", "text", "truncated checkpoint"])
def test_garbage_checkpoint(capsys, saved, tmp_path, garbage):
    checkpoint = tmp_path / "garbage.ckpt"
    if garbage == "truncated checkpoint":  # torch.load raises a bare OSError "[Errno 22] Invalid argument"
        whole = (saved / "model.ckpt").read_bytes()
        checkpoint.write_bytes(whole[: len(whole) // 2])
    else:  # torch.load raises UnpicklingError / KeyError
        checkpoint.write_bytes(bytes(range(256)) * 8 if garbage == "random bytes" else b"hello world")
    code, _, err = run_cli(capsys, score_args(saved, tmp_path, **{"--checkpoint": checkpoint}))
    assert_one_line_error(code, err, f"cannot restore {saved / 'user.py'}:Net from {checkpoint} (")


def test_model_class_needing_arguments(capsys, saved, tmp_path):
    code, _, err = run_cli(capsys, score_args(saved, tmp_path, **{"--model": f"{saved / 'user.py'}:NeedsWidth"}))
    assert_one_line_error(code, err, "without arguments", "width")


def test_task_not_matching_the_model(capsys, saved, tmp_path):
    code, _, err = run_cli(capsys, score_args(saved, tmp_path, **{"--task": "causal_lm"}))
    assert_one_line_error(code, err, "scoring failed", "--task causal_lm")
    assert not (tmp_path / "scored").exists()


@pytest.mark.parametrize("factory, kind", [("as_tuple", "tuple"), ("as_string", "str")])
def test_train_data_that_is_not_a_dataset(capsys, saved, tmp_path, factory, kind):
    code, _, err = run_cli(capsys, score_args(saved, tmp_path, **{"--train-data": f"{saved / 'user.py'}:{factory}"}))
    assert_one_line_error(code, err, f"gave a {kind}, not a Dataset", "TensorDataset")


def test_python_file_with_a_syntax_error(capsys, saved, tmp_path):
    broken = tmp_path / "broken.py"
    broken.write_text("def train_set(:\n    pass\n")
    code, _, err = run_cli(capsys, score_args(saved, tmp_path, **{"--train-data": f"{broken}:train_set"}))
    assert_one_line_error(code, err, "broken.py", "SyntaxError")


def test_cuda_device_without_cuda(capsys, saved, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code, _, err = run_cli(capsys, score_args(saved, tmp_path, **{"--device": "cuda:0"}))
    assert_one_line_error(code, err, "CUDA is not available", "--device cpu")


def test_unknown_device_name(capsys, saved, tmp_path):
    code, _, err = run_cli(capsys, score_args(saved, tmp_path, **{"--device": "gpu7"}))
    assert_one_line_error(code, err, "'gpu7' is not a device name")


# -- results whose files are inconsistent are refused on load --------------------------------------------


def saved_result(path, layer_names=("a", "b")):
    scores = torch.arange(8.0).reshape(2, 4)
    layer_scores = torch.stack([scores / 2, scores / 2])
    return InfluenceResult(scores=scores, layer_names=list(layer_names), layer_scores=layer_scores, step=3).save(path)


def edit_meta(path, **changes):
    meta = json.loads((path / "meta.json").read_text())
    meta.update(changes)
    (path / "meta.json").write_text(json.dumps(meta))


def test_string_version_in_meta_json(capsys, tmp_path):
    path = saved_result(tmp_path / "result")
    edit_meta(path, version="1")
    code, _, err = run_cli(capsys, ["report", path])
    assert_one_line_error(code, err, "version '1'", "expected an integer")


def test_tensor_file_without_train_ids(capsys, tmp_path):
    from safetensors.torch import save_file

    path = saved_result(tmp_path / "result")
    save_file({"scores": torch.zeros(2, 4), "query_ids": torch.arange(2)}, str(path / "tensors.safetensors"))
    code, _, err = run_cli(capsys, ["report", path])
    assert_one_line_error(code, err, "lacks the tensors ['train_ids']")


def test_meta_json_layer_names_disagreeing_with_tensors(capsys, tmp_path):
    path = saved_result(tmp_path / "result")
    edit_meta(path, layer_names=["a"])
    with pytest.raises(li.FormatError, match="layer_scores has shape"):
        InfluenceResult.load(path)
    code, _, err = run_cli(capsys, ["report", path])
    assert_one_line_error(code, err, "does not match meta.json", "layer_scores")


# -- reports name offline results by their checkpoint ----------------------------------------------------


def test_report_on_a_scored_result_names_its_checkpoint(capsys, saved, tmp_path):
    assert run_cli(capsys, score_args(saved, tmp_path))[0] == 0
    code, out, err = run_cli(capsys, ["report", tmp_path / "scored"])
    assert code == 0, err
    assert "None" not in out
    assert "1 checkpoint(s), steps: offline (model.ckpt)" in out
    assert "Latest: offline (model.ckpt): 3 queries x 12 training examples" in out
    code, out, err = run_cli(capsys, ["compare", tmp_path / "scored", tmp_path / "scored"])
    assert code == 0, err
    assert f"A: {tmp_path / 'scored'} (offline (model.ckpt))" in out
