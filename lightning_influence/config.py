"""``InfluenceConfig``: the callback's settings as a dataclass (OmegaConf / Hydra structured config).

The dataclass mirrors the keyword arguments of ``InfluenceCallback`` one to one (a test keeps them
in sync), so the same settings can come from Python, a LightningCLI YAML or a Hydra config. All
validation lives here: :meth:`InfluenceConfig.validate` is what ``InfluenceCallback.__init__``
runs, :meth:`InfluenceConfig.check_schedule` the trigger rules that need the trainer's facts, and
every message names the field to change.
"""

from __future__ import annotations

import dataclasses
import math
import os
import reprlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch
from torch.utils.data import DataLoader

from lightning_influence.engine.approximations import approximation_names
from lightning_influence.engine.factors import FISHER_KINDS, check_damping
from lightning_influence.engine.freshness import REFRESH
from lightning_influence.tasks import CausalLMTask, ClassificationTask, RegressionTask, Task

LOSS_REDUCTIONS = ("mean", "sum", "token_mean")
WINDOWS = ("reset", "ema")
COVARIANCE_DTYPES = ("float32", "float64")
EIGENBASIS_DTYPES = ("float64", "float32", "bfloat16")
QUERY_SPLITS = ("val", "test")
ON_ERROR = ("warn", "raise")
BOOL_FIELDS = ("on_checkpoint", "on_train_end", "self_influence", "ledger", "report", "report_in_background",
               "log_artifacts", "show_progress", "shard_factors", "shard_statistics")
# Built-in tasks a config may name by a string (a YAML file cannot hold a Task instance); the one
# mapping the callback and the CLI resolve names with.
BUILTIN_TASKS = {"classification": ClassificationTask, "regression": RegressionTask, "causal_lm": CausalLMTask}
# torch.Generator.manual_seed takes up to 2**64 - 1; seeds derived from `seed` add the step and
# 7919 x the process rank, so the seed itself stays far below that.
SEED_LIMIT = 2**62


@dataclass
class InfluenceConfig:
    """Settings of :class:`~lightning_influence.InfluenceCallback`, one field per keyword argument.

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
            ``IterableDataset`` of dicts carrying an integer id under ``pool_id_key``); default: the
            trainer's training dataset. Example ids are indices into it.
        every_n_epochs: compute influence at the end of every n-th epoch (``None``: never).
        every_n_train_steps: compute influence every n optimizer steps (``None``: never).
        on_checkpoint: compute influence whenever a checkpoint is saved, and record its path.
        on_train_end: compute influence at the end of training.
        output_dir: where results go (``<output_dir>/step=<N>/``); default
            ``<trainer.log_dir>/influence``.
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
        window: ``"reset"``: statistics describe the steps since the last computation;
            ``"ema"``: an exponential moving average with ``ema_decay`` per collected step.
        ema_decay: decay of the moving average.
        correction_batches: batches of the pool in the EK-FAC eigenvalue-correction pass at each
            computation (``None``: the whole pool).
        curvature_refresh: at each computation the correction pass also gathers fresh covariances
            at the scored weights and measures, per layer, how stale the training-time ones are
            (``meta["curvature"]``, logged as ``curvature_staleness``). ``"auto"``: a layer whose
            training basis describes the fresh covariances worse than a basis from half of them
            gets their eigenbasis and a second correction pass; ``"always"``: every layer (the
            refit on the correction examples); ``"never"``: none. See ``lightning_influence.engine.freshness``.
        max_train_examples: score a fixed random subset of this many pool examples (chosen once,
            kept across checkpoints and resumes; at most the pool's size); of a streaming pool, its
            first this many items.
        seed: seed of every private random generator.
        query_rank: rank of the low-rank query approximation (``None``: exact; the paper used 32).
        top_k: per query, the most positive / negative examples kept with per-token scores and
            shown in tables; also the k of the top-k monitors (``drift/topk_churn@<k>``).
        keep_top_scores: keep per query only this many most positive and most negative scores
            (with their ids) and a sketch of the rest (exact sums, a log-magnitude histogram)
            instead of every score ``[Q, N]``, for pools too large for that (``None``: every score).
            At least ``top_k``. See ``lightning_influence.analysis.sketch``.
        pool_id_key: a streaming pool (an ``IterableDataset`` as ``train_data``) yields mappings
            holding a stable integer id under this key; the result's ``train_ids`` are those ids.
        self_influence: also score each pool example on itself at every computation (mislabel and
            memorisation candidates): ``result.self_scores``, a logged table and ``influence/self/*``.
        ledger: on each collected step, score the batch against the queries preconditioned at the
            last computation, weighted by the learning rate (TracIn-style); stored with the next
            result as ``ledger_ids`` / ``ledger_scores`` (see ``lightning_influence.loops.ledger``).
        ledger_subspace: the ledger scores with its queries projected onto this many shared
            directions per layer and side, which bounds its per-step cost whatever the number of
            queries (``None``: the queries themselves, exact and slower).
        batch_size: batch size of the callback's own passes.
        renderer: shows examples in logged tables (see ``ResultPublisher``).
        max_layer_mb: skip, with a warning, layers whose statistics exceed this many MiB.
        memory_budget_mb: refuse before training a selection whose statistics exceed this.
        covariance_dtype: ``"float32"`` (default, also under bf16/fp16 training) or ``"float64"``.
        statistics_device: where the covariance statistics are accumulated and decomposed
            (``"cpu"``: off the GPU; default ``None``: the tracked modules' device).
        eigenbasis_dtype: dtype of the stored eigenbases: ``"float64"`` (default), ``"float32"``
            or ``"bfloat16"`` (half or a quarter of the factors' memory; accuracy cost in the benchmarks).
        shard_factors: under DDP or FSDP, each layer's statistics, eigenbases and preconditioned queries
            live on one process (balanced by size): factor memory per process about ``1/world``,
            the same scores; factors are saved one file per process (needs a file system shared by
            the processes, and ``strategy`` ``"ekfac"`` or ``"kfac"``; no ``self_influence`` or ``ledger``).
        shard_statistics: with ``shard_factors``, the training-time statistics too: each process
            accumulates only the layers it owns, from its own batches (memory per process about
            ``1/world``, no communication; each layer's covariances then come from ``1/world`` of
            the training batches, so the scores differ a little from the replicated run's).
        report: after saving each result, analyse it, write its figures and summary to
            ``<result>/report`` and log it to the trainer's loggers (``ResultPublisher``).
        report_in_background: draw the report's figures and write its files on a worker thread,
            so training resumes as soon as the scores are computed; the loggers get each report
            (on the training thread, in step order) once complete, and all of them by the end of
            training. ``False``: publish before training resumes.
        log_artifacts: log each result directory as a W&B artifact.
        show_progress: progress bars for the callback's passes (rank 0).
        on_error: ``"warn"`` (a failing computation is reported and training goes on) or
            ``"raise"``.
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
    strategy: str = "ekfac"
    fisher: str = "empirical"
    damping: Optional[float] = None
    layers: Optional[List[str]] = None
    exclude: Optional[Tuple[str, ...]] = ()  # None (YAML null): nothing excluded
    collect_every_n_steps: int = 8
    max_tokens_per_step: Optional[int] = 512
    loss_reduction: str = "mean"
    window: str = "reset"
    ema_decay: float = 0.99
    correction_batches: Optional[int] = 16
    curvature_refresh: str = "auto"
    max_train_examples: Optional[int] = None
    seed: int = 0
    query_rank: Optional[int] = None
    top_k: int = 10
    keep_top_scores: Optional[int] = None
    pool_id_key: str = "id"
    self_influence: bool = False
    ledger: bool = False
    ledger_subspace: Optional[int] = 32
    batch_size: int = 32
    renderer: Any = None
    max_layer_mb: Optional[float] = None
    memory_budget_mb: Optional[float] = None
    covariance_dtype: str = "float32"
    statistics_device: Optional[str] = None
    eigenbasis_dtype: str = "float64"
    shard_factors: bool = False
    shard_statistics: bool = False
    report: bool = True
    report_in_background: bool = True
    log_artifacts: bool = True
    show_progress: bool = True
    on_error: str = "warn"

    def validate(self) -> "InfluenceConfig":
        """Raise ``ValueError`` naming the first invalid field; return ``self``.

        Once valid, equivalent spellings are normalised in place (a ``Path`` ``output_dir`` to ``str``,
        ``exclude=None`` or a list to a tuple, ``layers`` to a list), so YAML and Python settings
        compare equal. Nothing else is coerced: ``"no"`` is not ``False`` and ``2.0`` is not ``2``.
        """
        _check_choice("strategy", self.strategy, approximation_names())
        _check_choice("fisher", self.fisher, tuple(k for k in FISHER_KINDS if k != "exact"),
                      hint="('exact' needs one backward per output dimension; use it offline with fit_factors)")
        _check_choice("loss_reduction", self.loss_reduction, LOSS_REDUCTIONS)
        _check_choice("window", self.window, WINDOWS)
        _check_choice("curvature_refresh", self.curvature_refresh, REFRESH)
        _check_choice("covariance_dtype", self.covariance_dtype, COVARIANCE_DTYPES)
        _check_choice("eigenbasis_dtype", self.eigenbasis_dtype, EIGENBASIS_DTYPES)
        self._check_statistics_device()
        _check_choice("on_error", self.on_error, ON_ERROR)
        self._check_task()
        self._check_data()
        for name in ("num_queries", "collect_every_n_steps", "top_k", "batch_size"):
            _check_int(name, getattr(self, name), minimum=1)
        for name in ("every_n_epochs", "every_n_train_steps", "max_tokens_per_step", "correction_batches",
                     "max_train_examples", "query_rank", "ledger_subspace", "keep_top_scores"):
            if getattr(self, name) is not None:
                _check_int(name, getattr(self, name), minimum=1)
        if self.keep_top_scores is not None and self.keep_top_scores < self.top_k:
            raise ValueError(f"keep_top_scores={self.keep_top_scores} is smaller than top_k={self.top_k}: the top "
                             "examples are taken from the kept scores; raise keep_top_scores or lower top_k")
        if not (isinstance(self.pool_id_key, str) and self.pool_id_key):
            raise ValueError(f"pool_id_key must be a non-empty string (the key of a streaming pool item's integer "
                             f"id), got {_shown(self.pool_id_key)}")
        _check_int("seed", self.seed, minimum=0)
        if self.seed >= SEED_LIMIT:
            raise ValueError(f"seed must be below 2**62 (derived seeds add the step and the process rank and must "
                             f"still fit torch.Generator.manual_seed), got {self.seed!r}")
        for name in BOOL_FIELDS:
            value = getattr(self, name)
            if not isinstance(value, bool):
                hint = " (a string is not read as a boolean: write true / false without quotes in YAML)" \
                    if isinstance(value, str) else ""
                raise ValueError(f"{name} must be True or False, got {_shown(value)}{hint}")
        self._check_damping()
        self._check_sharding()
        if not (_is_number(self.ema_decay) and 0 < self.ema_decay < 1):
            raise ValueError(f"ema_decay must be in (0, 1), got {_shown(self.ema_decay)}")
        for name in ("max_layer_mb", "memory_budget_mb"):
            value = getattr(self, name)
            if value is not None and not (_is_number(value) and 0 < value < math.inf):
                raise ValueError(f"{name} must be a finite positive number of MiB or None, got {_shown(value)}")
        if self.layers is not None and not _is_name_list(self.layers):
            raise ValueError(f"layers must be a list of module names or glob patterns, got {_shown(self.layers)}")
        if self.exclude is not None and not _is_name_list(self.exclude):
            raise ValueError(f"exclude must be a list of module names or glob patterns, got {_shown(self.exclude)}")
        if self.layers is not None and not self.layers:
            raise ValueError("layers is empty: give module names or patterns, or None for every trackable layer")
        if self.output_dir is not None and not _is_text_path(self.output_dir):
            raise ValueError(f"output_dir must be a path (str or os.PathLike) or None (the trainer's log directory), "
                             f"got {_shown(self.output_dir)}")
        if not (self.every_n_epochs or self.every_n_train_steps or self.on_checkpoint or self.on_train_end):
            raise ValueError(
                "no trigger is enabled, so influence would never be computed: set every_n_epochs, "
                "every_n_train_steps, on_checkpoint=True or on_train_end=True"
            )
        steps = self.every_n_train_steps
        if self.window == "reset" and steps and steps < self.collect_every_n_steps:
            raise ValueError(
                f"every_n_train_steps={steps} is smaller than collect_every_n_steps="
                f"{self.collect_every_n_steps}: some windows would hold no statistics; collect more often"
            )
        if self.renderer is not None and not callable(getattr(self.renderer, "render", self.renderer)):
            raise ValueError(f"renderer must be callable or have a render() method, got {_shown(self.renderer)}")
        self._normalise()
        return self

    def _check_statistics_device(self) -> None:
        if self.statistics_device is None:
            return
        try:
            torch.device(self.statistics_device)
        except (RuntimeError, TypeError):
            raise ValueError(f"statistics_device must be a device name such as 'cpu' or 'cuda:0', or None (the "
                             f"tracked modules' device), got {_shown(self.statistics_device)}") from None

    def _check_sharding(self) -> None:
        if self.shard_statistics and not self.shard_factors:
            raise ValueError("shard_statistics needs shard_factors=True (the statistics are collected by the processes "
                             "that own the factors); set both")
        if not self.shard_factors:
            return
        if self.strategy not in ("ekfac", "kfac"):
            raise ValueError(f"shard_factors needs strategy 'ekfac' or 'kfac' (got {self.strategy!r}); "
                             "set shard_factors=False")
        for name in ("self_influence", "ledger"):
            if getattr(self, name):
                raise ValueError(f"{name} needs every layer's factors on every process; set {name}=False or "
                                 "shard_factors=False")

    def _normalise(self) -> None:
        self.exclude = () if self.exclude is None else tuple(self.exclude)  # YAML `exclude: null`: nothing excluded
        if self.layers is not None:
            self.layers = list(self.layers)
        if self.output_dir is not None:
            self.output_dir = os.fspath(self.output_dir)

    def _check_task(self) -> None:
        task = self.task
        if isinstance(task, str):
            _check_choice("task", task, tuple(BUILTIN_TASKS))
        elif isinstance(task, type) and _looks_like_task(task):
            raise ValueError(f"task is the class {task.__name__}, not a task; pass an instance: {task.__name__}()")
        elif not _looks_like_task(task):
            raise ValueError(f"task must be a lightning_influence.Task or one of {tuple(BUILTIN_TASKS)}, "
                             f"got {_shown(task)}")

    def _check_damping(self) -> None:
        if self.damping is not None:
            check_damping(self.damping)

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
        if self.collect_every_n_steps > 1 and max_steps is not None and self.collect_every_n_steps > max_steps:
            raise ValueError(f"collect_every_n_steps={self.collect_every_n_steps} exceeds max_steps={max_steps}: "
                             "only the first step would be collected; lower it")
        others = self._triggers_besides_checkpoints()
        if not others and not saves_checkpoints:
            raise ValueError("on_checkpoint is the only trigger but the trainer saves no checkpoints "
                             "(no ModelCheckpoint); enable checkpointing or another trigger")
        if self.every_n_epochs and self.window == "reset" and steps_per_epoch:
            steps = steps_per_epoch * self.every_n_epochs
            if steps < self.collect_every_n_steps:
                raise ValueError(
                    f"collect_every_n_steps={self.collect_every_n_steps} is more than the {steps} optimizer steps "
                    f"between influence computations (every_n_epochs={self.every_n_epochs}): some windows would hold "
                    "no statistics; lower collect_every_n_steps"
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
            listing = ", ".join(f"{k}: checkpoint {a!r} vs now {b!r}" for k, (a, b) in differ.items())
            raise ValueError(
                f"the checkpoint's influence statistics were collected with a different configuration ({listing}); "
                "resume with the same InfluenceCallback settings, or start a new run"
            )

    def resume_fingerprint(self) -> Dict[str, Any]:
        """The settings that change what the collected statistics mean: a resumed run must match them
        (compared key by key, so the message names what differs)."""
        task_class = BUILTIN_TASKS[self.task] if isinstance(self.task, str) else type(self.task)
        return {"task": task_class.__name__, "strategy": self.strategy, "fisher": self.fisher,
                "covariance_dtype": self.covariance_dtype, "loss_reduction": self.loss_reduction,
                "window": self.window, "max_train_examples": self.max_train_examples, "seed": self.seed}

    def to_dict(self) -> Dict[str, Any]:
        """JSON-friendly settings (objects such as datasets and tasks by their class name)."""
        out = {}
        for item in dataclasses.fields(self):
            value = getattr(self, item.name)
            if value is None or isinstance(value, (bool, int, float, str)):
                out[item.name] = value
            elif isinstance(value, (list, tuple)):
                out[item.name] = list(value)
            else:
                out[item.name] = type(value).__name__
        return out

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
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown InfluenceConfig fields {unknown}; known: {sorted(known)}")
        if "task" not in values:
            raise ValueError(f"task is required: a lightning_influence.Task or one of {tuple(BUILTIN_TASKS)}")
        return cls(**values)

    @classmethod
    def coerce(cls, value: Any) -> "InfluenceConfig":
        """A validated config from an :class:`InfluenceConfig` (validated in place), a dict or a ``DictConfig``."""
        config = value if isinstance(value, cls) else cls.from_mapping(value)
        return config.validate()


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_sequence(value: Any) -> bool:
    """A list, tuple or OmegaConf ListConfig; a string is a name, not a sequence of names."""
    return isinstance(value, Sequence) and not isinstance(value, (str, bytes))


def _is_name_list(value: Any) -> bool:
    return _is_sequence(value) and all(isinstance(name, str) for name in value)


def _is_text_path(value: Any) -> bool:
    return isinstance(value, (str, os.PathLike)) and isinstance(os.fspath(value), str)


def _looks_like_task(value: Any) -> bool:
    """Duck-typed: a Task need not subclass lightning_influence.Task."""
    return all(callable(getattr(value, name, None)) for name in ("loss", "measurement", "forward"))


def _is_dataset_or_loader(value: Any) -> bool:
    """Duck-typed: a map-style dataset indexes, an iterable one (or a DataLoader) iterates."""
    if isinstance(value, DataLoader):
        return True
    return not isinstance(value, (str, bytes)) and (hasattr(value, "__getitem__") or hasattr(value, "__iter__"))


def _bound(value: Optional[int]) -> Optional[int]:
    """A trainer bound, ``None`` when unbounded (Lightning spells that -1)."""
    return None if value is None or value < 0 else value


def _shown(value: Any) -> str:
    """A value for an error message: its repr, shortened (a dataset's repr can be huge), and its type."""
    text = reprlib.repr(value)
    plain = value is None or isinstance(value, (str, bool)) or _is_number(value)
    return text if plain else f"{text} ({type(value).__name__})"


def _check_choice(name: str, value: Any, choices: Tuple[str, ...], hint: str = "") -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(repr(c) for c in choices)}, got {value!r} {hint}".rstrip())


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
