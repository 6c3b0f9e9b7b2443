"""Writing results never deletes what this project did not write, respects the umask, and keeps the
on-disk format in results.py; results of different runs are not silently combined."""

import json
import os
import stat
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import lightning_influence as li
from lightning_influence._io import atomic_directory, remove_incomplete, write_file_atomic
from lightning_influence.results import (
    FACTORS_DIR,
    InfluenceResult,
    check_same_run,
    factors_path,
    new_run_id,
    run_identity,
    save_result_with_factors,
    update_result_meta,
)


def make_result(step=1, run=None, n_train=5):
    scores = torch.arange(3.0 * n_train).reshape(3, n_train) - 4
    return InfluenceResult(scores=scores, step=step, meta={"run": run} if run else {})


def small_factors():
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    x = torch.randn(10, 3, generator=torch.Generator().manual_seed(0))
    data = torch.utils.data.TensorDataset(x, (x[:, 0] > 0).long())
    return li.fit_factors(model, li.ClassificationTask(), data, fisher="empirical")


def user_files(directory):
    """A user's directory with a file and a subdirectory in it."""
    directory.mkdir(parents=True)
    (directory / "notes.txt").write_text("mine")
    (directory / "data").mkdir()
    (directory / "data" / "train.csv").write_text("x,y\n")
    return {"notes.txt": "mine", "data/train.csv": "x,y\n"}


def assert_unchanged(directory, files):
    assert {str(p.relative_to(directory)): p.read_text() for p in directory.rglob("*") if p.is_file()} == files


# -- saving never deletes what it did not write ---------------------------------------------------------


@pytest.mark.parametrize("save", [
    lambda path: make_result().save(path),
    lambda path: small_factors().save(path),
    lambda path: save_result_with_factors(path, make_result(), small_factors()),
], ids=["result", "factors", "result with factors"])
def test_save_refuses_a_directory_of_user_files(tmp_path, save):
    files = user_files(tmp_path / "mine")
    with pytest.raises(FileExistsError, match="is not a lightning-influence result; refusing to replace it"):
        save(tmp_path / "mine")
    assert_unchanged(tmp_path / "mine", files)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]  # no temporary directory left behind


def test_save_refuses_a_file(tmp_path):
    (tmp_path / "result").write_text("a file")
    with pytest.raises(FileExistsError):
        make_result().save(tmp_path / "result")
    assert (tmp_path / "result").read_text() == "a file"


def test_save_into_an_empty_directory(tmp_path):
    (tmp_path / "result").mkdir()
    make_result(step=4).save(tmp_path / "result")
    assert InfluenceResult.load(tmp_path / "result").step == 4


@pytest.mark.parametrize("kind", ["result", "factors"])
def test_a_previous_save_is_replaced_only_with_overwrite(tmp_path, kind):
    path = tmp_path / kind
    if kind == "result":
        make_result(step=1).save(path)
        save, load = (lambda **kw: make_result(step=2).save(path, **kw)), (lambda: InfluenceResult.load(path).step)
    else:
        small_factors().save(path)
        save, load = (lambda **kw: li.Factors("identity", {}, {"second": True}).save(path, **kw)), \
            (lambda: li.load_factors(path).strategy)
    before = load()
    with pytest.raises(FileExistsError, match="already holds a saved lightning-influence/.*overwrite=True"):
        save()
    assert load() == before
    save(overwrite=True)
    assert load() == (2 if kind == "result" else "identity")
    assert sorted(p.name for p in tmp_path.iterdir()) == [kind]


def test_callback_write_path_replaces_its_own_result_but_not_user_files(tmp_path):
    """The callback re-computing a step after a resume replaces its own result (``overwrite=True``,
    as it passes), and still never a directory of user files."""
    for step in (1, 2):
        with atomic_directory(tmp_path / "step=7", overwrite=True) as tmp:
            make_result(step=step).write_into(tmp)
    assert InfluenceResult.load(tmp_path / "step=7").step == 2
    files = user_files(tmp_path / "step=8")
    with pytest.raises(FileExistsError):
        with atomic_directory(tmp_path / "step=8", overwrite=True) as tmp:
            make_result().write_into(tmp)
    assert_unchanged(tmp_path / "step=8", files)


def test_remove_incomplete_removes_only_our_leftovers(tmp_path):
    (tmp_path / ".env.old-2024").write_text("SECRET=1")
    (tmp_path / ".cache.tmp-keep").mkdir()
    (tmp_path / ".cache.tmp-keep" / "blob").write_text("keep")
    (tmp_path / ".lightning-influence-tmp-mine").write_text("no random suffix: not ours")
    make_result(step=6).save(tmp_path / "step=6")
    interrupted = atomic_directory(tmp_path / "step=12")  # a process killed mid-write leaves its temporary
    leftover = interrupted.__enter__()
    make_result(step=12).write_into(leftover)
    assert leftover.name.startswith(".lightning-influence-tmp-step=12-")

    removed = remove_incomplete(tmp_path)

    assert removed == [leftover] and not leftover.exists()
    assert (tmp_path / ".env.old-2024").read_text() == "SECRET=1"
    assert (tmp_path / ".cache.tmp-keep" / "blob").read_text() == "keep"
    assert (tmp_path / ".lightning-influence-tmp-mine").exists()
    assert [r.step for r in li.load_results(tmp_path)] == [6]


# -- files respect the umask ----------------------------------------------------------------------------


@pytest.fixture(params=[(0o022, 0o755, 0o644), (0o027, 0o750, 0o640)], ids=["umask 022", "umask 027"])
def umask_modes(request):
    umask, directory_mode, file_mode = request.param
    previous = os.umask(umask)
    yield directory_mode, file_mode
    os.umask(previous)


def test_written_files_respect_the_umask(tmp_path, umask_modes):
    directory_mode, file_mode = umask_modes
    path = save_result_with_factors(tmp_path / "result", make_result(), small_factors())
    write_file_atomic(tmp_path / "report.html", b"<html></html>")
    mode = lambda p: stat.S_IMODE(p.stat().st_mode)  # noqa: E731
    assert mode(path) == mode(path / FACTORS_DIR) == directory_mode
    for file in (path / "meta.json", path / "tensors.safetensors", path / FACTORS_DIR / "meta.json",
                 path / FACTORS_DIR / "tensors.safetensors", tmp_path / "report.html"):
        assert mode(file) == file_mode, file
    update_result_meta(path, note="x")
    assert mode(path / "meta.json") == file_mode


# -- the on-disk format lives in results.py ---------------------------------------------------------------


def test_result_with_factors_and_factors_path(tmp_path):
    factors = small_factors()
    result = make_result()
    path = save_result_with_factors(tmp_path / "step=3", result, factors)
    assert result.path == path
    assert factors_path(path) == factors_path(result) == path / FACTORS_DIR
    assert factors_path(path / FACTORS_DIR) == path / FACTORS_DIR
    assert li.load_factors(factors_path(path)).layer_names == factors.layer_names
    plain = make_result().save(tmp_path / "plain")
    with pytest.raises(li.FormatError, match="neither saved factors nor a result holding them"):
        factors_path(plain)


def test_update_result_meta_rewrites_only_the_meta_mapping(tmp_path):
    path = make_result(step=9).save(tmp_path / "result")
    tensors_before = (path / "tensors.safetensors").read_bytes()
    meta = update_result_meta(path, checkpoint_path="last.ckpt", checkpoint_paths=["last.ckpt"])
    assert meta == {"checkpoint_path": "last.ckpt", "checkpoint_paths": ["last.ckpt"]}
    loaded = InfluenceResult.load(path)
    assert loaded.meta == meta and loaded.step == 9
    assert (path / "tensors.safetensors").read_bytes() == tensors_before
    assert sorted(p.name for p in path.iterdir()) == ["meta.json", "tensors.safetensors"]


# -- run identity ---------------------------------------------------------------------------------------


def test_run_identity_is_the_run_id_not_a_hash_of_the_settings():
    """Two runs with the same model, task, pool and settings are two runs (a rerun after changing
    the learning rate, the data or the seed): the id is made once per run, the rest describes it."""
    model, task = nn.Linear(2, 2), li.ClassificationTask()
    first, second = new_run_id(), new_run_id()
    assert first != second and len(first) == 32 and int(first, 16) >= 0
    one = run_identity(model, task, torch.arange(300), first, {"strategy": "ekfac"})
    other = run_identity(model, task, torch.arange(300), second, {"strategy": "ekfac"})
    assert one["id"] == first and other["id"] == second
    assert {k: v for k, v in one.items() if k != "id"} == {k: v for k, v in other.items() if k != "id"}
    assert one["pool_size"] == 300 and one["model"] == "Linear" and one["task"] == "ClassificationTask"
    json.dumps(one)  # stored in meta.json


def test_aggregate_refuses_results_of_different_runs(tmp_path):
    model, task = nn.Linear(2, 2), li.ClassificationTask()
    quick, full = run_identity(model, task, torch.arange(5), "quick"), run_identity(model, task, torch.arange(1500), "full")
    mixed = [make_result(1, quick), make_result(2, quick), make_result(188, full)]
    with pytest.raises(ValueError, match=r"different training runs.*pool of 5 training examples, model Linear, steps 1, 2\).*"
                                         r"pool of 1500 training examples, model Linear, step 188\).*"
                                         r"allow_different_runs=True"):
        li.aggregate(mixed)
    assert li.aggregate(mixed, allow_different_runs=True).num_train == 5
    same = li.aggregate(mixed[:2] + [make_result(3)])  # results without "run" pass, as before
    assert same.meta["aggregated_steps"] == [1, 2, 3]
    assert li.aggregate(mixed[:2]).meta["run"] == quick


def test_runs_of_different_identities_still_load_and_check_same_run_names_them(tmp_path):
    model, task = nn.Linear(2, 2), li.ClassificationTask()
    quick, full = run_identity(model, task, torch.arange(5), "quick"), run_identity(model, task, torch.arange(9), "full")
    make_result(1, quick).save(tmp_path / "step=1")
    make_result(2, full, n_train=9).save(tmp_path / "step=2")
    results = li.load_results(tmp_path)
    assert [r.step for r in results] == [1, 2]
    with pytest.raises(ValueError, match=f"run '{quick['id']}' .*run '{full['id']}' "):
        check_same_run(results)
    check_same_run(results, allow_different_runs=True)
    check_same_run(results[:1])


# -- the example keeps quick and full runs apart; its --help prints each default once ---------------------


@pytest.fixture
def arithmetic_lm():
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))
    import arithmetic_lm

    yield arithmetic_lm
    sys.path.pop(0)


@pytest.mark.parametrize("argv, expected", [
    ([], "runs/arithmetic_lm"),
    (["--quick"], "runs/arithmetic_lm_quick"),
    (["--quick", "--output-dir", "runs/arithmetic_lm"], "runs/arithmetic_lm"),
])
def test_example_quick_runs_get_their_own_directory(arithmetic_lm, argv, expected):
    from common import set_up

    args = arithmetic_lm.build_parser().parse_args(argv)
    set_up(args)
    assert args.output_dir == Path(expected)


def test_example_help_prints_each_default_once(arithmetic_lm, capsys):
    with pytest.raises(SystemExit):
        arithmetic_lm.build_parser().parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for flag_help in ("seed of the data, the model and training (default: 0)",
                      "(default: runs/arithmetic_lm, or runs/arithmetic_lm_quick with --quick)",
                      "(default: auto)", "training sequences (default: 1500)"):
        assert text.count(flag_help) == 1, flag_help
    assert text.count("(default: 0)") == 1 and "(default: None)" not in text and "(default: False)" not in text


def test_aggregate_over_different_pools_points_to_one_run():
    """The hint used to send users to li.compare, which cannot combine anything."""
    a, b = make_result(1), make_result(2, n_train=9)
    with pytest.raises(ValueError, match=r"step 1 and step 2 differ\): pass the results of one run"):
        li.aggregate([a, b])
