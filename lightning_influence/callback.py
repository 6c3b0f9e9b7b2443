"""The Lightning callback: curvature from the training steps, influence at checkpoints.

Thin glue over the Lightning-free core: :class:`~lightning_influence.collector.StepStatistics`
turns the training steps' hooks into covariance statistics, and
:class:`~lightning_influence.session.InfluenceSession` computes, writes and describes the influence
at each checkpoint. What stays here needs Lightning: translating the trainer's hooks, triggers,
state in checkpoints, process ranks, and handing results to the trainer's loggers.

``pytorch_lightning`` and ``lightning.pytorch`` each need a subclass of their own ``Callback`` (a
Trainer accepts only its package's callbacks): :class:`InfluenceCallback` here, and
``lightning_influence.lightning.InfluenceCallback``; both mix in :class:`InfluenceCallbackMixin`.
"""

from __future__ import annotations

import logging
import warnings
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import torch
from torch.utils.data import DataLoader, Dataset, Subset

import pytorch_lightning as pl

from lightning_influence import _trainer, distributed, passes
from lightning_influence.collector import StepStatistics
from lightning_influence.config import InfluenceConfig
from lightning_influence.results import InfluenceResult
from lightning_influence.session import InfluenceSession, ResultIndex, prepare_output_dir
from lightning_influence.tasks import Task
from lightning_influence.tracking import select_layers

log = logging.getLogger(__name__)

STATE_VERSION = 2  # 2: result directories stored relative to output_dir


class InfluenceCallbackMixin:
    """Accumulate EK-FAC curvature while training; score training examples at checkpoints.

    The arguments are the fields of :class:`~lightning_influence.InfluenceConfig`, where each is
    documented (and in the README's configuration reference); ``from_config`` takes an
    ``InfluenceConfig``, a dict or an OmegaConf ``DictConfig`` instead. Statistics come from the
    training steps' own forward and backward passes; at each trigger (``every_n_epochs``,
    ``every_n_train_steps``, ``on_checkpoint``, ``on_train_end``; one computation per step) the
    :class:`~lightning_influence.session.InfluenceSession` scores the candidate pool against the
    queries and writes ``<output_dir>/step=<N>/``; :attr:`results` lists them.
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
        exclude: Optional[Sequence[str]] = (),
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
        self._configure(InfluenceConfig(
            task=task, query_data=query_data, num_queries=num_queries, train_data=train_data,
            every_n_epochs=every_n_epochs, every_n_train_steps=every_n_train_steps, on_checkpoint=on_checkpoint,
            on_train_end=on_train_end, output_dir=output_dir, strategy=strategy, fisher=fisher, damping=damping,
            layers=layers, exclude=exclude, collect_every_n_steps=collect_every_n_steps,
            max_tokens_per_step=max_tokens_per_step, loss_reduction=loss_reduction, window=window,
            ema_decay=ema_decay, correction_batches=correction_batches, max_train_examples=max_train_examples,
            seed=seed, query_rank=query_rank, top_k=top_k, batch_size=batch_size, renderer=renderer,
            max_layer_mb=max_layer_mb, memory_budget_mb=memory_budget_mb, covariance_dtype=covariance_dtype,
            report=report, log_artifacts=log_artifacts, show_progress=show_progress, on_error=on_error,
        ))

    @classmethod
    def from_config(cls, config: Union[InfluenceConfig, Dict[str, Any], Any]) -> "InfluenceCallbackMixin":
        """Build from an :class:`InfluenceConfig`, a dict or an OmegaConf/Hydra ``DictConfig``."""
        callback = cls.__new__(cls)
        callback._configure(InfluenceConfig.coerce(config))
        return callback

    def _configure(self, config: InfluenceConfig) -> None:
        self.config = config.validate()
        self.task: Task = config.build_task()
        self._collector: Optional[StepStatistics] = None
        self._session: Optional[InfluenceSession] = None
        self._index = ResultIndex()  # one entry per computation, oldest first
        self._restored: Optional[Dict[str, Any]] = None  # loaded before the collector existed
        self._failures = 0
        self._failed_step = -1  # a computation that failed is not retried by another trigger at its step
        self._warned: set = set()
        self._output_hook = None
        self._last_outputs: Any = None
        self._step_at_batch_start = -1
        self._backward_passes = 0
        self._collecting = False
        self._loss_checked = False
        self._window_scale: Optional[float] = None
        self._publisher = None
        self._query_dataset: Any = None

    # -- public state ------------------------------------------------------------------------------
    @property
    def results(self) -> List[InfluenceResult]:
        """One :class:`InfluenceResult` per computation, oldest first (tensors load lazily)."""
        return self._index.results()

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
        problem = _trainer.unsupported(trainer, pl_module)
        if problem:
            raise ValueError(problem)

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        cfg = self.config
        mib = 2**20
        layers = select_layers(
            pl_module, cfg.layers, cfg.exclude,
            max_layer_bytes=int(cfg.max_layer_mb * mib) if cfg.max_layer_mb else None,
            memory_budget_bytes=int(cfg.memory_budget_mb * mib) if cfg.memory_budget_mb else None,
        )
        tracked = [layer.module for layer in layers]
        problem = _trainer.unsupported_training(trainer, pl_module, tracked)
        if problem:
            raise ValueError(problem)
        self._session = self._make_session(trainer)
        output_dir = Path(cfg.output_dir) if cfg.output_dir else Path(
            trainer.log_dir or trainer.default_root_dir) / "influence"
        self._index.output_dir = output_dir
        if trainer.is_global_zero:
            prepare_output_dir(output_dir)
        self._collector = StepStatistics(
            layers, self.task, fisher=cfg.fisher, loss_reduction=cfg.loss_reduction,
            max_tokens_per_step=cfg.max_tokens_per_step, window=cfg.window, ema_decay=cfg.ema_decay,
            dtype=getattr(torch, cfg.covariance_dtype), device=passes.model_device(pl_module), seed=cfg.seed,
        )
        if self._restored is not None:
            self._apply_state(self._restored)
            self._restored = None
        with passes.eager():
            self._session.check(pl_module, layers)
        self._collector.attach()
        if cfg.fisher == "true":
            self._output_hook = pl_module.register_forward_hook(torch.compiler.disable(self._capture_outputs))
        if _trainer.compiled_contexts(pl_module, tracked):
            # Code compiled before the hooks existed would skip them (torch.compile does not guard
            # on module hooks): recompile from scratch, once.
            log.info("lightning-influence: clearing torch.compile caches so compiled code runs the influence hooks")
            torch._dynamo.reset()
        if trainer.is_global_zero:
            log.info("lightning-influence: %s", self._session.memory_estimate(layers))
            if cfg.report:
                self._publisher = self._make_publisher(trainer)

    def _make_session(self, trainer: Any) -> InfluenceSession:
        cfg = self.config
        data = _trainer.influence_data(trainer, cfg.train_data, cfg.query_data, cfg.num_queries)
        if data.note and trainer.is_global_zero:
            self._warn("num_queries", data.note)
        self._query_dataset = data.query_dataset
        return InfluenceSession(
            self.task, data.train, data.queries, query_ids=data.query_ids, max_train_examples=cfg.max_train_examples,
            strategy=cfg.strategy, fisher=cfg.fisher, damping=cfg.damping, query_rank=cfg.query_rank,
            top_k=cfg.top_k, batch_size=cfg.batch_size, correction_batches=cfg.correction_batches, seed=cfg.seed,
            show_progress=cfg.show_progress and trainer.is_global_zero, run_config=cfg.to_dict(),
        )

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
        for message in self.config.check_schedule(
                max_epochs=trainer.max_epochs, max_steps=trainer.max_steps,
                saves_checkpoints=bool(trainer.checkpoint_callbacks),
                total_steps=_trainer.total_steps(trainer), steps_per_epoch=_trainer.steps_per_epoch(trainer)):
            if trainer.is_global_zero:
                self._warn(message, message)
        self._resolve_pending(trainer)

    def _capture_outputs(self, module: Any, inputs: Any, output: Any) -> None:
        if self._collecting and self._collector.recording:
            self._last_outputs = output

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if self._collector is None:
            return
        self._resolve_pending(trainer)
        self._step_at_batch_start = trainer.global_step
        self._backward_passes = 0
        self._collecting = trainer.global_step % self.config.collect_every_n_steps == 0
        if not self._collecting:
            return
        scale = _trainer.loss_scale(trainer)
        if self._window_scale is None:
            self._window_scale = scale
        self._collector.begin_batch(batch, accumulation=trainer.accumulate_grad_batches, loss_scale=scale)

    def on_before_backward(self, trainer: Any, pl_module: Any, loss: Any) -> None:
        self._backward_passes += 1
        if self._backward_passes > 1:
            raise ValueError(
                f"training_step ran {self._backward_passes} backward passes in one step (manual_backward calls, e.g. "
                "one per optimizer as in a GAN, or an optimizer such as LBFGS that re-evaluates its closure); "
                "InfluenceCallback's statistics need one backward pass of one loss per training step: add the "
                "losses and call manual_backward once, or train without InfluenceCallback")
        if not (self._collecting and self._collector.recording):
            return
        self._collector.begin_backward()
        outputs, self._last_outputs = self._last_outputs, None
        with passes.eager():
            if not self._loss_checked:  # once, on the first collected step
                self._loss_checked = True
                message = self._collector.check_loss_reduction(pl_module, loss)
                if message and trainer.is_global_zero:
                    self._warn("loss-reduction", message)
            if self.config.fisher == "true":
                self._collector.sample_true_fisher(pl_module, outputs)

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self._collector is None:
            return
        if self._collecting:
            self._collector.end_batch()
            self._last_outputs = None
            self._collector.check_single_runs()
        if trainer.global_step == self._step_at_batch_start:
            return  # still accumulating gradients: the optimizer step has not happened
        if self._window_scale is not None:
            skipped = _trainer.loss_scale(trainer) < self._window_scale  # GradScaler backs off when it skips
            self._collector.commit(valid=not skipped)
            self._window_scale = None
        cfg = self.config
        if cfg.every_n_train_steps and trainer.global_step % cfg.every_n_train_steps == 0:
            self._compute(trainer, pl_module, "every_n_train_steps")
        if cfg.every_n_epochs and trainer.is_last_batch and (trainer.current_epoch + 1) % cfg.every_n_epochs == 0:
            self._compute(trainer, pl_module, "every_n_epochs")

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        # Normally done at the epoch's last batch (before validation and checkpointing); this catches
        # epochs whose last batch was not recognised as such.
        every = self.config.every_n_epochs
        if self._collector is not None and every and (trainer.current_epoch + 1) % every == 0:
            self._compute(trainer, pl_module, "every_n_epochs")

    def on_save_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: Dict[str, Any]) -> None:
        if self._collector is None or trainer.sanity_checking or not _trainer.fitting(trainer):
            return
        self._resolve_pending(trainer)
        if self.config.on_checkpoint:
            self._compute(trainer, pl_module, "checkpoint")
        entry = self._index.find(trainer.global_step)
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
    def _compute(self, trainer: Any, pl_module: Any, reason: str) -> None:
        """One influence computation per global step, whatever triggered it."""
        step = trainer.global_step
        entry = self._index.find(step)
        if entry is not None:
            if reason not in entry["reasons"]:
                entry["reasons"].append(reason)
                if trainer.is_global_zero:
                    self._index.write_meta(entry)
            return
        if trainer.sanity_checking or step == self._failed_step:
            return
        try:
            # Validation hooks run in inference mode; the engine's passes run compiled models eagerly.
            with torch.inference_mode(False), torch.enable_grad(), passes.eager():
                self._run(trainer, pl_module, step, reason)
        except Exception as err:  # noqa: BLE001 - the influence machinery never ends a training run
            if self.config.on_error == "raise":
                raise
            self._failures += 1
            self._failed_step = step
            warnings.warn(f"lightning-influence: influence computation at step {step} failed "
                          f"({type(err).__name__}: {err}); training continues", RuntimeWarning, stacklevel=2)

    def _run(self, trainer: Any, pl_module: Any, step: int, reason: str) -> None:
        stats = self._collector.reduced()
        if stats.is_empty():
            raise RuntimeError(f"no statistics were collected before step {step} (collect_every_n_steps="
                               f"{self.config.collect_every_n_steps}); influence cannot be computed there")
        collector = self._collector
        meta = {"reasons": [reason], "checkpoint_path": None, "checkpoint_paths": [], "config": self.config.to_dict(),
                "steps_collected": float(collector.steps_committed), "steps_skipped": float(collector.steps_skipped)}
        result, factors = self._session.compute(pl_module, stats, step=step, epoch=trainer.current_epoch, meta=meta)
        if trainer.is_global_zero:
            self._save(step, result, factors)
        self._index.add(step, trainer.current_epoch, reason)
        self._collector.reset()

    def _save(self, step: int, result: InfluenceResult, factors: Any) -> None:
        """Rank 0: write the result with its factors, then hand it to the loggers."""
        path = self._index.output_dir / f"step={step}"
        try:
            # Replacing is safe: only a computation of this run at this step writes this directory.
            InfluenceSession.write(result, factors, path, overwrite=True)
        except OSError as err:
            self._warn(f"write-{step}", f"could not write the influence result to {path} ({err}); "
                                                 "training continues")
            return
        if self._publisher is not None:
            history = self.results + [result]
            try:
                self._publisher.publish(result, step=step, train_dataset=self._session.pool,
                                        query_dataset=self._query_dataset, history=history)
            except Exception as err:  # noqa: BLE001 - reporting never ends training
                self._warn("publish", f"publishing influence results failed ({type(err).__name__}: {err}); "
                                      f"the result is saved under {path}")

    def _resolve_pending(self, trainer: Any) -> None:
        """Record the paths of checkpoints saved at a result's step (known only after the save)."""
        for entry in self._index.entries:
            if not entry.get("awaiting_checkpoint"):
                continue
            paths = _trainer.checkpoints_saved_at(trainer, entry["step"])
            if entry.get("restored") and trainer.ckpt_path:
                paths.append(str(trainer.ckpt_path))
            new = [p for p in paths if p not in entry["checkpoint_paths"]]
            if new:
                entry["checkpoint_paths"].extend(new)
                if trainer.is_global_zero:
                    self._index.write_meta(entry)
            if new or trainer.global_step > entry["step"] or entry.get("restored"):
                entry["awaiting_checkpoint"] = False
                entry.pop("restored", None)

    def _warn(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(f"lightning-influence: {message}", RuntimeWarning, stacklevel=3)

    # -- state ---------------------------------------------------------------------------------------
    def state_dict(self) -> Dict[str, Any]:
        """Statistics (summed over processes onto rank 0: collective), the pool subset, the result
        index (directories relative to ``output_dir``, so a moved run resumes) and pending
        checkpoint paths."""
        state: Dict[str, Any] = {
            "version": STATE_VERSION, "config": self.config.resume_fingerprint(), "index": self._index.state(),
            "pool_ids": self._session.pool_ids if self._session is not None else None, "failures": self._failures,
        }
        if self._collector is not None:
            self._collector.consolidate_()
            state["layers"] = [[layer.name, layer.d_out, layer.d_in] for layer in self._collector.layers]
            state["collector"] = self._collector.state_dict()
        elif self._restored is not None:
            state.update({k: self._restored[k] for k in ("layers", "collector", "pool_ids") if k in self._restored})
        return state

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        if state_dict.get("version") not in (1, STATE_VERSION):
            raise ValueError(f"cannot resume InfluenceCallback state of version {state_dict.get('version')!r} "
                             f"(this version reads 1 and {STATE_VERSION})")
        mine, theirs = self.config.resume_fingerprint(), state_dict["config"]
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
        self._index.load_state(state["index"])
        for entry in self._index.entries:
            if entry.get("awaiting_checkpoint"):
                entry["restored"] = True  # its checkpoint is the one being resumed from
        self._failures = int(state.get("failures", 0))
        if state.get("pool_ids") is not None:
            self._session.pool_ids = state["pool_ids"]


class InfluenceCallback(InfluenceCallbackMixin, pl.Callback):
    __doc__ = InfluenceCallbackMixin.__doc__ + "\n    For ``pytorch_lightning`` Trainers; ``lightning.pytorch`` users import " \
        "``lightning_influence.lightning.InfluenceCallback``.\n"
