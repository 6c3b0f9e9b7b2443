"""``InfluenceConfig``: every field's type and range checked at construction (one bad value per field,
asserting the message), the trigger rules that need the run's facts (``check_schedule``), the one
mapping of built-in task names, and the settings' fingerprint. No Trainer: these are the config's own
rules, which the callback calls."""

from __future__ import annotations

import dataclasses
import json
import math
import re

import pytest
import torch
from omegaconf import OmegaConf
from torch.utils.data import DataLoader, TensorDataset

import lightning_influence as li
from lightning_influence.config import (
    BUILTIN_TASKS, SEED_LIMIT, CurvatureConfig, InfluenceConfig, ReportConfig, ScoringConfig,
)

GROUPS = {"curvature": CurvatureConfig, "scoring": ScoringConfig, "report": ReportConfig}
FIELDS = [field.name for field in dataclasses.fields(InfluenceConfig) if field.name not in GROUPS] + [
    f"{group}.{field.name}" for group, cls in GROUPS.items() for field in dataclasses.fields(cls)]

# One bad value per field and the fragment of the message that must name it.
BAD_VALUE = {
    "task": (li.ClassificationTask, "task is the class ClassificationTask, not a task; pass an instance: "
                                    "ClassificationTask()"),
    "query_data": (42, "query_data must be 'val', 'test', a Dataset or a DataLoader, got 42"),
    "num_queries": (2.0, "num_queries must be an integer >= 1, got 2.0"),
    "train_data": ("train", "train_data='train' is a string, but train_data takes data, not a split name: leave it "
                            "None to score the trainer's training data, or pass a Dataset or a DataLoader"),
    "every_n_epochs": (1.5, "every_n_epochs must be an integer >= 1, got 1.5"),
    "every_n_train_steps": ("10", "every_n_train_steps must be an integer >= 1, got '10'"),
    "on_checkpoint": ("no", "on_checkpoint must be True or False, got 'no' (a string is not read as a boolean"),
    "on_train_end": ("false", "on_train_end must be True or False, got 'false'"),
    "output_dir": (123, "output_dir must be a path (str or os.PathLike) or None (the trainer's log directory), "
                        "got 123"),
    "curvature.strategy": ("ekfca", "curvature.strategy must be one of 'ekfac', 'kfac', 'diagonal', 'identity', got 'ekfca'"),
    "curvature.fisher": ("exact", "curvature.fisher must be one of 'true', 'empirical', got 'exact'"),
    "curvature.damping": (math.inf, "curvature.damping must be a number from 0 to 1e+30 (above, it is effectively infinite"),
    "curvature.layers": ("net.0", "curvature.layers must be a list of module names or glob patterns, got 'net.0'"),
    "curvature.exclude": ("net.0", "curvature.exclude must be a list of module names or glob patterns, got 'net.0'"),
    "curvature.collect_every_n_steps": (0, "curvature.collect_every_n_steps must be an integer >= 1, got 0"),
    "curvature.max_tokens_per_step": (-1, "curvature.max_tokens_per_step must be an integer >= 1, got -1"),
    "curvature.loss_reduction": ("avg", "curvature.loss_reduction must be one of 'mean', 'sum', 'token_mean', got 'avg'"),
    "curvature.ema_decay": (math.nan, "curvature.ema_decay must be in (0, 1), or None for statistics reset after "
                                      "each computation, got nan"),
    "curvature.correction_batches": (0, "curvature.correction_batches must be an integer >= 1, got 0"),
    "curvature.refresh": ("sometimes", "curvature.refresh must be one of 'auto', 'always', 'never', got 'sometimes'"),
    "scoring.max_train_examples": (True, "scoring.max_train_examples must be an integer >= 1, got True"),
    "seed": (2**63, "seed must be below 2**62 (derived seeds add the step and the process rank"),
    "scoring.query_rank": (0, "scoring.query_rank must be an integer >= 1, got 0"),
    "scoring.top_k": (None, "scoring.top_k must be an integer >= 0, got None"),
    "scoring.batch_size": ("32", "scoring.batch_size must be an integer >= 1, got '32'"),
    "report.renderer": (5, "report.renderer must be callable or have a render() method, got 5"),
    "curvature.max_layer_mb": (math.inf, "curvature.max_layer_mb must be a finite positive number of MiB or None, got inf"),
    "curvature.memory_budget_mb": (math.nan, "curvature.memory_budget_mb must be a finite positive number of MiB or None, got nan"),
    "curvature.covariance_dtype": ("bfloat16", "curvature.covariance_dtype must be one of 'float32', 'float64', got 'bfloat16'"),
    "curvature.statistics_device": ("gpu", "curvature.statistics_device must be a device name such as 'cpu' or 'cuda:0', or None"),
    "curvature.eigenbasis_dtype": ("float16", "curvature.eigenbasis_dtype must be one of 'float64', 'float32', 'bfloat16', got 'float16'"),
    "curvature.shard_factors": ("yes", "curvature.shard_factors must be True or False, got 'yes'"),
    "curvature.shard_statistics": ("no", "curvature.shard_statistics must be True or False, got 'no'"),
    "scoring.self_influence": ("yes", "scoring.self_influence must be True or False, got 'yes'"),
    "scoring.ledger": (-1, "scoring.ledger must be an integer >= 0, got -1"),
    "scoring.keep_top_scores": (0, "scoring.keep_top_scores must be an integer >= 1, got 0"),
    "scoring.pool_id_key": ("", "scoring.pool_id_key must be a non-empty string (the key of a streaming pool item's integer id), "
                        "got ''"),
    "report.mode": ("yes", "report.mode must be one of 'background', 'foreground', 'off', got 'yes'"),
    "report.log_artifacts": (1, "report.log_artifacts must be True or False, got 1"),
    "report.show_progress": ("yes", "report.show_progress must be True or False or None (as the training loop shows "
                                    "its own), got 'yes'"),
    "on_error": ("ignore", "on_error must be one of 'warn', 'raise', got 'ignore'"),
}


def _config(**changes) -> InfluenceConfig:
    """A config from flat fields and ``"<group>.<field>"`` keys."""
    dotted = {key: value for key, value in changes.items() if "." in key}
    settings = {"task": "classification", **{k: v for k, v in changes.items() if k not in dotted}}
    for key, value in dotted.items():
        group, name = key.split(".")
        settings[group] = {**(settings.get(group) or {}), name: value}
    return InfluenceConfig(**settings)


@pytest.mark.parametrize("changes, message", [
    ({"curvature.strategy": "diagonal"},
     "curvature.shard_factors needs curvature.strategy 'ekfac' or 'kfac' (got 'diagonal')"),
    ({"scoring.self_influence": True}, "scoring.self_influence needs every layer's factors on every process"),
    ({"scoring.ledger": 32}, "scoring.ledger needs every layer's factors on every process"),
])
def test_sharded_factors_refuse_what_needs_every_layer_on_every_process(changes, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        _config(**{"curvature.shard_factors": True}, **changes).validate()


def test_sharded_statistics_need_sharded_factors():
    with pytest.raises(ValueError, match="curvature.shard_statistics needs curvature.shard_factors=True"):
        _config(**{"curvature.shard_statistics": True}).validate()
    _config(**{"curvature.shard_statistics": True, "curvature.shard_factors": True}).validate()


def test_the_table_has_a_bad_value_for_every_field():
    assert sorted(BAD_VALUE) == sorted(FIELDS)


@pytest.mark.parametrize("field", FIELDS)
def test_a_bad_value_fails_naming_the_field(field):
    value, message = BAD_VALUE[field]
    with pytest.raises(ValueError, match=re.escape(message)):
        _config(**{field: value}).validate()


@pytest.mark.parametrize("changes,message", [
    ({"curvature.damping": 1e300}, "or None for the per-layer heuristic; got 1e+300"),
    ({"curvature.damping": -math.inf}, "or None for the per-layer heuristic; got -inf"),
    ({"curvature.damping": math.nan}, "or None for the per-layer heuristic; got nan"),
    ({"curvature.damping": "1e-3"}, "or None for the per-layer heuristic; got '1e-3'"),
    (dict(seed=-1), "seed must be an integer >= 0, got -1"),
    (dict(seed=SEED_LIMIT), "seed must be below 2**62"),
    (dict(query_data=None), "query_data must be 'val', 'test', a Dataset or a DataLoader, got None"),
    (dict(train_data=3.5), "train_data must be None (the trainer's training data), a Dataset or a DataLoader, got 3.5"),
    (dict(output_dir=b"/tmp/out"), "output_dir must be a path (str or os.PathLike)"),
    (dict(task=object()), "task must be a lightning_influence.Task or one of ('classification', 'regression', "
                          "'causal_lm'), got <object objec"),
    ({"curvature.exclude": ["net.0", 3]},
     "curvature.exclude must be a list of module names or glob patterns, got ['net.0', 3]"),
    ({"scoring.keep_top_scores": 5, "scoring.top_k": 10}, "scoring.keep_top_scores=5 is smaller than scoring.top_k=10"),
    ({"scoring.pool_id_key": 7}, "scoring.pool_id_key must be a non-empty string"),
    ({"scoring.top_k": 0}, "scoring.top_k must be at least 1 in a training loop"),
], ids=["damping-huge", "damping-minus-inf", "damping-nan", "damping-string", "seed-negative", "seed-limit",
        "query-none", "train-float", "output-bytes", "task-object", "exclude-non-string", "keep-below-top-k",
        "id-key-not-string", "no-top-examples-in-a-loop"])
def test_more_bad_values(changes, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        _config(**changes).validate()


def test_equivalent_spellings_are_accepted_and_normalised(tmp_path):
    config = _config(output_dir=tmp_path / "out", seed=SEED_LIMIT - 1, **{
        "curvature.exclude": None, "curvature.layers": ("net.0",), "curvature.damping": 1e30}).validate()
    assert config.output_dir == str(tmp_path / "out") and isinstance(config.output_dir, str)
    assert config.curvature.exclude == () and config.curvature.layers == ["net.0"]
    assert _config(**{"curvature.exclude": ["net.2"]}).validate().curvature.exclude == ("net.2",)
    assert _config(**{"curvature.exclude": OmegaConf.create(["net.2"])}).validate().curvature.exclude == ("net.2",)
    json.dumps(config.to_dict())  # the normalised settings are JSON as they are


def test_the_largest_seed_and_its_derived_seeds_fit_a_generator():
    """The callback derives seed + 1, and seed + step + 7919 * rank for each computation."""
    seed = SEED_LIMIT - 1
    _config(seed=seed).validate()
    torch.Generator().manual_seed(seed + 10**12 + 7919 * 4096)


@pytest.mark.parametrize("data", [
    TensorDataset(torch.zeros(4, 2)), DataLoader(TensorDataset(torch.zeros(4, 2))), [(torch.zeros(2), 0)],
], ids=["dataset", "loader", "list"])
def test_datasets_and_loaders_are_accepted(data):
    _config(query_data=data, train_data=data).validate()


# -- built-in tasks ------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(BUILTIN_TASKS))
def test_build_task_makes_the_named_builtin(name):
    task = _config(task=name).validate().build_task()
    assert type(task) is BUILTIN_TASKS[name]


def test_build_task_returns_the_given_instance():
    task = li.RegressionTask()
    assert _config(task=task).validate().build_task() is task


def test_builtin_tasks_are_the_public_classes():
    assert BUILTIN_TASKS == {"classification": li.ClassificationTask, "regression": li.RegressionTask,
                             "causal_lm": li.CausalLMTask}


# -- one way in: coerce --------------------------------------------------------------------------------
def test_coerce_from_a_dict_a_yaml_dictconfig_and_a_config(tmp_path):
    from_dict = InfluenceConfig.coerce({"task": "regression", "curvature": {"exclude": ["net.2"]},
                                        "output_dir": tmp_path})
    assert from_dict.curvature.exclude == ("net.2",) and from_dict.output_dir == str(tmp_path)
    yaml = OmegaConf.merge(OmegaConf.structured(InfluenceConfig),
                           OmegaConf.create("task: classification\ncurvature:\n  exclude: null\n  layers: [net.0]\nseed: 3\n"))
    from_yaml = InfluenceConfig.coerce(yaml)
    assert from_yaml.curvature.exclude == () and from_yaml.curvature.layers == ["net.0"] and from_yaml.seed == 3
    given = _config()
    assert InfluenceConfig.coerce(given) is given


@pytest.mark.parametrize("value,message", [
    ({"task": "classification", "on_train_end": "no"}, "on_train_end must be True or False, got 'no'"),
    ({"task": "classification", "nonsense": 1}, "unknown InfluenceConfig fields ['nonsense']"),
    ({"num_queries": 4}, "task is required"),
    (OmegaConf.structured(InfluenceConfig), "InfluenceConfig has a field without a value"),
    (["classification"], "expected an InfluenceConfig, a dict or an OmegaConf DictConfig of settings, got "
                         "['classification'] (list)"),
], ids=["invalid", "unknown", "no-task", "missing", "not-a-mapping"])
def test_coerce_refuses_naming_what_is_wrong(value, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        InfluenceConfig.coerce(value)


# -- fingerprint ---------------------------------------------------------------------------------------
def test_resume_fingerprint_holds_what_changes_the_statistics():
    assert _config(seed=5, **{"curvature.fisher": "true"}).resume_fingerprint() == {
        "task": "ClassificationTask", "strategy": "ekfac", "fisher": "true", "covariance_dtype": "float32",
        "loss_reduction": "mean", "window": "reset", "max_train_examples": None, "seed": 5}


# -- check_schedule ------------------------------------------------------------------------------------
RUN = dict(max_epochs=2, max_steps=None, saves_checkpoints=True, total_steps=24, steps_per_epoch=12)


def test_a_sound_schedule_has_nothing_to_say():
    assert _config().check_schedule(**RUN) == []
    assert _config(every_n_train_steps=8).check_schedule(**{**RUN, "max_epochs": -1, "max_steps": -1,
                                                            "total_steps": None, "steps_per_epoch": None}) == []


@pytest.mark.parametrize("changes,run,message", [
    (dict(every_n_epochs=3), dict(max_epochs=2),
     "every_n_epochs=3 never fires with max_epochs=2; lower it or set every_n_epochs=None"),
    (dict(every_n_epochs=None, every_n_train_steps=50), dict(max_steps=10),
     "every_n_train_steps=50 never fires with max_steps=10; lower it or set every_n_train_steps=None"),
    (dict(), dict(max_steps=4),
     "curvature.collect_every_n_steps=8 exceeds max_steps=4: only the first step would be collected; lower it"),
    (dict(every_n_epochs=None, on_train_end=False), dict(saves_checkpoints=False),
     "on_checkpoint is the only trigger but the trainer saves no checkpoints (no ModelCheckpoint); enable "
     "checkpointing or another trigger"),
    ({"curvature.collect_every_n_steps": 16}, dict(steps_per_epoch=6),
     "curvature.collect_every_n_steps=16 is more than the 6 optimizer steps between influence computations "
     "(every_n_epochs=1): some windows would hold no statistics; lower curvature.collect_every_n_steps"),
], ids=["epochs", "steps", "collect", "checkpoints", "empty-windows"])
def test_a_schedule_that_never_computes_is_refused(changes, run, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        _config(**changes).check_schedule(**{**RUN, **run})


def test_windows_are_judged_over_all_the_epochs_between_computations():
    """16 collections apart, every 2 epochs of 8 steps: every window holds a collected step;
    a moving average has no windows to empty."""
    every_16 = {"curvature.collect_every_n_steps": 16}
    assert _config(every_n_epochs=2, **every_16).check_schedule(**{**RUN, "steps_per_epoch": 8}) == []
    assert _config(**every_16, **{"curvature.ema_decay": 0.99}).check_schedule(**{**RUN, "steps_per_epoch": 6}) == []


def test_a_step_trigger_beyond_the_run_as_the_only_trigger_warns():
    collect_only = _config(every_n_epochs=None, every_n_train_steps=1000, on_checkpoint=False, on_train_end=False)
    assert collect_only.check_schedule(**{**RUN, "total_steps": 12}) == [
        "every_n_train_steps=1000 is more than the 12 optimizer steps of this run and no other trigger is enabled, "
        "so influence will never be computed; lower it or set on_train_end=True"]
    assert collect_only.check_schedule(**{**RUN, "total_steps": None}) == []  # length unknown: nothing to say
    assert collect_only.check_schedule(**{**RUN, "total_steps": 2000}) == []


@pytest.mark.parametrize("changes,when", [
    (dict(every_n_epochs=None), "the end of training"),
    (dict(every_n_epochs=None, every_n_train_steps=50), "every_n_train_steps=50 and the end of training"),
    (dict(every_n_epochs=None, every_n_train_steps=50, on_train_end=False), "every_n_train_steps=50"),
], ids=["train-end", "steps-and-end", "steps"])
def test_checkpoints_still_compute_without_every_n_epochs(changes, when):
    """every_n_epochs=None does not stop per-epoch computations while on_checkpoint=True and Lightning's
    default ModelCheckpoint saves every epoch: say so."""
    warnings = _config(**changes).check_schedule(**RUN)
    assert len(warnings) == 1 and warnings[0].startswith(
        "influence is also computed whenever a checkpoint is saved (on_checkpoint=True); set on_checkpoint=False "
        f"to compute only at {when} (every_n_epochs=None does not stop it")


@pytest.mark.parametrize("changes,run", [
    (dict(every_n_epochs=None, on_train_end=False), {}),  # checkpoints are the only trigger: clearly meant
    (dict(every_n_epochs=None), dict(saves_checkpoints=False)),
    (dict(every_n_epochs=None, on_checkpoint=False), {}),
], ids=["checkpoints-only", "no-checkpointing", "on-checkpoint-off"])
def test_no_checkpoint_warning_when_nothing_surprising(changes, run):
    assert _config(**changes).check_schedule(**{**RUN, **run}) == []

