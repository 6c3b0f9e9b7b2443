"""The Lightning callback: curvature from the training steps, influence at checkpoints.

One implementation, :class:`InfluenceCallbackCore`, holds all the logic and talks to the trainer
only through attributes both Lightning packages share. ``pytorch_lightning`` and
``lightning.pytorch`` each need a subclass of their own ``Callback`` (a Trainer accepts only its
package's callbacks): :class:`InfluenceCallback` here, and
``lightning_influence.lightning.InfluenceCallback`` for ``lightning.pytorch``.

Where the pieces come from: statistics are collected by
:class:`~lightning_influence.collector.StepStatistics`; at each trigger the EK-FAC eigenvalue
correction is fitted by a bounded pass (``correction_batches``) at the current weights
(:func:`~lightning_influence.factors.fit_factors` with the accumulated covariances), the
candidate pool is scored by :func:`~lightning_influence.scoring.compute_influence` (split across
processes), and rank 0 saves the result and hands it to the
:class:`~lightning_influence.reporting.publisher.ResultPublisher`.

Why a bounded pass rather than a lagged basis for the correction: the eigenbasis of the
accumulated covariances only exists at the checkpoint; rotating every training step's per-example
gradients into the previous checkpoint's basis would cost ``N·T·d²`` per step (more than the
statistics themselves) and describe the curvature in a stale basis. ``correction_batches`` fixed,
seeded batches of the pool at the checkpoint cost a few forward/backward passes per computation.
Measured (``benchmarks/accuracy.py``, digits MLP): Pearson with the exact influence 0.714 for the
bounded pass against 0.713 for a lagged basis, so the cheaper-for-training choice costs nothing.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import tempfile
import time
import warnings
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, Subset
from torch.utils.data.dataloader import default_collate

import pytorch_lightning as pl

from lightning_influence import distributed, passes
from lightning_influence._io import META_FILE, atomic_directory, json_bytes, remove_incomplete, write_file_atomic
from lightning_influence.collector import StepStatistics, fork_rng
from lightning_influence.config import InfluenceConfig
from lightning_influence.factors import fit_factors
from lightning_influence.results import InfluenceResult
from lightning_influence.scoring import compute_influence
from lightning_influence.tasks import CausalLMTask, ClassificationTask, RegressionTask, Task
from lightning_influence.tracking import LayerTracker, TrackingError, select_layers

log = logging.getLogger(__name__)

STATE_VERSION = 1
_TASKS = {"classification": ClassificationTask, "regression": RegressionTask, "causal_lm": CausalLMTask}
# Strategies Lightning shards the model with: hooks would see shards, not layers.
_SHARDED_STRATEGIES = ("FSDP", "DeepSpeed", "ModelParallel", "XLA")


class InfluenceCallbackCore:
    """Accumulate EK-FAC curvature while training; score training examples at checkpoints.

    Args:
        task: a :class:`~lightning_influence.Task` (or ``"classification"``, ``"regression"``,
            ``"causal_lm"``): the per-example loss and the query measurement.
        query_data: a Dataset or DataLoader of queries, or ``"val"`` / ``"test"`` for the first
            ``num_queries`` examples of the trainer's validation / test data.
        num_queries: how many examples ``"val"`` / ``"test"`` contribute.
        train_data: candidate pool (Dataset or DataLoader); default: the trainer's training
            dataset. Example ids are indices into it.
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
        max_train_examples: score a fixed random subset of this many pool examples (chosen once,
            kept across checkpoints and resumes).
        seed: seed of every private random generator.
        query_rank: rank of the low-rank query approximation (``None``: exact).
        top_k: per query, the most positive / negative examples kept with per-token scores.
        batch_size: batch size of the callback's own passes.
        renderer: shows examples in logged tables (see ``ResultPublisher``).
        max_layer_mb: skip, with a warning, layers whose statistics exceed this many MiB.
        memory_budget_mb: refuse before training a selection whose statistics exceed this.
        covariance_dtype: ``"float32"`` (default, also under bf16/fp16 training) or ``"float64"``.
        report: after saving each result, analyse it, write its figures and summary to
            ``<result>/report`` and log it to the trainer's loggers (``ResultPublisher``).
        log_artifacts: log each result directory as a W&B artifact.
        show_progress: progress bars for the callback's passes (rank 0).
        on_error: ``"warn"`` (a failing computation is reported and training goes on) or
            ``"raise"``.
    """

    def __init__(
        self,
        task: Union[Task, str],
        query_data: Union[str, Dataset, DataLoader] = "val",
        num_queries: int = 64,
        train_data: Optional[Union[Dataset, DataLoader]] = None,
        every_n_epochs: Optional[int] = 1,
        every_n_train_steps: Optional[int] = None,
        on_checkpoint: bool = True,
        on_train_end: bool = True,
        output_dir: Optional[str] = None,
        strategy: str = "ekfac",
        fisher: str = "empirical",
        damping: Optional[float] = None,
        layers: Optional[List[str]] = None,
        exclude: Sequence[str] = (),
        collect_every_n_steps: int = 8,
        max_tokens_per_step: Optional[int] = 512,
        loss_reduction: str = "mean",
        window: str = "reset",
        ema_decay: float = 0.99,
        correction_batches: Optional[int] = 16,
        max_train_examples: Optional[int] = None,
        seed: int = 0,
        query_rank: Optional[int] = None,
        top_k: int = 10,
        batch_size: int = 32,
        renderer: Optional[Callable] = None,
        max_layer_mb: Optional[float] = None,
        memory_budget_mb: Optional[float] = None,
        covariance_dtype: str = "float32",
        report: bool = True,
        log_artifacts: bool = True,
        show_progress: bool = True,
        on_error: str = "warn",
    ) -> None:
        values = {name: value for name, value in locals().items() if name not in ("self", "__class__")}
        values["exclude"] = tuple(exclude) if not isinstance(exclude, str) else exclude
        self.config = InfluenceConfig(**values).validate()
        self.task: Task = _TASKS[task]() if isinstance(task, str) else task
        self._collector: Optional[StepStatistics] = None
        self._index: List[Dict[str, Any]] = []  # one entry per computation, oldest first
        self._handles: Dict[str, InfluenceResult] = {}
        self._pool_ids: Optional[torch.Tensor] = None
        self._restored: Optional[Dict[str, Any]] = None  # loaded before the collector existed
        self._failures = 0
        self._failed_step = -1  # a computation that failed is not retried by another trigger at its step
        self._warned: set = set()
        self._output_hook = None
        self._last_outputs: Any = None
        self._step_at_batch_start = -1
        self._collecting = False
        self._window_scale: Optional[float] = None
        self._publisher = None

    @classmethod
    def from_config(cls, config: Union[InfluenceConfig, Dict[str, Any], Any]) -> "InfluenceCallbackCore":
        """Build from an :class:`InfluenceConfig`, a dict or an OmegaConf/Hydra ``DictConfig``."""
        if not isinstance(config, InfluenceConfig):
            config = InfluenceConfig.from_mapping(config)
        return cls(**{field.name: getattr(config, field.name) for field in dataclasses.fields(config)})

    # -- public state ------------------------------------------------------------------------------
    @property
    def results(self) -> List[InfluenceResult]:
        """One :class:`InfluenceResult` per computation, oldest first (tensors load lazily)."""
        found = []
        for entry in self._index:
            path = entry["path"]
            if path not in self._handles:
                if not (Path(path) / META_FILE).is_file():
                    continue
                self._handles[path] = InfluenceResult.load(path)
            found.append(self._handles[path])
        return found

    @property
    def statistics(self):
        """The accumulated :class:`~lightning_influence.CovarianceStatistics` of this process."""
        return self._collector.stats if self._collector is not None else None

    @property
    def steps_skipped(self) -> int:
        """Collected steps dropped because they were skipped (AMP) or not finite."""
        return int(self._collector.steps_skipped) if self._collector is not None else 0

    # -- set-up: everything that can be wrong fails here, before the first training step -------------
    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage != "fit":
            return
        strategy = type(trainer.strategy).__name__
        if any(tag.lower() in strategy.lower() for tag in _SHARDED_STRATEGIES):
            raise ValueError(
                f"InfluenceCallback does not support the {strategy} strategy (sharded parameters hide the "
                "layers' weights from the hooks); use a single device or DDP"
            )
        if not getattr(pl_module, "automatic_optimization", True):
            raise ValueError(
                "InfluenceCallback needs automatic optimization (the loss it rescales is the one Lightning "
                "back-propagates); manual optimization / multiple optimizers are not supported"
            )
        compiled = getattr(pl_module, "_compiler_ctx", None) or any(
            type(m).__name__ == "OptimizedModule" for m in pl_module.modules())
        if compiled:
            raise ValueError(
                "InfluenceCallback cannot track a torch.compile'd model (compiled graphs bypass the module "
                "hooks it records layers with); train without torch.compile while collecting influence"
            )
        self._check_triggers(trainer)

    def _check_triggers(self, trainer: Any) -> None:
        cfg = self.config
        max_epochs = trainer.max_epochs if trainer.max_epochs not in (None, -1) else None
        max_steps = trainer.max_steps if trainer.max_steps not in (None, -1) else None
        if cfg.every_n_epochs and max_epochs is not None and cfg.every_n_epochs > max_epochs:
            raise ValueError(f"every_n_epochs={cfg.every_n_epochs} never fires with max_epochs={max_epochs}; "
                             "lower it or set every_n_epochs=None")
        if cfg.every_n_train_steps and max_steps is not None and cfg.every_n_train_steps > max_steps:
            raise ValueError(f"every_n_train_steps={cfg.every_n_train_steps} never fires with max_steps={max_steps}; "
                             "lower it or set every_n_train_steps=None")
        if cfg.collect_every_n_steps > 1 and max_steps is not None and cfg.collect_every_n_steps > max_steps:
            raise ValueError(f"collect_every_n_steps={cfg.collect_every_n_steps} exceeds max_steps={max_steps}: "
                             "only the first step would be collected; lower it")
        if not (cfg.every_n_epochs or cfg.every_n_train_steps or cfg.on_train_end) and not trainer.checkpoint_callbacks:
            raise ValueError("on_checkpoint is the only trigger but the trainer saves no checkpoints "
                             "(no ModelCheckpoint); enable checkpointing or another trigger")

    def _warn_if_never_computed(self, trainer: Any) -> None:
        """A step trigger beyond the run's length as the only trigger: nothing would be computed
        (checked once the data is known; setup refuses the cases that max_epochs/max_steps decide)."""
        cfg = self.config
        if not cfg.every_n_train_steps or cfg.every_n_epochs or cfg.on_train_end or (
                cfg.on_checkpoint and trainer.checkpoint_callbacks):
            return
        try:
            total = trainer.estimated_stepping_batches
        except Exception:  # noqa: BLE001 - unknown length (e.g. an iterable dataset): nothing to say
            return
        if isinstance(total, int) and cfg.every_n_train_steps > total:
            self._warn("never", f"every_n_train_steps={cfg.every_n_train_steps} is more than the {total} optimizer "
                                "steps of this run and no other trigger is enabled, so influence will never be "
                                "computed; lower it or set on_train_end=True")

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        cfg = self.config
        mib = 2**20
        layers = select_layers(
            pl_module, cfg.layers, cfg.exclude,
            max_layer_bytes=int(cfg.max_layer_mb * mib) if cfg.max_layer_mb else None,
            memory_budget_bytes=int(cfg.memory_budget_mb * mib) if cfg.memory_budget_mb else None,
        )
        device = passes.model_device(pl_module)
        self._resolve_data(trainer)
        self._output_dir = Path(cfg.output_dir) if cfg.output_dir else Path(
            trainer.log_dir or trainer.default_root_dir) / "influence"
        if trainer.is_global_zero:
            _check_writable(self._output_dir)
            removed = remove_incomplete(self._output_dir)
            if removed:
                log.info("lightning-influence: removed %d incomplete result(s) left by an interrupted run in %s",
                         len(removed), self._output_dir)
        self._collector = StepStatistics(
            layers, self.task, fisher=cfg.fisher, loss_reduction=cfg.loss_reduction,
            max_tokens_per_step=cfg.max_tokens_per_step, window=cfg.window, ema_decay=cfg.ema_decay,
            dtype=getattr(torch, cfg.covariance_dtype), device=device, seed=cfg.seed,
        )
        if self._restored is not None:
            self._apply_state(self._restored)
            self._restored = None
        if self._pool_ids is None:
            self._pool_ids = self._choose_pool_ids()
        self._probe(pl_module, layers)
        self._collector.attach()
        if cfg.fisher == "true":
            self._output_hook = pl_module.register_forward_hook(self._capture_outputs)
        self._log_memory(trainer, layers)
        self._warn_if_never_computed(trainer)
        if trainer.is_global_zero and cfg.report:
            self._publisher = self._make_publisher(trainer)

    def _resolve_data(self, trainer: Any) -> None:
        """Pool and queries as (dataset, collate_fn); fails naming what to pass instead."""
        cfg = self.config
        train_loader = _source_loader(trainer.fit_loop._data_source) if cfg.train_data is None else None
        if cfg.train_data is not None:
            pool, collate = _dataset_and_collate(cfg.train_data, None)
        elif isinstance(train_loader, DataLoader):
            pool, collate = train_loader.dataset, train_loader.collate_fn
        else:
            raise ValueError("cannot find the training dataset (the trainer's training data is not a single "
                             "DataLoader); pass train_data=<Dataset or DataLoader>")
        if isinstance(pool, IterableDataset) or not hasattr(pool, "__len__"):
            raise ValueError(f"train_data ({type(pool).__name__}) has no __len__: influence scores examples by index, "
                             "so the candidate pool must be a map-style Dataset; pass train_data=<map-style Dataset>")
        if len(pool) == 0:
            raise ValueError("the candidate pool (train_data) is empty")
        if cfg.max_train_examples is not None and cfg.max_train_examples > len(pool):
            raise ValueError(f"max_train_examples={cfg.max_train_examples} is larger than the candidate pool "
                             f"({len(pool)} examples); lower it or set it to None")
        self._pool, self._collate = pool, collate
        if isinstance(cfg.query_data, str):
            loop = trainer.fit_loop.epoch_loop.val_loop if cfg.query_data == "val" else trainer.test_loop
            source = loop._data_source
            loader = _source_loader(source) if source.is_defined() else None
            if isinstance(loader, (list, tuple)) and loader:
                loader = loader[0]
            if not isinstance(loader, DataLoader):
                raise ValueError(f"query_data={cfg.query_data!r} but the trainer has no {cfg.query_data} DataLoader; "
                                 "pass query_data=<Dataset or DataLoader>")
            dataset = loader.dataset
            if not hasattr(dataset, "__len__"):
                raise ValueError(f"the {cfg.query_data} dataset has no __len__; pass query_data=<map-style Dataset>")
            queries, query_collate = Subset(dataset, range(min(cfg.num_queries, len(dataset)))), loader.collate_fn
            self._query_dataset = dataset
        else:
            queries, query_collate = _dataset_and_collate(cfg.query_data, collate)
            self._query_dataset = queries
        if not hasattr(queries, "__len__") or len(queries) == 0:
            raise ValueError("the query set is empty; pass query_data with at least one example")
        self._queries, self._query_collate = queries, query_collate

    def _choose_pool_ids(self) -> torch.Tensor:
        size = len(self._pool)
        if self.config.max_train_examples is None:
            return torch.arange(size)
        generator = torch.Generator().manual_seed(self.config.seed)
        return torch.randperm(size, generator=generator)[: self.config.max_train_examples].sort().values

    def _loader(self, dataset: Any, collate: Optional[Callable] = None) -> DataLoader:
        """Unshuffled, with a private generator (iterating a DataLoader draws its base seed from
        the global generator otherwise, which would shift the training's own randomness)."""
        return DataLoader(dataset, batch_size=self.config.batch_size, shuffle=False,
                          collate_fn=collate or self._collate or default_collate,
                          generator=torch.Generator().manual_seed(self.config.seed))

    def _correction_data(self) -> Subset:
        """Fixed, seeded examples of the pool for the eigenvalue-correction pass."""
        size = len(self._pool)
        count = size if self.config.correction_batches is None else min(
            size, self.config.correction_batches * self.config.batch_size)
        order = torch.randperm(size, generator=torch.Generator().manual_seed(self.config.seed + 1))
        return Subset(self._pool, order[:count].tolist())

    def _probe(self, pl_module: Any, layers: Sequence[Any]) -> None:
        """One forward on a training and a query batch: hooks fire once per layer, the loss is per
        example, the query measurement works."""
        device = passes.model_device(pl_module)
        tracker = LayerTracker(layers)
        with ExitStack() as stack:
            stack.enter_context(fork_rng(device))
            stack.enter_context(passes.evaluation_mode(pl_module))
            stack.enter_context(tracker)
            for what, dataset, collate in (("training", self._pool, self._collate),
                                           ("query", self._queries, self._query_collate)):
                batch = passes.to_device(next(iter(self._loader(dataset, collate))), device)
                try:  # the loss / measurement too: e.g. labels out of range for the model's outputs
                    outputs = passes.forward(pl_module, self.task, batch, tracker)
                    expected = (self.task.batch_size(batch),)
                    values = self.task.loss_from_outputs(outputs, batch) if what == "training" else \
                        self.task.measurement(pl_module, batch)
                except TrackingError:
                    raise
                except Exception as err:
                    raise ValueError(f"the task cannot evaluate the model on a {what} batch ({type(err).__name__}: "
                                     f"{err}); check query_data / train_data or override Task.forward") from err
                if tuple(values.shape) != expected:
                    name = "loss" if what == "training" else "measurement"
                    raise ValueError(f"the task's {name} must be per example, shape {expected}, got "
                                     f"{tuple(values.shape)} on a {what} batch; return one value per example")
                if what == "training" and self.config.fisher == "true":
                    try:
                        self.task.sample_loss_from_outputs(outputs, batch, torch.Generator(device))
                    except NotImplementedError as err:
                        raise ValueError(f"fisher='true' needs a task that samples targets: {err}; "
                                         "use fisher='empirical'") from err

    def _log_memory(self, trainer: Any, layers: Sequence[Any]) -> None:
        stats_bytes = 2 * sum(layer.factor_bytes for layer in layers)  # statistics + one step's buffer
        n_train, n_query = len(self._pool_ids), len(self._queries)
        score_bytes = 4 * n_query * n_train * (1 + len(layers))
        if trainer.is_global_zero:
            log.info("lightning-influence: tracking %d layers; statistics %.3g MiB, scores %.3g MiB "
                     "(%d queries x %d training examples x %d layers)", len(layers), stats_bytes / 2**20,
                     score_bytes / 2**20, n_query, n_train, len(layers))

    def _make_publisher(self, trainer: Any):
        from lightning_influence.reporting.publisher import ResultPublisher

        kwargs = dict(renderer=self.config.renderer, top_k=self.config.top_k, log_artifacts=self.config.log_artifacts)
        try:
            return ResultPublisher(trainer.loggers, **kwargs)
        except TypeError as err:
            self._warn("publisher", f"influence results will only be written to disk: {err}")
            return ResultPublisher((), **kwargs)

    # -- collecting during training ------------------------------------------------------------------
    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        if self._collector is None:
            return
        cfg = self.config
        batches = trainer.num_training_batches
        if cfg.every_n_epochs and cfg.window == "reset" and isinstance(batches, int) and batches > 0:
            steps = max(1, batches // trainer.accumulate_grad_batches) * cfg.every_n_epochs
            if steps < cfg.collect_every_n_steps:
                raise ValueError(
                    f"collect_every_n_steps={cfg.collect_every_n_steps} is more than the {steps} optimizer steps "
                    f"between influence computations (every_n_epochs={cfg.every_n_epochs}): some windows would hold "
                    "no statistics; lower collect_every_n_steps"
                )
        self._resolve_pending(trainer)

    def _capture_outputs(self, module: Any, inputs: Any, output: Any) -> None:
        if self._collecting and self._collector.recording:
            self._last_outputs = output

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if self._collector is None:
            return
        self._resolve_pending(trainer)
        self._step_at_batch_start = trainer.global_step
        self._collecting = trainer.global_step % self.config.collect_every_n_steps == 0
        if not self._collecting:
            return
        scale = _loss_scale(trainer)
        if self._window_scale is None:
            self._window_scale = scale
        self._collector.begin_batch(batch, accumulation=trainer.accumulate_grad_batches, loss_scale=scale)

    def on_before_backward(self, trainer: Any, pl_module: Any, loss: Any) -> None:
        if self._collecting and self.config.fisher == "true" and self._collector.recording:
            outputs, self._last_outputs = self._last_outputs, None
            self._collector.sample_true_fisher(pl_module, outputs)

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self._collector is None:
            return
        if self._collecting:
            self._collector.end_batch()
            self._last_outputs = None
            self._report_miscounted(trainer)
        if trainer.global_step == self._step_at_batch_start:
            return  # still accumulating gradients: the optimizer step has not happened
        if self._window_scale is not None:
            skipped = _loss_scale(trainer) < self._window_scale  # GradScaler backs off when it skips
            self._collector.commit(valid=not skipped)
            self._window_scale = None
        cfg = self.config
        if cfg.every_n_train_steps and trainer.global_step % cfg.every_n_train_steps == 0:
            self._compute(trainer, pl_module, "every_n_train_steps")
        if cfg.every_n_epochs and trainer.is_last_batch and (trainer.current_epoch + 1) % cfg.every_n_epochs == 0:
            self._compute(trainer, pl_module, "every_n_epochs")

    def _report_miscounted(self, trainer: Any) -> None:
        if self._collector.miscounted and trainer.is_global_zero:
            listing = ", ".join(f"{name} (x{calls})" for name, calls in self._collector.miscounted.items())
            self._warn("miscounted", f"layers not called exactly once per training batch are left out of the "
                                     f"statistics: {listing}; exclude them (exclude=[...])")

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        # Normally done at the epoch's last batch (before validation and checkpointing); this catches
        # epochs whose last batch was not recognised as such.
        every = self.config.every_n_epochs
        if self._collector is not None and every and (trainer.current_epoch + 1) % every == 0:
            self._compute(trainer, pl_module, "every_n_epochs")

    def on_save_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: Dict[str, Any]) -> None:
        if self._collector is None or trainer.sanity_checking or not _fitting(trainer):
            return
        self._resolve_pending(trainer)
        if self.config.on_checkpoint:
            self._compute(trainer, pl_module, "checkpoint")
        entry = self._entry(trainer.global_step)
        if entry is not None:
            entry["awaiting_checkpoint"] = True  # the path is known once the save returns
        # Lightning gathered callback states before this hook: store the state as it is now.
        if isinstance(checkpoint.get("callbacks"), dict) and self.state_key in checkpoint["callbacks"]:
            checkpoint["callbacks"][self.state_key] = self.state_dict()

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        if self._collector is None:
            return
        self._resolve_pending(trainer)
        if self.config.on_train_end:
            self._compute(trainer, pl_module, "train_end")

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        if self._collector is not None:
            self._resolve_pending(trainer)

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        if self._collector is not None:
            self._collector.end_batch()

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage != "fit" or self._collector is None:
            return
        self._collector.detach()
        if self._output_hook is not None:
            self._output_hook.remove()
            self._output_hook = None

    # -- influence at a checkpoint -------------------------------------------------------------------
    def _entry(self, step: int) -> Optional[Dict[str, Any]]:
        return next((entry for entry in self._index if entry["step"] == step), None)

    def _compute(self, trainer: Any, pl_module: Any, reason: str) -> None:
        """One influence computation per global step, whatever triggered it."""
        step = trainer.global_step
        entry = self._entry(step)
        if entry is not None:
            if reason not in entry["reasons"]:
                entry["reasons"].append(reason)
                if trainer.is_global_zero:
                    self._update_meta(entry)
            return
        if trainer.sanity_checking or step == self._failed_step:
            return
        try:
            with ExitStack() as stack:
                stack.enter_context(torch.inference_mode(False))  # validation hooks run in inference mode
                stack.enter_context(torch.enable_grad())
                stack.enter_context(fork_rng(passes.model_device(pl_module)))
                self._run(trainer, pl_module, step, reason)
        except Exception as err:  # noqa: BLE001 - the influence machinery never ends a training run
            if self.config.on_error == "raise":
                raise
            self._failures += 1
            self._failed_step = step
            warnings.warn(f"lightning-influence: influence computation at step {step} failed "
                          f"({type(err).__name__}: {err}); training continues", RuntimeWarning, stacklevel=2)

    def _run(self, trainer: Any, pl_module: Any, step: int, reason: str) -> None:
        cfg = self.config
        timings: Dict[str, float] = {}
        started = time.perf_counter()
        stats = self._collector.reduced()
        if stats.is_empty():
            if trainer.is_global_zero:
                self._warn(f"empty-{step}", f"no statistics were collected before step {step} (collect_every_n_steps="
                                            f"{cfg.collect_every_n_steps}); influence is not computed there")
            return
        show = cfg.show_progress and trainer.is_global_zero
        # Each process corrects the eigenvalues on its share of the correction examples; the sums
        # are all-reduced inside fit_factors (its seed differs per rank so sampled targets do too).
        correction = self._correction_data()
        shard = distributed.split_range(len(correction))
        factors = fit_factors(
            pl_module, self.task, self._loader(Subset(correction, list(shard))), cfg.strategy, cfg.fisher,
            covariances=stats, batch_size=cfg.batch_size, seed=cfg.seed + step + 7919 * distributed.rank(),
            show_progress=show, reduce=distributed.all_reduce_sum_,
        )
        timings["factors"] = time.perf_counter() - started

        stage = time.perf_counter()
        ids = self._pool_ids
        share = distributed.split_range(len(ids))
        mine = ids[share.start:share.stop]
        query_ids = torch.as_tensor(self._query_ids())
        queries = self._loader(self._queries, self._query_collate)
        if len(mine):
            part = compute_influence(
                pl_module, self.task, self._loader(Subset(self._pool, mine.tolist())), queries, factors,
                cfg.damping, per_layer=True, query_rank=cfg.query_rank, batch_size=cfg.batch_size,
                train_ids=mine, query_ids=query_ids, show_progress=show,
            )
            local, lambdas = part.layer_scores, part.meta["damping"]
        else:
            local = torch.zeros(len(factors.layer_names), len(query_ids), 0)
            lambdas = {name: factors.damping(name, cfg.damping) for name in factors.layer_names}
        device = passes.model_device(pl_module)
        layer_scores = distributed.gather_last_dim(local.to(device), len(ids)).cpu()
        timings["scores"] = time.perf_counter() - stage
        entry = {"step": step, "epoch": trainer.current_epoch, "reasons": [reason],
                 "path": str(self._output_dir / f"step={step}"), "checkpoint_paths": []}
        if trainer.is_global_zero:
            self._save(trainer, pl_module, entry, factors, layer_scores, query_ids, lambdas, timings)
        self._index.append(entry)
        self._collector.reset()

    def _query_ids(self) -> Sequence[int]:
        queries = self._queries
        return list(queries.indices) if isinstance(queries, Subset) else range(len(queries))

    def _save(self, trainer, pl_module, entry, factors, layer_scores, query_ids, lambdas, timings) -> None:
        """Rank 0: per-token scores of each query's top/bottom examples, then write and publish."""
        cfg = self.config
        scores = layer_scores.double().sum(0).float()
        ids = self._pool_ids
        k = min(cfg.top_k, scores.shape[1])
        top, bottom = scores.topk(k, dim=1).indices, scores.topk(k, dim=1, largest=False).indices
        extra = {"top_ids": ids[top], "bottom_ids": ids[bottom]}
        stage = time.perf_counter()
        token_note = None
        try:
            extra.update(self._token_scores(pl_module, factors, top, bottom))
        except ValueError as err:  # e.g. layers reading different token axes
            token_note = str(err)
        timings["token_scores"] = time.perf_counter() - stage
        collector = self._collector
        meta = {
            "strategy": cfg.strategy, "fisher": cfg.fisher, "damping": lambdas, "query_rank": cfg.query_rank,
            "reasons": entry["reasons"], "checkpoint_path": None, "checkpoint_paths": [],
            "config": cfg.to_dict(), "n_pool": len(self._pool), "n_train": int(scores.shape[1]),
            "n_query": int(scores.shape[0]), "world_size": distributed.world_size(),
            "steps_collected": float(collector.steps_committed), "steps_skipped": float(collector.steps_skipped),
            "tokens_seen": factors.meta.get("tokens_seen"), "timings": timings,
            "token_scores_skipped": token_note,
        }
        result = InfluenceResult(
            scores=scores, train_ids=ids, query_ids=query_ids, layer_names=factors.layer_names,
            step=entry["step"], epoch=entry["epoch"], meta=meta, layer_scores=layer_scores, **extra,
        )
        path = Path(entry["path"])
        try:
            with atomic_directory(path) as tmp:  # scores and factors appear together or not at all
                result.write_into(tmp)
                factors.write_into(tmp / "factors")
            result.path = path
        except OSError as err:
            self._warn(f"write-{entry['step']}", f"could not write the influence result to {path} ({err}); "
                                                 "training continues")
            return
        if self._publisher is not None:
            history = self.results
            try:
                self._publisher.publish(result, step=entry["step"], train_dataset=self._pool,
                                        query_dataset=self._query_dataset, history=history)
            except Exception as err:  # noqa: BLE001 - reporting never ends training
                self._warn("publish", f"publishing influence results failed ({type(err).__name__}: {err}); "
                                      f"the result is saved under {path}")

    def _token_scores(self, pl_module, factors, top, bottom) -> Dict[str, torch.Tensor]:
        """Per-token scores for the union of every query's top/bottom examples only."""
        cfg = self.config
        positions = torch.cat([top, bottom], dim=1)
        union = positions.unique()  # sorted positions in the pool id list
        subset = Subset(self._pool, self._pool_ids[union].tolist())
        tokens = compute_influence(
            pl_module, self.task, self._loader(subset), self._loader(self._queries, self._query_collate), factors,
            cfg.damping, per_token=True, query_rank=cfg.query_rank, batch_size=cfg.batch_size,
        )
        rows = torch.arange(top.shape[0]).unsqueeze(1)
        out = {}
        for name, picked in (("top", top), ("bottom", bottom)):
            where = torch.searchsorted(union, picked)
            out[f"{name}_token_scores"] = tokens.token_scores[rows, where]
            out[f"{name}_token_mask"] = tokens.token_mask[where]
        return out

    def _resolve_pending(self, trainer: Any) -> None:
        """Record the paths of checkpoints saved at a result's step (known only after the save)."""
        for entry in self._index:
            if not entry.get("awaiting_checkpoint"):
                continue
            paths = [getattr(cb, "_last_checkpoint_saved", "") for cb in trainer.checkpoint_callbacks
                     if getattr(cb, "_last_global_step_saved", None) == entry["step"]]
            if entry.get("restored") and trainer.ckpt_path:
                paths.append(str(trainer.ckpt_path))
            new = [str(p) for p in paths if p and str(p) not in entry["checkpoint_paths"]]
            if new:
                entry["checkpoint_paths"].extend(new)
                if trainer.is_global_zero:
                    self._update_meta(entry)
            if new or trainer.global_step > entry["step"] or entry.get("restored"):
                entry["awaiting_checkpoint"] = False
                entry.pop("restored", None)

    def _update_meta(self, entry: Dict[str, Any]) -> None:
        """Rewrite only ``meta.json`` (atomically): the result's other files stay as they are."""
        meta_path = Path(entry["path"]) / META_FILE
        if not meta_path.is_file():
            return
        with open(meta_path, encoding="utf-8") as fh:
            payload = json.load(fh)
        paths = list(entry["checkpoint_paths"])
        payload["meta"].update(checkpoint_path=paths[0] if paths else None, checkpoint_paths=paths,
                               reasons=list(entry["reasons"]))
        write_file_atomic(meta_path, json_bytes(payload))
        handle = self._handles.get(entry["path"])
        if handle is not None:
            handle.meta.update(payload["meta"])

    def _warn(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(f"lightning-influence: {message}", RuntimeWarning, stacklevel=3)

    # -- state ---------------------------------------------------------------------------------------
    def _fingerprint(self) -> Dict[str, Any]:
        cfg = self.config
        return {"task": type(self.task).__name__, "strategy": cfg.strategy, "fisher": cfg.fisher,
                "covariance_dtype": cfg.covariance_dtype, "loss_reduction": cfg.loss_reduction,
                "window": cfg.window, "max_train_examples": cfg.max_train_examples, "seed": cfg.seed}

    def state_dict(self) -> Dict[str, Any]:
        """Statistics (summed over processes onto rank 0: collective), the pool subset, the result
        index and pending checkpoint paths."""
        state: Dict[str, Any] = {
            "version": STATE_VERSION, "config": self._fingerprint(), "index": [dict(e) for e in self._index],
            "pool_ids": self._pool_ids, "failures": self._failures,
        }
        if self._collector is not None:
            self._collector.consolidate_()
            state["layers"] = [[layer.name, layer.d_out, layer.d_in] for layer in self._collector.layers]
            state["collector"] = self._collector.state_dict()
        elif self._restored is not None:
            state.update({k: self._restored[k] for k in ("layers", "collector") if k in self._restored})
        return state

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        if state_dict.get("version") != STATE_VERSION:
            raise ValueError(f"cannot resume InfluenceCallback state of version {state_dict.get('version')!r} "
                             f"(this version reads {STATE_VERSION})")
        mine, theirs = self._fingerprint(), state_dict["config"]
        differ = {k: (theirs.get(k), v) for k, v in mine.items() if theirs.get(k) != v}
        if differ:
            listing = ", ".join(f"{k}: checkpoint {a!r} vs now {b!r}" for k, (a, b) in differ.items())
            raise ValueError(
                f"the checkpoint's influence statistics were collected with a different configuration ({listing}); "
                "resume with the same InfluenceCallback settings, or start a new run"
            )
        if self._collector is not None:
            self._apply_state(state_dict)
        else:
            self._restored = state_dict

    def _apply_state(self, state: Dict[str, Any]) -> None:
        layers = [[layer.name, layer.d_out, layer.d_in] for layer in self._collector.layers]
        saved = [list(item) for item in state.get("layers", layers)]
        if saved != layers:
            raise ValueError(
                f"the checkpoint's influence statistics track other layers ({[n for n, *_ in saved][:8]}) than this "
                f"callback ({[n for n, *_ in layers][:8]}); resume with the same layers / exclude settings"
            )
        if "collector" in state:
            self._collector.load_state_dict(state["collector"])
        self._index = [dict(entry) for entry in state["index"]]
        for entry in self._index:
            if entry.get("awaiting_checkpoint"):
                entry["restored"] = True  # its checkpoint is the one being resumed from
        self._failures = int(state.get("failures", 0))
        if state.get("pool_ids") is not None:
            ids = torch.as_tensor(state["pool_ids"])
            if hasattr(self, "_pool") and len(ids) and int(ids.max()) >= len(self._pool):
                raise ValueError("the checkpoint's candidate pool subset does not fit this training dataset "
                                 f"({len(self._pool)} examples); resume with the same data")
            self._pool_ids = ids


class InfluenceCallback(InfluenceCallbackCore, pl.Callback):
    __doc__ = InfluenceCallbackCore.__doc__ + "\n    For ``pytorch_lightning`` Trainers; ``lightning.pytorch`` users import " \
        "``lightning_influence.lightning.InfluenceCallback``.\n"


# -- trainer helpers (duck-typed, shared by both Lightning packages) --------------------------------------
def _fitting(trainer: Any) -> bool:
    return getattr(trainer.state, "fn", None) == "fit"


def _loss_scale(trainer: Any) -> float:
    """The AMP GradScaler's current scale (1 without one)."""
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    if scaler is None or not scaler.is_enabled():
        return 1.0
    return float(scaler.get_scale())


def _source_loader(source: Any) -> Any:
    """The DataLoader behind one of the trainer's data sources (a DataModule or LightningModule
    hook, or the object passed to ``fit``)."""
    return source.dataloader() if source.instance is not None else None


def _check_writable(directory: Path) -> None:
    """Refuse, before training, an output directory that could never be written (a path through a
    regular file, a read-only file system): probed in its nearest existing ancestor, creating nothing."""
    existing = directory
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    try:
        if not existing.is_dir():
            raise NotADirectoryError(f"{existing} is a file, not a directory")
        fd, probe = tempfile.mkstemp(prefix=".influence-write-test-", dir=existing)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise ValueError(f"cannot write influence results under output_dir={str(directory)!r} ({err}); "
                         "choose a writable output_dir") from err


def _dataset_and_collate(data: Any, collate: Optional[Callable]):
    if isinstance(data, DataLoader):
        return data.dataset, data.collate_fn
    if isinstance(data, Dataset) or hasattr(data, "__getitem__"):
        return data, collate
    raise TypeError(f"expected a Dataset or DataLoader, got {type(data).__name__}")
