"""The Lightning callback: curvature from the training steps, influence at checkpoints.

Thin glue over the Lightning-free core: :class:`~lightning_influence.engine.collector.StepStatistics`
turns the training steps' hooks into covariance statistics, and
:class:`~lightning_influence.checkpoint.session.InfluenceSession` computes, writes and describes the influence
at each checkpoint; :class:`~lightning_influence.loops.protocol.LoopProtocol` owns the collection
cadence, the triggers, the monitors and the ledger, as for every loop. What stays here needs
Lightning: translating the trainer's hooks into the protocol's events, state in checkpoints,
process ranks, and handing results and monitor scalars to the trainer.

``pytorch_lightning`` and ``lightning.pytorch`` each need a subclass of their own ``Callback`` (a
Trainer accepts only its package's callbacks): :class:`InfluenceCallback` here, and
``lightning_influence.lightning.InfluenceCallback``; both mix in :class:`InfluenceCallbackMixin`.
"""

from __future__ import annotations

import logging
from functools import partial
from pathlib import Path
from typing import Any, Dict, Optional, Union

import torch
from torch.utils.data import DataLoader, Dataset

import pytorch_lightning as pl

from lightning_influence.loops import trainer as _trainer
from lightning_influence.engine import passes
from lightning_influence.engine.collector import StepStatistics
from lightning_influence._deprecated import regroup
from lightning_influence.config import CurvatureConfig, InfluenceConfig, ReportConfig, ScoringConfig
from lightning_influence.loops.monitoring import learning_rate, publish_scalars
from lightning_influence.loops.shared import LoopResults, warn_once
from lightning_influence.loops.protocol import LoopProtocol
from lightning_influence.results import saved_run_id
from lightning_influence.checkpoint.index import current_entry
from lightning_influence.tasks import Task

log = logging.getLogger(__name__)

STATE_VERSION = 3  # 2: result directories stored relative to output_dir; 3: the run id


class InfluenceCallbackMixin(LoopResults):
    """Accumulate EK-FAC curvature while training; score training examples at checkpoints.

    The arguments are the fields of :class:`~lightning_influence.InfluenceConfig`, where each is
    documented (and in the README's configuration reference): the common settings flat, the advanced
    ones in groups, ``curvature`` (:class:`~lightning_influence.CurvatureConfig`), ``scoring``
    (:class:`~lightning_influence.ScoringConfig`) and ``report`` (:class:`~lightning_influence.ReportConfig`),
    each the dataclass or a dict of its fields (as YAML gives it). The flat names of earlier releases
    (``strategy="kfac"``, ``window="ema"``, ``report=False`` ...) are accepted for one more release
    with a ``FutureWarning`` naming the new spelling. ``from_config`` takes an
    ``InfluenceConfig``, a dict or an OmegaConf ``DictConfig`` instead. Statistics come from the
    training steps' own forward and backward passes; at each trigger (``every_n_epochs``,
    ``every_n_train_steps``, ``on_checkpoint``, ``on_train_end``; one computation per step) the
    :class:`~lightning_influence.checkpoint.session.InfluenceSession` scores the candidate pool against the
    queries and writes ``<output_dir>/step=<N>/``; :attr:`results` lists them.

    A run is an identity (:attr:`run_id`, kept in checkpoints): resuming with ``ckpt_path``
    continues its results; a new run refuses an ``output_dir`` holding another run's results or
    written by another process (see :mod:`~lightning_influence.checkpoint.run_dir`). Several influence
    callbacks in one Trainer (say, two query sets) each need their own ``output_dir``, which their
    :attr:`state_key` names.
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
        seed: int = 0,
        on_error: str = "warn",
        curvature: Optional[Union[CurvatureConfig, Dict[str, Any]]] = None,
        scoring: Optional[Union[ScoringConfig, Dict[str, Any]]] = None,
        report: Optional[Union[ReportConfig, Dict[str, Any]]] = None,
        **deprecated: Any,
    ) -> None:
        groups = regroup(dict(deprecated, curvature=curvature, scoring=scoring, report=report), type(self).__name__)
        unknown = sorted(set(groups) - {"curvature", "scoring", "report"})
        if unknown:
            raise TypeError(f"{type(self).__name__}() got unexpected keyword arguments {unknown}")
        self._configure(InfluenceConfig(
            task=task, query_data=query_data, num_queries=num_queries, train_data=train_data,
            every_n_epochs=every_n_epochs, every_n_train_steps=every_n_train_steps, on_checkpoint=on_checkpoint,
            on_train_end=on_train_end, output_dir=output_dir, seed=seed, on_error=on_error, **groups,
        ))

    @classmethod
    def from_config(cls, config: Union[InfluenceConfig, Dict[str, Any], Any]) -> "InfluenceCallbackMixin":
        """Build from an :class:`InfluenceConfig`, a dict or an OmegaConf/Hydra ``DictConfig``."""
        callback = cls.__new__(cls)
        callback._configure(InfluenceConfig.coerce(config))
        return callback

    def _configure(self, config: InfluenceConfig) -> None:
        self.config = config.validate()
        self._loop: Optional[LoopProtocol] = None  # statistics, session, results: from on_fit_start
        self._restored: Optional[Dict[str, Any]] = None  # loaded before the loop existed
        self._steps: Optional[_StepEvents] = None
        self._warned: set = set()
        self.run_id: Optional[str] = None  # made at the first fit, or restored from the checkpoint resumed

    @property
    def state_key(self) -> str:
        """Where the checkpoint keeps this callback's state: its output directory and queries tell
        influence callbacks apart, as Lightning's own callbacks' settings do."""
        cfg = self.config
        queries = cfg.query_data if isinstance(cfg.query_data, str) else type(cfg.query_data).__name__
        return self._generate_state_key(output_dir=cfg.output_dir, query_data=queries, num_queries=cfg.num_queries)

    def on_load_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: Dict[str, Any]) -> None:
        """Resume from a state stored under another key (an earlier version's, or another
        ``output_dir``: a moved run) when it is the checkpoint's only influence state and this is
        the Trainer's only influence callback; Lightning itself matches keys exactly."""
        states = checkpoint.get("callbacks") or {}
        if self.state_key in states:
            return
        stored = [key for key in states if isinstance(key, str) and key.startswith(type(self).__qualname__)]
        ours = [cb for cb in trainer.callbacks if isinstance(cb, InfluenceCallbackMixin)]
        if len(stored) == 1 and len(ours) == 1:
            self.load_state_dict(states[stored[0]])

    # -- public state ------------------------------------------------------------------------------
    @property
    def task(self) -> Task:
        """The task scores are computed for."""
        return self._loop.task if self._loop is not None else self.config.build_task()

    @property
    def _collector(self) -> Optional[StepStatistics]:
        return self._loop.statistics if self._loop is not None else None

    # -- set-up: everything that can be wrong fails here, before the first training step -------------
    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage != "fit":
            return
        problem = _trainer.unsupported(trainer, pl_module)
        if problem:
            raise ValueError(problem)

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        cfg = self.config
        data = _trainer.influence_data(trainer, cfg.train_data, cfg.query_data, cfg.num_queries)
        if data.note and trainer.is_global_zero:
            self._warn("num_queries", data.note)
        output_dir = Path(cfg.output_dir) if cfg.output_dir else Path(
            trainer.log_dir or trainer.default_root_dir) / "influence"
        if self._restored is not None:
            self.run_id = _restored_run_id(self._restored, output_dir)
        with passes.eager():  # the set-up check runs a compiled model's code eagerly
            self._loop = LoopProtocol(cfg, _trainer.influence_model(trainer, pl_module), output_dir=output_dir,
                                       is_global_zero=trainer.is_global_zero, loggers=trainer.loggers,
                                       train_data=data.train, query_data=data.queries, query_ids=data.query_ids,
                                       autocast=_trainer.autocast_dtype(trainer), run_id=self.run_id,
                                       show_progress=getattr(trainer, "progress_bar_callback", None) is not None)
        self.run_id = self._loop.run_id
        tracked = [layer.module for layer in self._loop.statistics.layers]
        problem = _trainer.unsupported_training(trainer, pl_module, tracked)
        if problem:
            raise ValueError(problem)
        if _trainer.compiled_contexts(pl_module, tracked):
            # Code compiled before the hooks existed would skip them (torch.compile does not guard
            # on module hooks): recompile from scratch, once.
            log.info("lightning-influence: clearing torch.compile caches so compiled code runs the influence hooks")
            torch._dynamo.reset()
        if self._restored is not None:
            self._apply_state(self._restored)
            self._restored = None
        self._steps = _StepEvents(self._loop)
        self._loop.attach(pl_module)

    # -- collecting during training ------------------------------------------------------------------
    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        if self._collector is None:
            return
        for message in self.config.check_schedule(
                max_epochs=trainer.max_epochs, max_steps=trainer.max_steps,
                saves_checkpoints=bool(trainer.checkpoint_callbacks),
                total_steps=_trainer.total_steps(trainer), steps_per_epoch=_trainer.steps_per_epoch(trainer)):
            if trainer.is_global_zero:
                self._warn(message, message)
        self._loop.start(trainer.train_dataloader)
        self._resolve_pending(trainer)
        self._loop.publish_owed_reports()  # a resumed run's reports a crash kept from the loggers

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if self._collector is not None:
            self._resolve_pending(trainer)
            self._loop.deliver_reports()
            self._steps.batch_start(trainer, batch)

    def on_before_backward(self, trainer: Any, pl_module: Any, loss: Any) -> None:
        if self._steps is not None:
            self._steps.before_backward(trainer, pl_module, loss)

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self._collector is None or not self._steps.batch_end(trainer):
            return  # still accumulating gradients: the optimizer step has not happened
        if not trainer.sanity_checking:
            self._loop.on_train_step(_trainer.influence_model(trainer, pl_module), trainer.global_step,
                                     trainer.current_epoch, last_batch=trainer.is_last_batch,
                                     observe=partial(self._observe, trainer))

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        # Normally done at the epoch's last batch (before validation and checkpointing); this catches
        # epochs whose last batch was not recognised as such.
        if self._collector is not None and not trainer.sanity_checking:
            self._loop.on_epoch_end(_trainer.influence_model(trainer, pl_module), trainer.global_step,
                                    trainer.current_epoch, observe=partial(self._observe, trainer))

    def on_save_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: Dict[str, Any]) -> None:
        if self._collector is None or trainer.sanity_checking or not _trainer.fitting(trainer):
            return
        self._resolve_pending(trainer)
        self._loop.on_checkpoint(_trainer.influence_model(trainer, pl_module), trainer.global_step,
                                 trainer.current_epoch, observe=partial(self._observe, trainer))
        entry = self._loop.index.find(trainer.global_step)
        if entry is not None:
            entry["awaiting_checkpoint"] = True  # the path is known once the save returns
        # Lightning gathered callback states before this hook: store the state as it is now.
        if isinstance(checkpoint.get("callbacks"), dict) and self.state_key in checkpoint["callbacks"]:
            checkpoint["callbacks"][self.state_key] = self.state_dict()

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        if self._collector is None:
            return
        self._resolve_pending(trainer)
        # Then every report is logged while the loggers are still open.
        self._loop.on_train_end(_trainer.influence_model(trainer, pl_module), trainer.global_step,
                                trainer.current_epoch, observe=partial(self._observe, trainer))

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        if self._collector is not None:
            self._resolve_pending(trainer)
            self._loop.flush_reports()

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        if self._collector is not None:
            self._collector.end_batch()
            self._loop.release_output_dir()

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage == "fit" and self._loop is not None:
            self._loop.detach()
            self._loop.release_output_dir()

    # -- influence at a checkpoint -------------------------------------------------------------------
    def _observe(self, trainer: Any, result: Any, factors: Any) -> None:
        """A new result's monitor scalars reach ``trainer.callback_metrics`` (``EarlyStopping``,
        ``ModelCheckpoint(monitor=...)``)."""
        publish_scalars(trainer.callback_metrics, self._loop.scalars)

    def _resolve_pending(self, trainer: Any) -> None:
        """Record the paths of checkpoints saved at a result's step (known only after the save)."""
        resumed_from = str(trainer.ckpt_path) if trainer.ckpt_path else None
        for entry in self._loop.index.record_checkpoints(partial(_trainer.checkpoints_saved_at, trainer),
                                                         resumed_from, trainer.global_step):
            self._loop.update_meta(entry)

    def _warn(self, key: str, message: str) -> None:
        warn_once(self._warned, key, message)

    # -- state ---------------------------------------------------------------------------------------
    def state_dict(self) -> Dict[str, Any]:
        """Statistics (summed over processes onto rank 0: collective), the pool subset, the result
        index (directories relative to ``output_dir``, so a moved run resumes) and pending
        checkpoint paths."""
        loop = self._loop
        state: Dict[str, Any] = {"version": STATE_VERSION, "config": self.config.resume_fingerprint(),
                                 "run_id": self.run_id}
        if loop is not None:
            loop.statistics.consolidate_()
            state.update(index=loop.index.state(), pool_ids=loop.session.pool_ids, failures=loop.failures,
                         collector=loop.statistics.state_dict())
        elif self._restored is not None:
            state.update({k: self._restored[k] for k in ("index", "collector", "pool_ids", "failures", "layers")
                          if k in self._restored})
        return state

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        if state_dict.get("version") not in range(1, STATE_VERSION + 1):
            raise ValueError(f"cannot resume InfluenceCallback state of version {state_dict.get('version')!r} "
                             f"(this version reads 1 to {STATE_VERSION})")
        self.config.check_resumable(state_dict["config"])
        if self._loop is not None:
            self._apply_state(state_dict)
        else:
            self._restored = state_dict

    def _apply_state(self, state: Dict[str, Any]) -> None:
        loop = self._loop
        if "collector" in state:  # version 1 kept the tracked layers beside the collector's state
            loop.statistics.load_state_dict({"layers": state.get("layers"), **state["collector"]}
                                            if "layers" in state else state["collector"])
        loop.index.load_state(state.get("index", []))
        loop.failures = int(state.get("failures", 0))
        if state.get("pool_ids") is not None:
            loop.session.pool_ids = state["pool_ids"]


def _restored_run_id(state: Dict[str, Any], output_dir: Path) -> Optional[str]:
    """The run id of a checkpoint's state; states before version 3 kept none: the run id their
    saved results recorded (``None``: a new one is made)."""
    if state.get("run_id"):
        return state["run_id"]
    for entry in state.get("index", []):
        found = saved_run_id(output_dir / current_entry(entry)["dir"])
        if found:
            return found
    return None


class _StepEvents:
    """Lightning's training-step hooks as :class:`LoopProtocol` events: the optimizer step a batch
    belongs to, its learning rate, accumulation and AMP loss scale, and the check that a step runs
    one backward pass."""

    def __init__(self, loop: LoopProtocol) -> None:
        self.loop = loop
        self._step_at_batch_start = -1
        self._backward_passes = 0

    def batch_start(self, trainer: Any, batch: Any) -> None:
        self._step_at_batch_start = trainer.global_step
        self._backward_passes = 0
        self.loop.on_batch_start(batch, trainer.global_step, lr=learning_rate(trainer.optimizers) or 0.0,
                                 accumulation=trainer.accumulate_grad_batches,
                                 loss_scale=_trainer.loss_scale(trainer))

    def before_backward(self, trainer: Any, pl_module: Any, loss: Any) -> None:
        self._backward_passes += 1
        if self._backward_passes > 1:
            raise ValueError(
                f"training_step ran {self._backward_passes} backward passes in one step (manual_backward calls, e.g. "
                "one per optimizer as in a GAN, or an optimizer such as LBFGS that re-evaluates its closure); "
                "InfluenceCallback's statistics need one backward pass of one loss per training step: add the "
                "losses and call manual_backward once, or train without InfluenceCallback")
        self.loop.on_before_backward(loss)

    def batch_end(self, trainer: Any) -> bool:
        """Stop recording the batch; commit the statistics when the optimizer stepped (returned)."""
        self.loop.on_batch_end()
        if trainer.global_step == self._step_at_batch_start:
            return False
        self.loop.on_optimizer_step(_trainer.loss_scale(trainer))  # GradScaler backs off when it skips
        return True


class InfluenceCallback(InfluenceCallbackMixin, pl.Callback):
    __doc__ = InfluenceCallbackMixin.__doc__ + "\n    For ``pytorch_lightning`` Trainers; ``lightning.pytorch`` users import " \
        "``lightning_influence.lightning.InfluenceCallback``.\n"
