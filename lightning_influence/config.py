"""``InfluenceConfig``: the callback's settings as dataclasses (OmegaConf / Hydra structured configs).

The common settings are flat fields; the advanced ones live in three groups, :class:`CurvatureConfig`,
:class:`ScoringConfig` and :class:`ReportConfig`, each handed whole to what uses it. The dataclass
mirrors the keyword arguments of ``InfluenceCallback`` (a test keeps them in sync), so the same
settings can come from Python, a LightningCLI YAML or a Hydra config. All validation lives here: each
group's ``validate()`` checks its own fields, :func:`check_combination` the rules across groups (the
one place the session and every integration call too), :meth:`InfluenceConfig.check_schedule` the
trigger rules that need the trainer's facts; every message names the field to change, a group's as
``<group>.<field>``. The flat settings of earlier releases are translated, with a ``FutureWarning``,
by :mod:`lightning_influence._deprecated`.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from typing import Any, ClassVar, Dict, List, Mapping, Optional, Tuple

import torch

from lightning_influence._checks import (
    _bound, _check_bools, _check_choice, _check_int, _is_dataset_or_loader, _is_name_list, _is_number, _is_text_path,
    _json_fields, _looks_like_task, _shown,
)
from lightning_influence._deprecated import regroup
from lightning_influence.engine.approximations import approximation, approximation_names
from lightning_influence.engine.factors import FISHER_KINDS, check_damping
from lightning_influence.engine.freshness import REFRESH
from lightning_influence.tasks import CausalLMTask, ClassificationTask, RegressionTask, Task

LOSS_REDUCTIONS = ("mean", "sum", "token_mean")
REPORT_MODES = ("background", "foreground", "off")
COVARIANCE_DTYPES = ("float32", "float64")
EIGENBASIS_DTYPES = ("float64", "float32", "bfloat16")
QUERY_SPLITS = ("val", "test")
ON_ERROR = ("warn", "raise")
# Built-in tasks a config may name by a string (a YAML file cannot hold a Task instance); the one
# mapping the callback and the CLI resolve names with.
BUILTIN_TASKS = {"classification": ClassificationTask, "regression": RegressionTask, "causal_lm": CausalLMTask}
# torch.Generator.manual_seed takes up to 2**64 - 1; seeds derived from `seed` add the step and
# 7919 x the process rank, so the seed itself stays far below that.
SEED_LIMIT = 2**62


class _SettingsGroup:
    """What every settings group shares: building it from what a user or a YAML file hands over."""

    group: ClassVar[str]  # the group's argument name ("curvature", ...), used in messages

    @classmethod
    def coerce(cls, value: Any) -> Any:
        """From ``None`` (the defaults), an instance, a dict or a ``DictConfig``; not validated."""
        return _group_from(cls, value, cls.group)


def _group_from(cls: Any, value: Any, where: str) -> Any:
    """A group from ``None`` (its defaults), an instance, a dict or an OmegaConf ``DictConfig`` (unknown keys raise)."""
    if value is None:
        return cls()
    if isinstance(value, cls):
        return value
    try:
        from omegaconf import DictConfig, OmegaConf

        if isinstance(value, DictConfig):
            value = OmegaConf.to_container(value, resolve=True)
    except ImportError:  # pragma: no cover - omegaconf is a dependency
        pass
    if not isinstance(value, Mapping):
        raise ValueError(f"{where} must be a {cls.__name__}, a dict of its fields or None (the defaults), "
                         f"got {_shown(value)}")
    known = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(value) - set(known))
    if unknown:
        raise ValueError(f"unknown {where} fields {unknown}; known: {known}")
    return cls(**value)


@dataclass
class CurvatureConfig(_SettingsGroup):
    """How the curvature is estimated: statistics collected during training, factors at each computation.

    Args:
        strategy: ``"ekfac"``, ``"kfac"``, ``"diagonal"`` or ``"identity"``.
        fisher: ``"empirical"`` (training targets; free) or ``"true"`` (sampled targets; one
            extra backward per collected step).
        damping: absolute λ, or ``None`` for 0.1 × each layer's mean eigenvalue.
        layers: module names / glob patterns to track (default: every trackable layer).
        exclude: names / patterns to leave out.
        collect_every_n_steps: collect statistics on every n-th optimizer step. With the default
            (8) and ``max_tokens_per_step=512`` a small transformer trains about 5% slower
            (``benchmarks/training_overhead.py``); collecting every step costs about 2x.
        max_tokens_per_step: at most this many token positions per layer and training batch (a
            random subset; ``None``: all).
        loss_reduction: how the training loss reduces examples: ``"mean"`` (over examples),
            ``"sum"``, or ``"token_mean"`` (over the tokens that count in the loss).
        ema_decay: ``None``: the statistics describe the steps since the last computation (reset
            after each); a decay in (0, 1): an exponential moving average with that decay per
            collected step.
        correction_batches: batches of the pool in the EK-FAC eigenvalue-correction pass at each
            computation (``None``: the whole pool).
        refresh: at each computation the correction pass also gathers fresh covariances at the
            scored weights and measures, per layer, how stale the training-time ones are
            (``meta["curvature"]``, logged as ``curvature_staleness``). ``"auto"``: a layer whose
            training basis describes the fresh covariances worse than a basis from half of them
            gets their eigenbasis and a second correction pass; ``"always"``: every layer;
            ``"never"``: none. See ``lightning_influence.engine.freshness``.
        covariance_dtype: ``"float32"`` (default, also under bf16/fp16 training) or ``"float64"``.
        statistics_device: where the covariance statistics are accumulated and decomposed
            (``"cpu"``: off the GPU; default ``None``: the tracked modules' device).
        eigenbasis_dtype: dtype of the stored eigenbases: ``"float64"`` (default), ``"float32"``
            or ``"bfloat16"`` (half or a quarter of the factors' memory).
        max_layer_mb: skip, with a warning, layers whose statistics exceed this many MiB.
        memory_budget_mb: refuse before training a selection whose statistics exceed this.
        shard_factors: under DDP or FSDP, each layer's statistics, eigenbases and preconditioned
            queries live on one process (balanced by size): factor memory per process about
            ``1/world``, the same scores; needs ``strategy`` ``"ekfac"`` or ``"kfac"`` and a file
            system shared by the processes; no ``scoring.self_influence`` or ``scoring.ledger``.
        shard_statistics: with ``shard_factors``, the training-time statistics too: each process
            accumulates only the layers it owns, from its own batches (the scores then differ a
            little from the replicated run's).
    """

    group: ClassVar[str] = "curvature"

    strategy: str = "ekfac"
    fisher: str = "empirical"
    damping: Optional[float] = None
    layers: Optional[List[str]] = None
    exclude: Optional[Tuple[str, ...]] = ()  # None (YAML null): nothing excluded
    collect_every_n_steps: int = 8
    max_tokens_per_step: Optional[int] = 512
    loss_reduction: str = "mean"
    ema_decay: Optional[float] = None
    correction_batches: Optional[int] = 16
    refresh: str = "auto"
    covariance_dtype: str = "float32"
    statistics_device: Optional[str] = None
    eigenbasis_dtype: str = "float64"
    max_layer_mb: Optional[float] = None
    memory_budget_mb: Optional[float] = None
    shard_factors: bool = False
    shard_statistics: bool = False

    def validate(self) -> "CurvatureConfig":
        """Raise ``ValueError`` naming the first invalid field (``curvature.<field>``); normalise
        ``exclude`` to a tuple and ``layers`` to a list; return ``self``."""
        _check_choice("curvature.strategy", self.strategy, approximation_names())
        _check_choice("curvature.fisher", self.fisher, tuple(k for k in FISHER_KINDS if k != "exact"),
                      hint="('exact' needs one backward per output dimension; use it offline with fit_factors)")
        _check_choice("curvature.loss_reduction", self.loss_reduction, LOSS_REDUCTIONS)
        _check_choice("curvature.refresh", self.refresh, REFRESH)
        _check_choice("curvature.covariance_dtype", self.covariance_dtype, COVARIANCE_DTYPES)
        _check_choice("curvature.eigenbasis_dtype", self.eigenbasis_dtype, EIGENBASIS_DTYPES)
        if self.statistics_device is not None:
            try:
                torch.device(self.statistics_device)
            except (RuntimeError, TypeError):
                raise ValueError(f"curvature.statistics_device must be a device name such as 'cpu' or 'cuda:0', or "
                                 f"None (the tracked modules' device), got {_shown(self.statistics_device)}") from None
        _check_int("curvature.collect_every_n_steps", self.collect_every_n_steps, minimum=1)
        for name in ("max_tokens_per_step", "correction_batches"):
            if getattr(self, name) is not None:
                _check_int(f"curvature.{name}", getattr(self, name), minimum=1)
        if self.damping is not None:
            check_damping(self.damping, "curvature.damping")
        if self.ema_decay is not None and not (_is_number(self.ema_decay) and 0 < self.ema_decay < 1):
            raise ValueError(f"curvature.ema_decay must be in (0, 1), or None for statistics reset after each "
                             f"computation, got {_shown(self.ema_decay)}")
        for name in ("max_layer_mb", "memory_budget_mb"):
            value = getattr(self, name)
            if value is not None and not (_is_number(value) and 0 < value < math.inf):
                raise ValueError(f"curvature.{name} must be a finite positive number of MiB or None, "
                                 f"got {_shown(value)}")
        if self.layers is not None and not _is_name_list(self.layers):
            raise ValueError(f"curvature.layers must be a list of module names or glob patterns, "
                             f"got {_shown(self.layers)}")
        if self.exclude is not None and not _is_name_list(self.exclude):
            raise ValueError(f"curvature.exclude must be a list of module names or glob patterns, "
                             f"got {_shown(self.exclude)}")
        if self.layers is not None and not self.layers:
            raise ValueError("curvature.layers is empty: give module names or patterns, or None for every "
                             "trackable layer")
        _check_bools("curvature", self, ("shard_factors", "shard_statistics"))
        if self.shard_statistics and not self.shard_factors:
            raise ValueError("curvature.shard_statistics needs curvature.shard_factors=True (the statistics are "
                             "collected by the processes that own the factors); set both")
        self.exclude = () if self.exclude is None else tuple(self.exclude)  # YAML `exclude: null`: nothing excluded
        if self.layers is not None:
            self.layers = list(self.layers)
        return self

    @property
    def window(self) -> str:
        """``"reset"`` or ``"ema"``: what the statistics' window is called in checkpoints and the collector."""
        return "reset" if self.ema_decay is None else "ema"



@dataclass
class ScoringConfig(_SettingsGroup):
    """What is scored at each computation, and what is kept.

    Args:
        max_train_examples: score a fixed random subset of this many pool examples (chosen once,
            kept across checkpoints and resumes; at most the pool's size); of a streaming pool, its
            first this many items.
        query_rank: rank of the low-rank query approximation (``None``: exact; the paper used 32).
        top_k: per query, the most positive / negative examples kept with per-token scores and
            shown in tables; also the k of the top-k monitors (``drift/topk_churn@<k>``). ``0`` (an
            :class:`~lightning_influence.InfluenceSession` only): no top examples and no per-token pass.
        keep_top_scores: keep per query only this many most positive and most negative scores
            (with their ids) and a sketch of the rest instead of every score ``[Q, N]``, for pools
            too large for that (``None``: every score). At least ``top_k``.
        pool_id_key: a streaming pool (an ``IterableDataset`` as ``train_data``) yields mappings
            holding a stable integer id under this key; the result's ``train_ids`` are those ids.
        batch_size: batch size of the callback's own passes.
        self_influence: also score each pool example on itself at every computation (mislabel and
            memorisation candidates): ``result.self_scores``, a logged table and ``influence/self/*``.
        ledger: ``None``: off. Otherwise, on each collected step, score the batch against the
            queries preconditioned at the last computation, weighted by the learning rate
            (TracIn-style), stored with the next result as ``ledger_ids`` / ``ledger_scores``, with
            the queries projected onto this many shared directions per layer and side (bounding
            the per-step cost whatever the number of queries); ``0``: the queries themselves
            (exact, slower). Lightning callback only.
    """

    group: ClassVar[str] = "scoring"

    max_train_examples: Optional[int] = None
    query_rank: Optional[int] = None
    top_k: int = 10
    keep_top_scores: Optional[int] = None
    pool_id_key: str = "id"
    batch_size: int = 32
    self_influence: bool = False
    ledger: Optional[int] = None

    def validate(self) -> "ScoringConfig":
        """Raise ``ValueError`` naming the first invalid field (``scoring.<field>``); return ``self``."""
        _check_int("scoring.top_k", self.top_k, minimum=0)  # 0: no top examples (no per-token pass)
        _check_int("scoring.batch_size", self.batch_size, minimum=1)
        for name in ("max_train_examples", "query_rank", "keep_top_scores"):
            if getattr(self, name) is not None:
                _check_int(f"scoring.{name}", getattr(self, name), minimum=1)
        if self.ledger is not None:
            _check_int("scoring.ledger", self.ledger, minimum=0)
        if self.keep_top_scores is not None and self.keep_top_scores < self.top_k:
            raise ValueError(f"scoring.keep_top_scores={self.keep_top_scores} is smaller than scoring.top_k="
                             f"{self.top_k}: the top examples are taken from the kept scores; raise keep_top_scores "
                             "or lower top_k")
        if not (isinstance(self.pool_id_key, str) and self.pool_id_key):
            raise ValueError(f"scoring.pool_id_key must be a non-empty string (the key of a streaming pool item's "
                             f"integer id), got {_shown(self.pool_id_key)}")
        _check_bools("scoring", self, ("self_influence",))
        return self

    @property
    def ledger_subspace(self) -> Optional[int]:
        """The ledger's shared directions per layer and side (``None``: exact)."""
        return self.ledger or None



@dataclass
class ReportConfig(_SettingsGroup):
    """What happens with each result once saved.

    Args:
        mode: ``"background"``: analyse the result, write its figures and summary to
            ``<result>/report`` on a worker thread (training resumes as soon as the scores are
            computed) and log it to the trainer's loggers once complete (on the training thread,
            in step order; all of them by the end of training); ``"foreground"``: the same before
            training resumes; ``"off"``: no report.
        log_artifacts: log each result directory as a W&B artifact.
        renderer: shows examples in logged tables (see ``ResultPublisher``).
        show_progress: progress bars for the callback's passes (rank 0); ``None``: as the loop
            shows its own (a Lightning Trainer's ``enable_progress_bar``, Hugging Face's
            ``disable_tqdm``; shown under Fabric).
    """

    group: ClassVar[str] = "report"

    mode: str = "background"
    log_artifacts: bool = True
    renderer: Any = None
    show_progress: Optional[bool] = None

    def validate(self) -> "ReportConfig":
        """Raise ``ValueError`` naming the first invalid field (``report.<field>``); return ``self``."""
        _check_choice("report.mode", self.mode, REPORT_MODES)
        _check_bools("report", self, ("log_artifacts",))
        if self.show_progress is not None:
            _check_bools("report", self, ("show_progress",), hint=" or None (as the training loop shows its own)")
        if self.renderer is not None and not callable(getattr(self.renderer, "render", self.renderer)):
            raise ValueError(f"report.renderer must be callable or have a render() method, got {_shown(self.renderer)}")
        return self



def check_combination(curvature: CurvatureConfig, scoring: ScoringConfig) -> None:
    """The rules across groups, in this one place (the config, the session and every integration call it):
    sharded factors need a strategy that shards and exclude what needs every layer on every process."""
    if not curvature.shard_factors:
        return
    if not approximation(curvature.strategy).can_shard:
        raise ValueError(f"curvature.shard_factors needs curvature.strategy 'ekfac' or 'kfac' (got "
                         f"{curvature.strategy!r}); set curvature.shard_factors=False")
    for name, on in (("self_influence", scoring.self_influence), ("ledger", scoring.ledger is not None)):
        if on:
            off = "False" if name == "self_influence" else "None"
            raise ValueError(f"scoring.{name} needs every layer's factors on every process; set scoring.{name}={off} "
                             "or curvature.shard_factors=False")


# how check_resumable's message names the fingerprint's keys (kept flat: older checkpoints store them so)
RESUME_KEY_NAMES = {"strategy": "curvature.strategy", "fisher": "curvature.fisher",
                    "covariance_dtype": "curvature.covariance_dtype", "loss_reduction": "curvature.loss_reduction",
                    "window": "curvature.ema_decay's window", "max_train_examples": "scoring.max_train_examples"}


@dataclass
class InfluenceConfig:
    """Settings of :class:`~lightning_influence.InfluenceCallback`: the common ones flat, the advanced
    ones in three groups (:class:`CurvatureConfig`, :class:`ScoringConfig`, :class:`ReportConfig`).

    ``task`` may be a :class:`~lightning_influence.Task` or the name of a built-in task
    (``"classification"``, ``"regression"``, ``"causal_lm"``); ``query_data`` and ``train_data``
    may be datasets only when built in Python (a YAML file uses ``"val"`` / ``"test"`` and the
    trainer's training data). Dtypes are strings.

    Args:
        task: a :class:`~lightning_influence.Task` (or ``"classification"``, ``"regression"``,
            ``"causal_lm"``): the per-example loss and the query measurement.
        query_data: a Dataset or DataLoader of queries, or ``"val"`` / ``"test"`` for the first
            ``num_queries`` examples of the trainer's validation / test data.
        num_queries: how many examples ``"val"`` / ``"test"`` contribute.
        train_data: candidate pool (a map-style Dataset or DataLoader, or a streaming
            ``IterableDataset`` of dicts carrying an integer id under ``scoring.pool_id_key``);
            default: the trainer's training dataset. Example ids are indices into it.
        every_n_epochs: compute influence at the end of every n-th epoch (``None``: never).
        every_n_train_steps: compute influence every n optimizer steps (``None``: never).
        on_checkpoint: compute influence whenever a checkpoint is saved, and record its path.
        on_train_end: compute influence at the end of training.
        output_dir: where results go (``<output_dir>/step=<N>/``); default
            ``<trainer.log_dir>/influence``.
        seed: seed of every private random generator (pool subset, sampled targets, token subsets).
        on_error: ``"warn"`` (a failing computation is reported and training goes on) or ``"raise"``.
        curvature: :class:`CurvatureConfig` (or a dict of its fields).
        scoring: :class:`ScoringConfig` (or a dict of its fields).
        report: :class:`ReportConfig` (or a dict of its fields).
    """

    task: Any
    query_data: Any = "val"
    num_queries: int = 64
    train_data: Any = None
    every_n_epochs: Optional[int] = 1
    every_n_train_steps: Optional[int] = None
    on_checkpoint: bool = True
    on_train_end: bool = True
    output_dir: Optional[str] = None
    seed: int = 0
    on_error: str = "warn"
    curvature: CurvatureConfig = field(default_factory=CurvatureConfig)
    scoring: ScoringConfig = field(default_factory=ScoringConfig)
    report: ReportConfig = field(default_factory=ReportConfig)

    def __post_init__(self) -> None:
        self.with_groups()

    def validate(self) -> "InfluenceConfig":
        """Raise ``ValueError`` naming the first invalid field (a group's as ``<group>.<field>``); return ``self``.

        Each group validates its own fields; the rules across groups are :func:`check_combination`.
        Groups given as dicts become their dataclasses. Once valid, equivalent spellings are normalised
        in place (a ``Path`` ``output_dir`` to ``str``, ``exclude=None`` or a list to a tuple, ``layers``
        to a list), so YAML and Python settings compare equal. Nothing else is coerced: ``"no"`` is
        not ``False`` and ``2.0`` is not ``2``.
        """
        self.curvature = CurvatureConfig.coerce(self.curvature)
        self.scoring = ScoringConfig.coerce(self.scoring)
        self.report = ReportConfig.coerce(self.report)
        _check_choice("on_error", self.on_error, ON_ERROR)
        self._check_task()
        self._check_data()
        _check_int("num_queries", self.num_queries, minimum=1)
        if self.scoring.top_k == 0:
            raise ValueError("scoring.top_k must be at least 1 in a training loop: its reports and monitors show "
                             "each query's top examples (scoring.top_k=0, no top examples, is for InfluenceSession)")
        for name in ("every_n_epochs", "every_n_train_steps"):
            if getattr(self, name) is not None:
                _check_int(name, getattr(self, name), minimum=1)
        _check_int("seed", self.seed, minimum=0)
        if self.seed >= SEED_LIMIT:
            raise ValueError(f"seed must be below 2**62 (derived seeds add the step and the process rank and must "
                             f"still fit torch.Generator.manual_seed), got {self.seed!r}")
        _check_bools("", self, ("on_checkpoint", "on_train_end"))
        if self.output_dir is not None and not _is_text_path(self.output_dir):
            raise ValueError(f"output_dir must be a path (str or os.PathLike) or None (the trainer's log directory), "
                             f"got {_shown(self.output_dir)}")
        self.curvature.validate()
        self.scoring.validate()
        self.report.validate()
        check_combination(self.curvature, self.scoring)
        if not (self.every_n_epochs or self.every_n_train_steps or self.on_checkpoint or self.on_train_end):
            raise ValueError(
                "no trigger is enabled, so influence would never be computed: set every_n_epochs, "
                "every_n_train_steps, on_checkpoint=True or on_train_end=True"
            )
        steps, collect = self.every_n_train_steps, self.curvature.collect_every_n_steps
        if self.curvature.ema_decay is None and steps and steps < collect:
            raise ValueError(
                f"every_n_train_steps={steps} is smaller than curvature.collect_every_n_steps="
                f"{collect}: some windows would hold no statistics; collect more often"
            )
        if self.output_dir is not None:
            self.output_dir = os.fspath(self.output_dir)
        return self

    def _check_task(self) -> None:
        task = self.task
        if isinstance(task, str):
            _check_choice("task", task, tuple(BUILTIN_TASKS))
        elif isinstance(task, type) and _looks_like_task(task):
            raise ValueError(f"task is the class {task.__name__}, not a task; pass an instance: {task.__name__}()")
        elif not _looks_like_task(task):
            raise ValueError(f"task must be a lightning_influence.Task or one of {tuple(BUILTIN_TASKS)}, "
                             f"got {_shown(task)}")

    def _check_data(self) -> None:
        if isinstance(self.query_data, str):
            _check_choice("query_data", self.query_data, QUERY_SPLITS,
                          hint="(or pass a Dataset / DataLoader of queries)")
        elif not _is_dataset_or_loader(self.query_data):
            raise ValueError("query_data must be 'val', 'test', a Dataset or a DataLoader, "
                             f"got {_shown(self.query_data)}")
        if isinstance(self.train_data, str):
            raise ValueError(f"train_data={self.train_data!r} is a string, but train_data takes data, not a "
                             "split name: leave it None to score the trainer's training data, or pass a Dataset "
                             "or a DataLoader")
        if self.train_data is not None and not _is_dataset_or_loader(self.train_data):
            raise ValueError(f"train_data must be None (the trainer's training data), a Dataset or a DataLoader, "
                             f"got {_shown(self.train_data)}")

    def build_task(self) -> Task:
        """The task instance: the one given, or a new instance of the built-in task named (call once)."""
        return BUILTIN_TASKS[self.task]() if isinstance(self.task, str) else self.task

    def check_schedule(self, *, max_epochs: Optional[int], max_steps: Optional[int], saves_checkpoints: bool,
                       total_steps: Optional[int] = None, steps_per_epoch: Optional[int] = None) -> List[str]:
        """Raise ``ValueError`` for a schedule that can never compute influence (or would compute from empty
        windows); return warning messages for schedules that only may.

        The trigger rules that need facts about the run, for the callback to call once the trainer is
        known. ``max_epochs`` / ``max_steps``: the trainer's bounds (``None`` or Lightning's ``-1`` when
        unbounded); ``saves_checkpoints``: the trainer has a checkpoint callback; ``total_steps``: the
        run's optimizer steps when known; ``steps_per_epoch``: optimizer steps per epoch when known (at
        least 1: Lightning steps at the end of an epoch shorter than the gradient accumulation).
        """
        max_epochs, max_steps = _bound(max_epochs), _bound(max_steps)
        if self.every_n_epochs and max_epochs is not None and self.every_n_epochs > max_epochs:
            raise ValueError(f"every_n_epochs={self.every_n_epochs} never fires with max_epochs={max_epochs}; "
                             "lower it or set every_n_epochs=None")
        if self.every_n_train_steps and max_steps is not None and self.every_n_train_steps > max_steps:
            raise ValueError(f"every_n_train_steps={self.every_n_train_steps} never fires with max_steps={max_steps}; "
                             "lower it or set every_n_train_steps=None")
        collect = self.curvature.collect_every_n_steps
        if collect > 1 and max_steps is not None and collect > max_steps:
            raise ValueError(f"curvature.collect_every_n_steps={collect} exceeds max_steps={max_steps}: "
                             "only the first step would be collected; lower it")
        others = self._triggers_besides_checkpoints()
        if not others and not saves_checkpoints:
            raise ValueError("on_checkpoint is the only trigger but the trainer saves no checkpoints "
                             "(no ModelCheckpoint); enable checkpointing or another trigger")
        if self.every_n_epochs and self.curvature.ema_decay is None and steps_per_epoch:
            steps = steps_per_epoch * self.every_n_epochs
            if steps < collect:
                raise ValueError(
                    f"curvature.collect_every_n_steps={collect} is more than the {steps} optimizer steps "
                    f"between influence computations (every_n_epochs={self.every_n_epochs}): some windows would hold "
                    "no statistics; lower curvature.collect_every_n_steps"
                )
        warnings = []
        checkpoints_compute = self.on_checkpoint and saves_checkpoints
        if (self.every_n_train_steps and not self.every_n_epochs and not self.on_train_end and not checkpoints_compute
                and total_steps is not None and self.every_n_train_steps > total_steps):
            warnings.append(f"every_n_train_steps={self.every_n_train_steps} is more than the {total_steps} optimizer "
                            "steps of this run and no other trigger is enabled, so influence will never be "
                            "computed; lower it or set on_train_end=True")
        if self.every_n_epochs is None and checkpoints_compute and others:
            warnings.append("influence is also computed whenever a checkpoint is saved (on_checkpoint=True); set "
                            f"on_checkpoint=False to compute only at {' and '.join(others)} (every_n_epochs=None does "
                            "not stop it: a ModelCheckpoint that saves every epoch, as Lightning's default does, "
                            "triggers a computation every epoch)")
        return warnings

    def _triggers_besides_checkpoints(self) -> List[str]:
        """The enabled triggers other than on_checkpoint, in words."""
        found = []
        if self.every_n_epochs:
            found.append(f"every_n_epochs={self.every_n_epochs}")
        if self.every_n_train_steps:
            found.append(f"every_n_train_steps={self.every_n_train_steps}")
        if self.on_train_end:
            found.append("the end of training")
        return found

    def check_resumable(self, saved: Mapping[str, Any]) -> None:
        """Refuse resuming statistics collected under other settings (``saved``: the checkpoint's
        :meth:`resume_fingerprint`), naming each setting that differs."""
        differ = {k: (saved.get(k), v) for k, v in self.resume_fingerprint().items() if saved.get(k) != v}
        if differ:
            listing = ", ".join(f"{RESUME_KEY_NAMES.get(k, k)}: checkpoint {a!r} vs now {b!r}"
                                for k, (a, b) in differ.items())
            raise ValueError(
                f"the checkpoint's influence statistics were collected with a different configuration ({listing}); "
                "resume with the same InfluenceCallback settings, or start a new run"
            )

    def resume_fingerprint(self) -> Dict[str, Any]:
        """The settings that change what the collected statistics mean: a resumed run must match them
        (compared key by key, so the message names what differs)."""
        task_class = BUILTIN_TASKS[self.task] if isinstance(self.task, str) else type(self.task)
        curvature = self.curvature
        # the keys of the flat settings of earlier releases: their checkpoints still resume
        return {"task": task_class.__name__, "strategy": curvature.strategy, "fisher": curvature.fisher,
                "covariance_dtype": curvature.covariance_dtype, "loss_reduction": curvature.loss_reduction,
                "window": curvature.window, "max_train_examples": self.scoring.max_train_examples, "seed": self.seed}

    def to_dict(self) -> Dict[str, Any]:
        """JSON-friendly settings, each group a dict (objects such as datasets and tasks by their class
        name); what results record as ``meta["config"]``."""
        return _json_fields(self)

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> "InfluenceConfig":
        """From a dict or an OmegaConf ``DictConfig`` (unknown keys raise, naming them); not validated."""
        try:
            from omegaconf import DictConfig, OmegaConf
            from omegaconf.errors import MissingMandatoryValue

            if isinstance(values, DictConfig):
                try:
                    values = OmegaConf.to_container(values, resolve=True, throw_on_missing=True)
                except MissingMandatoryValue as err:
                    raise ValueError(f"InfluenceConfig has a field without a value ({err}); set it") from None
        except ImportError:  # pragma: no cover - omegaconf is a dependency
            pass
        if not isinstance(values, Mapping):
            raise ValueError(f"expected an InfluenceConfig, a dict or an OmegaConf DictConfig of settings, "
                             f"got {_shown(values)}")
        values = regroup(values, "InfluenceConfig", stacklevel=4)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown InfluenceConfig fields {unknown}; known: {sorted(known)}")
        if "task" not in values:
            raise ValueError(f"task is required: a lightning_influence.Task or one of {tuple(BUILTIN_TASKS)}")
        return cls(**values)

    def with_groups(self) -> "InfluenceConfig":
        """``self`` with groups given as dicts or ``DictConfig`` made their dataclasses (not validated)."""
        self.curvature = CurvatureConfig.coerce(self.curvature)
        self.scoring = ScoringConfig.coerce(self.scoring)
        self.report = ReportConfig.coerce(self.report)
        return self

    @classmethod
    def coerce(cls, value: Any) -> "InfluenceConfig":
        """A validated config from an :class:`InfluenceConfig` (validated in place), a dict or a ``DictConfig``."""
        config = value if isinstance(value, cls) else cls.from_mapping(value)
        return config.validate()
