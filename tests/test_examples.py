"""Every example runs end to end in quick mode (in-process, in a temp dir, W&B offline) and finds
what it is built to find: the arithmetic LM's influential sequences share the query's answer and
template and light up the token before the answer; the digits run singles out flipped labels
well above chance; the LightningCLI and Hydra configurations train with the callback they build.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

pytest.importorskip("pytorch_lightning")
pytest.importorskip("sklearn")

import torch  # noqa: E402

import lightning_influence as li  # noqa: E402
from lightning_influence.results import factors_path  # noqa: E402

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
sys.path.insert(0, str(EXAMPLES))


@pytest.fixture(autouse=True)
def _isolated(monkeypatch, tmp_path):
    """Run in a temp dir with W&B offline, and close any W&B run an example leaves open."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.argv", ["example.py"])
    yield
    wandb = sys.modules.get("wandb")
    if wandb is not None and wandb.run is not None:
        wandb.finish()


def _wandb_runs(root: Path) -> list:
    """Offline W&B runs (with their binary run log) under ``root``."""
    return [run for run in root.rglob("offline-run-*") if list(run.glob("run-*.wandb"))]


def test_arithmetic_lm(tmp_path, capsys):
    import arithmetic_lm

    out = arithmetic_lm.main(["--quick", "--output-dir", str(tmp_path / "run"), "--color", "never"])
    printed = capsys.readouterr().out

    results = out["results"]
    assert len(results) >= 2 and [r.step for r in results] == sorted({r.step for r in results})
    for result in results:
        assert (Path(result.path) / "meta.json").is_file() and (Path(result.path) / "factors").is_dir()
        assert (Path(result.path) / "report" / "summary.json").is_file()
        assert result.meta["checkpoint_path"], "each result records the checkpoint saved at its step"
    html = Path(out["report"]).read_text()
    assert ">many </span>" in html and "<img" in html  # sequences rendered token by token, embedded plots
    assert _wandb_runs(tmp_path / "run")

    # The planted structure: a query's most influential sequences share its answer and template.
    structure = out["structure"]
    assert structure["answer"] > 3 * structure["answer_chance"], structure
    assert structure["template"] > structure["template_chance"], structure

    # Token scores sit on the position that reads "?", the one predicting the answer (the query
    # measures the answer's log-probability) — for most queries' top sequence.
    last, train_set = results[-1], out["train_set"]
    question_mark = arithmetic_lm.WordTokenizer().index["?"]
    top_ids, top_tokens = last.get("top_ids"), last.get("top_token_scores")
    hits = [int(train_set.input_ids[int(top_ids[q, 0])][int(top_tokens[q, 0].abs().argmax())]) == question_mark
            for q in range(last.num_queries)]
    assert sum(hits) > len(hits) / 2, hits

    assert isinstance(out["comparison"], li.Comparison)
    assert out["comparison"].steps == (results[0].step, results[-1].step)
    for expected in ("[+", "blocks.0.qkv", "Spearman", str(out["report"]), "same answer"):
        assert expected in printed, expected


def test_digits_flipped_labels(tmp_path, capsys):
    import digits_flipped_labels

    out = digits_flipped_labels.main(["--quick", "--output-dir", str(tmp_path / "run"), "--no-wandb"])
    rates = out["rates"]
    assert rates["chance"] == pytest.approx(0.1, abs=0.01)
    assert rates["self_influence"] > 5 * rates["chance"], rates
    assert rates["negative_influence"] > 5 * rates["chance"], rates
    assert out["self_influence"].shape == out["flipped"].shape
    assert (Path(out["result"].path) / "factors").is_dir()
    # The live self-influence (callback, self_influence=True) is the offline one from the saved factors.
    factors = li.load_factors(factors_path(out["result"]))
    offline = li.compute_self_influence(out["model"], li.ClassificationTask(), out["train_set"], factors)
    torch.testing.assert_close(out["self_influence"], offline.float(), rtol=1e-3, atol=1e-5)
    assert "highest self-influence" in capsys.readouterr().out


def test_lightning_cli(tmp_path):
    import lightning_cli

    cli = lightning_cli.main([
        "fit", "--config", str(EXAMPLES / "cli_config.yaml"),
        "--trainer.max_epochs=1", f"--trainer.default_root_dir={tmp_path}",
        f"--trainer.logger.init_args.save_dir={tmp_path}",
        "--trainer.callbacks.init_args.every_n_epochs=1", "--trainer.callbacks.init_args.num_queries=2",
    ])
    callback = next(cb for cb in cli.trainer.callbacks if isinstance(cb, li.InfluenceCallback))
    assert callback.config.curvature.fisher == "empirical" and callback.config.scoring.top_k == 10  # from the YAML
    results = callback.results
    assert len(results) == 1 and results[0].scores.shape == (2, len(cli.datamodule.train_set))
    assert Path(results[0].path).parent == tmp_path / "influence"
    assert _wandb_runs(tmp_path)


def test_hydra_app(tmp_path, monkeypatch):
    import hydra_app

    monkeypatch.setattr("sys.argv", ["hydra_app.py", f"hydra.run.dir={tmp_path}", "trainer.max_epochs=1",
                                     "influence.every_n_epochs=1", "influence.num_queries=2"])
    hydra_app.main()
    results = li.load_results(tmp_path / "influence")
    assert len(results) == 1 and results[0].num_queries == 2
    assert results[0].meta["fisher"] == "true"  # from conf/influence/digits.yaml
    assert (tmp_path / ".hydra" / "config.yaml").is_file()
    assert _wandb_runs(tmp_path)


def test_hydra_typed_config_checks_fields(tmp_path):
    from hydra import compose, initialize_config_dir
    from hydra.errors import ConfigCompositionException

    import hydra_app

    with initialize_config_dir(str(EXAMPLES / "conf"), version_base=None):
        cfg = compose("config", overrides=["influence=typed", f"influence.output_dir={tmp_path}"])
        callback = hydra_app.build_callback(cfg.influence)
        assert isinstance(callback, li.InfluenceCallback)
        assert callback.config.curvature.fisher == "true" and callback.config.every_n_epochs == 3
        for bad in ("influence.num_querys=3", "influence.num_queries=many"):
            with pytest.raises(ConfigCompositionException):
                compose("config", overrides=["influence=typed", bad])
        forced = compose("config", overrides=["influence=typed", f"influence.output_dir={tmp_path}",
                                              "+influence.num_querys=3"])  # `+` adds keys even to typed nodes
        with pytest.raises(ValueError, match="num_querys"):
            hydra_app.build_callback(forced.influence)
