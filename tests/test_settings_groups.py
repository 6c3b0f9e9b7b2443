"""Settings in groups: the old flat spelling gives the same config with a FutureWarning, groups from
dicts / YAML equal groups from Python, the callback keeps at most 15 parameters, one validator per
rule (the same message from every entry point), and checkpoints written with the flat settings resume."""

from __future__ import annotations

import inspect
import re

import pytest
import torch
from omegaconf import OmegaConf
from torch.utils.data import TensorDataset

import lightning_influence as li
from lightning_influence.loops.fabric import InfluenceMonitor

DATA = TensorDataset(torch.zeros(8, 3), torch.zeros(8, dtype=torch.long))


def test_the_callback_has_at_most_15_parameters():
    assert len(inspect.signature(li.InfluenceCallback.__init__).parameters) - 1 <= 15


@pytest.mark.parametrize("old, new", [
    (dict(strategy="kfac"), dict(curvature=li.CurvatureConfig(strategy="kfac"))),
    (dict(curvature_refresh="never"), dict(curvature={"refresh": "never"})),
    (dict(window="ema", ema_decay=0.9), dict(curvature={"ema_decay": 0.9})),
    (dict(window="reset"), dict()),
    (dict(top_k=3, batch_size=4), dict(scoring=li.ScoringConfig(top_k=3, batch_size=4))),
    (dict(ledger=True), dict(scoring={"ledger": 32})),
    (dict(ledger=True, ledger_subspace=None), dict(scoring={"ledger": 0})),
    (dict(report=False), dict(report={"mode": "off"})),
    (dict(report_in_background=False), dict(report=li.ReportConfig(mode="foreground"))),
    (dict(show_progress=False, log_artifacts=False), dict(report={"show_progress": False, "log_artifacts": False})),
], ids=lambda v: ",".join(v) if isinstance(v, dict) else None)
def test_the_old_flat_spelling_gives_the_same_config_with_a_future_warning(old, new):
    with pytest.warns(FutureWarning, match="deprecated"):
        before = li.InfluenceCallback("classification", **old).config
    assert before == li.InfluenceCallback("classification", **new).config


def test_the_warning_names_the_new_spelling():
    with pytest.warns(FutureWarning, match=re.escape("curvature={'strategy': 'kfac'}")):
        li.InfluenceCallback("classification", strategy="kfac")


YAML = """
task: classification
curvature: {strategy: kfac, ema_decay: 0.95, exclude: [net.2]}
scoring: {top_k: 4, ledger: 16}
report: {mode: foreground, show_progress: false}
"""
PYTHON = dict(task="classification", curvature=li.CurvatureConfig(strategy="kfac", ema_decay=0.95, exclude=("net.2",)),
              scoring=li.ScoringConfig(top_k=4, ledger=16), report=li.ReportConfig(mode="foreground", show_progress=False))


def test_groups_from_yaml_dicts_and_structured_configs_equal_groups_from_python():
    expected = li.InfluenceCallback(**PYTHON).config
    node = OmegaConf.create(YAML)
    assert li.InfluenceCallback.from_config(node).config == expected
    assert li.InfluenceCallback(**OmegaConf.to_container(node)).config == expected
    assert li.InfluenceCallback(**node).config == expected  # DictConfig groups, as hydra.utils.instantiate passes
    typed = OmegaConf.merge(OmegaConf.structured(li.InfluenceConfig), node)
    assert li.InfluenceConfig.coerce(typed) == expected


def test_hydra_instantiate_builds_the_same_groups():
    hydra_utils = pytest.importorskip("hydra.utils")
    node = OmegaConf.create(YAML)
    node._target_ = "lightning_influence.InfluenceCallback"
    assert hydra_utils.instantiate(node).config == li.InfluenceCallback(**PYTHON).config


def test_a_structured_config_rejects_an_unknown_group_field():
    with pytest.raises(Exception, match="top_kk"):
        OmegaConf.merge(OmegaConf.structured(li.InfluenceConfig), OmegaConf.create("scoring: {top_kk: 3}"))


def _hf(**settings):
    pytest.importorskip("transformers")
    from lightning_influence.loops.hf import InfluenceTrainerCallback

    return InfluenceTrainerCallback("classification", DATA, train_data=DATA, **settings)


class _Fabric:
    is_global_zero, loggers, logger = True, [], None


@pytest.mark.parametrize("settings, message", [
    (dict(curvature={"strategy": "diagonal", "shard_factors": True}),
     "curvature.shard_factors needs curvature.strategy 'ekfac' or 'kfac' (got 'diagonal')"),
    (dict(scoring={"keep_top_scores": 2, "top_k": 5}), "scoring.keep_top_scores=2 is smaller than scoring.top_k=5"),
    (dict(curvature={"damping": -1.0}), "curvature.damping must be a number from 0"),
    (dict(curvature={"shard_factors": True}, scoring={"self_influence": True}),
     "scoring.self_influence needs every layer's factors on every process"),
], ids=["sharding-strategy", "keep-below-top-k", "damping", "sharding-self-influence"])
def test_one_validator_per_rule_the_same_message_everywhere(settings, message, tmp_path):
    pattern = re.escape(message)
    with pytest.raises(ValueError, match=pattern):
        li.InfluenceCallback("classification", **settings)
    with pytest.raises(ValueError, match=pattern):
        InfluenceMonitor(_Fabric(), torch.nn.Linear(3, 2), "classification", DATA, DATA, output_dir=tmp_path, **settings)
    with pytest.raises(ValueError, match=pattern):
        li.InfluenceSession(li.ClassificationTask(), DATA, DATA, **settings)
    with pytest.raises(ValueError, match=pattern):
        _hf(**settings)


def test_the_ledger_is_refused_outside_the_lightning_callback(tmp_path):
    with pytest.raises(ValueError, match="scoring.ledger is not supported here"):
        InfluenceMonitor(_Fabric(), torch.nn.Linear(3, 2), "classification", DATA, DATA, output_dir=tmp_path,
                         scoring={"ledger": 8})


def test_the_session_takes_the_groups_and_its_old_keywords_with_a_warning():
    task = li.ClassificationTask()
    new = li.InfluenceSession(task, DATA, DATA, curvature={"strategy": "kfac"}, scoring=li.ScoringConfig(top_k=3))
    with pytest.warns(FutureWarning):
        old = li.InfluenceSession(task, DATA, DATA, strategy="kfac", top_k=3, eigenbasis_dtype=torch.float32)
    assert (old.strategy, old.top_k, old.eigenbasis_dtype) == ("kfac", 3, torch.float32)
    assert (new.strategy, new.top_k, new.eigenbasis_dtype) == ("kfac", 3, torch.float64)


def test_a_checkpoint_written_with_the_flat_settings_resumes():
    """The fingerprint an earlier release stored (flat keys, window by name) is what the groups give."""
    saved = {"task": "ClassificationTask", "strategy": "kfac", "fisher": "empirical", "covariance_dtype": "float32",
             "loss_reduction": "mean", "window": "ema", "max_train_examples": None, "seed": 0}
    config = li.InfluenceCallback("classification", curvature={"strategy": "kfac", "ema_decay": 0.99}).config
    config.check_resumable(saved)
    with pytest.raises(ValueError, match="window: checkpoint 'ema' vs now 'reset'"):
        li.InfluenceCallback("classification", curvature={"strategy": "kfac"}).config.check_resumable(saved)


def test_saved_monitors_read_top_k_of_old_and_new_results():
    from lightning_influence.analysis.monitors import saved_monitors

    old = saved_monitors({"config": {"top_k": 7}, "monitors": {"drift/topk_churn": 0.5}})
    new = saved_monitors({"config": {"scoring": {"top_k": 7}}, "monitors": {"drift/topk_churn": 0.5}})
    assert old == new and list(old) != ["drift/topk_churn"]
