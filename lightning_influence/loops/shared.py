"""What every training loop shares: settings, statistics, the session, the results on
disk and their publishing. Framework-free: the Lightning callback, the Fabric helper and the Hugging
Face callback translate their loop's events into the calls of
:class:`~lightning_influence.loops.protocol.LoopProtocol`, which drives the class below."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
from torch import nn

from lightning_influence.engine import distributed
from lightning_influence.engine import passes
from lightning_influence.engine.collector import StepStatistics
from lightning_influence._deprecated import regroup
from lightning_influence.config import InfluenceConfig
from lightning_influence.engine.freshness import STALE_WARNING_GAP
from lightning_influence.results import InfluenceResult, new_run_id
from lightning_influence.checkpoint.run_dir import OutputDirectory
from lightning_influence.checkpoint.index import ResultIndex
from lightning_influence.checkpoint.run_dir import check_writable
from lightning_influence.checkpoint.session import InfluenceSession
from lightning_influence.engine.tracking import select_layers

log = logging.getLogger(__name__)


def loop_config(settings: Dict[str, Any], not_applicable: Dict[str, str], owner: str,
                **arguments: Any) -> InfluenceConfig:
    """A validated :class:`InfluenceConfig` from an integration's own ``arguments`` and the user's
    further ``settings`` (the groups, or the deprecated flat names); settings that belong to the
    Lightning callback only are refused with what to use instead."""
    for name, instead in not_applicable.items():
        if name in settings:
            raise ValueError(f"{name} does not apply here: {instead}")
    settings = regroup(settings, owner, stacklevel=4)
    config = InfluenceConfig.from_mapping(dict(settings, **arguments)).validate()
    if isinstance(config.query_data, str):
        raise ValueError(f"query_data={config.query_data!r} names a Lightning Trainer's split; pass the queries as a "
                         "Dataset or DataLoader")
    if config.train_data is None:
        raise ValueError("train_data is required: the candidate pool, a map-style Dataset or a DataLoader")
    return config


class LoopResults:
    """What every loop integration exposes of its :class:`LoopInfluence` (``self._loop``, ``None``
    until the loop starts): results, statistics and their size."""

    _loop: Optional["LoopInfluence"] = None

    @property
    def results(self) -> List[InfluenceResult]:
        """One :class:`~lightning_influence.InfluenceResult` per computation, oldest first (tensors load lazily)."""
        return self._loop.results if self._loop is not None else []

    @property
    def statistics(self):
        """The accumulated :class:`~lightning_influence.CovarianceStatistics` of this process."""
        return self._loop.statistics.stats if self._loop is not None else None

    @property
    def steps_skipped(self) -> int:
        """Collected steps dropped because they were skipped (AMP) or not finite."""
        return int(self._loop.statistics.steps_skipped) if self._loop is not None else 0

    def statistics_bytes(self) -> int:
        """Bytes of curvature statistics this process holds during training (the sums and one
        step's buffer; with ``shard_statistics`` only its own layers'); 0 before training starts."""
        return self._loop.statistics.held_bytes() if self._loop is not None else 0


class LoopInfluence:
    """Statistics from a loop's training steps and influence at the checkpoints the loop asks for.

    Args:
        config: validated settings.
        model: the model being trained (unwrapped: the module whose layers are tracked).
        output_dir: where results go, ``<output_dir>/step=<N>/``.
        is_global_zero: this process writes files and logs (all processes compute: collectives).
        loggers: what :class:`~lightning_influence.ResultPublisher` logs to (Lightning loggers, a
            ``wandb`` run); resolved at each computation, so a run started later is found.
        loss_reduction: overrides ``config.loss_reduction`` (a loop that knows its loss).
        train_data, query_data, query_ids: the pool and the queries when the loop found them itself
            (e.g. a Trainer's own data); default ``config.train_data`` / ``config.query_data``.
        autocast: the training steps' autocast dtype (mixed precision), which the session's own
            forward passes then use too; ``None`` for full precision.
        show_progress: whether the loop shows progress bars of its own (what ``report.show_progress=None``
            follows).
        run_id: the run these results belong to, kept by a resumed run (default: a new run). Its
            ``output_dir`` is claimed for it at once (see :mod:`~lightning_influence.checkpoint.run_dir`; a
            default directory, ``config.output_dir=None``, is versioned when another run has it):
            call :meth:`close` when the run ends, normally or not.
    """

    def __init__(self, config: InfluenceConfig, model: nn.Module, *, output_dir: Path, is_global_zero: bool,
                 loggers: Any = (), loss_reduction: Optional[str] = None, train_data: Any = None,
                 query_data: Any = None, query_ids: Optional[Sequence[int]] = None,
                 autocast: Optional[torch.dtype] = None, run_id: Optional[str] = None,
                 show_progress: bool = True) -> None:
        cfg = self.config = config
        # report.show_progress=None: as the loop shows its own (``show_progress``, the loop's)
        self.show_progress = show_progress if cfg.report.show_progress is None else cfg.report.show_progress
        self.run_id = distributed.gather_objects(run_id or new_run_id())[0]  # process 0's, on every process
        self.task = cfg.build_task()
        mib = 2**20
        curvature = cfg.curvature
        layers = select_layers(
            model, curvature.layers, curvature.exclude,
            max_layer_bytes=int(curvature.max_layer_mb * mib) if curvature.max_layer_mb else None,
            memory_budget_bytes=int(curvature.memory_budget_mb * mib) if curvature.memory_budget_mb else None,
        )
        self.is_global_zero = is_global_zero
        self.session = InfluenceSession(
            self.task, train_data if train_data is not None else cfg.train_data,
            query_data if query_data is not None else cfg.query_data, query_ids=query_ids,
            curvature=curvature, scoring=cfg.scoring, seed=cfg.seed,
            show_progress=self.show_progress and is_global_zero, run_config=cfg.to_dict(), autocast=autocast,
            run_id=self.run_id,
        )
        self.index = ResultIndex()
        self.output = OutputDirectory(Path(output_dir), self.run_id, versioned=cfg.output_dir is None)
        if is_global_zero:
            check_writable(self.output.path)  # before the slower checks below
        self.statistics = StepStatistics(
            layers, self.task, fisher=curvature.fisher, loss_reduction=loss_reduction or curvature.loss_reduction,
            max_tokens_per_step=curvature.max_tokens_per_step, window=curvature.window,
            ema_decay=0.99 if curvature.ema_decay is None else curvature.ema_decay,
            dtype=getattr(torch, curvature.covariance_dtype), device=passes.model_device(model), seed=cfg.seed,
            statistics_device=curvature.statistics_device, shard=curvature.shard_statistics,
        )
        self.session.check(model, layers)
        self.index.output_dir = self._claim_output_dir()
        self._loggers = loggers
        self._publisher = None
        self._warned: set = set()
        self.failures = 0
        self._failed_step = -1  # a computation that failed is not retried by another trigger at its step
        if is_global_zero:
            log.info("lightning-influence: %s", self.session.memory_estimate(layers))

    def _claim_output_dir(self) -> Path:
        """Process 0 claims ``output_dir``; every process learns where results go, or raises its
        refusal alike (collective)."""
        claimed: Dict[str, str] = {}
        if self.is_global_zero:
            try:
                self.output.claim()
                claimed["path"] = str(self.output.path)
            except ValueError as err:
                claimed["refused"] = str(err)
        claimed = distributed.gather_objects(claimed)[0]
        if "refused" in claimed:
            raise ValueError(claimed["refused"])
        return Path(claimed["path"])

    @property
    def results(self) -> List[InfluenceResult]:
        return self.index.results()

    def warn_once(self, key: str, message: str) -> None:
        if self.is_global_zero:
            warn_once(self._warned, key, message)

    def compute(self, model: nn.Module, *, step: int, epoch: Optional[int], reason: str,
                observe: Optional[Callable[..., None]] = None) -> Optional[InfluenceResult]:
        """Influence at ``step`` (once per step: another trigger at the same step only adds its
        reason). A failure is warned about and returns ``None`` unless ``on_error="raise"``.
        ``observe(result, factors)`` completes a new result before it is saved (e.g. monitors).
        Collective: call on every process."""
        try:
            entry = self.index.find(step)
            if entry is not None:
                if reason not in entry["reasons"]:
                    entry["reasons"].append(reason)
                    self.update_meta(entry)
            elif step == self._failed_step:
                return None
            else:
                with torch.inference_mode(False), torch.enable_grad():
                    self._run(model, step, epoch, reason, observe)
            return self._result_at(step)
        except Exception as err:  # noqa: BLE001 - the influence machinery never ends a training run
            self.failures += 1
            self._failed_step = step
            self._failed(f"influence computation at step {step}", err)
            return None

    def update_meta(self, entry: Dict[str, Any]) -> None:
        """Record an entry's reasons and checkpoint paths in its saved result (process 0; a failure
        is handled as ``on_error`` says)."""
        if not self.is_global_zero:
            return
        try:
            self.index.write_meta(entry)
        except (OSError, ValueError) as err:
            self._failed(f"recording the checkpoint of step {entry['step']} in its influence result", err)

    def _failed(self, what: str, err: Exception) -> None:
        """``on_error``: re-raise ``err`` (``"raise"``), or warn that training continues."""
        if self.config.on_error == "raise":
            raise err
        warnings.warn(f"lightning-influence: {what} failed ({type(err).__name__}: {err}); training continues",
                      RuntimeWarning, stacklevel=3)

    def _result_at(self, step: int) -> Optional[InfluenceResult]:
        return next((r for r in self.results if r.step == step), None)

    def _run(self, model: nn.Module, step: int, epoch: Optional[int], reason: str,
             observe: Optional[Callable[..., None]]) -> None:
        stats = self.session.reduce_statistics(self.statistics)
        if stats.is_empty():
            raise RuntimeError(f"no statistics were collected before step {step} (collect_every_n_steps="
                               f"{self.config.curvature.collect_every_n_steps}); influence cannot be computed there")
        collector = self.statistics
        meta = {"reasons": [reason], "checkpoint_path": None, "checkpoint_paths": [], "config": self.config.to_dict(),
                "steps_collected": float(collector.steps_in_window),
                "steps_collected_total": float(collector.steps_committed), "steps_skipped": float(collector.steps_skipped)}
        result, factors = self.session.compute(model, stats, step=step, epoch=epoch, meta=meta,
                                               layers=collector.layers)
        self._warn_if_stale(step, result.meta.get("curvature") or {})
        if observe is not None:
            observe(result, factors)
        self.session.stage_factors(factors, self.index.output_dir / f"step={step}")
        collector.reset()  # on every process alike, whether or not process 0 manages to write
        if self.is_global_zero:
            self._save(step, result, factors)
        self.index.add(step, epoch, reason)

    def _warn_if_stale(self, step: int, curvature: Dict[str, Any]) -> None:
        used, fresh = curvature.get("staleness_used"), curvature.get("fresh_staleness")
        if used is not None and fresh is not None and used - fresh > STALE_WARNING_GAP:
            self.warn_once("staleness", (
                f"the curvature statistics used at step {step} are stale: their eigenbasis leaves {used:.0%} of the "
                f"curvature at the scored weights off its diagonal, a basis from half of the correction examples "
                f"{fresh:.0%}; the scores may differ from a refit's. curvature.refresh='auto' refreshes stale layers "
                "at each computation"))

    def _save(self, step: int, result: InfluenceResult, factors: Any) -> None:
        """Write the result (an ``OSError`` says where it could not be written: the step is then not
        indexed, and ``on_error`` decides whether training goes on), then publish it."""
        path = self.index.output_dir / f"step={step}"
        try:
            InfluenceSession.write(result, factors, path, overwrite=True)
        except OSError as err:
            raise OSError(f"could not write the influence result to {path} ({err})") from err
        publisher = self._publisher_now()
        if publisher is not None:
            self._publish(publisher, result, step, history=self.results + [result])

    def _publish(self, publisher: Any, result: InfluenceResult, step: int, history: List[InfluenceResult]) -> None:
        try:
            pool = None if self.session.streaming else self.session.pool  # a stream cannot be indexed by id
            publisher.publish(result, step=step, train_dataset=pool, query_dataset=self.session.queries,
                              history=history)
        except Exception as err:  # noqa: BLE001 - reporting never ends training
            self.warn_once("publish", f"publishing influence results failed ({type(err).__name__}: {err}); "
                                      f"the result is saved under {result.path}")

    def publish_owed_reports(self) -> None:
        """After a resume, publish what a crash kept from the loggers: each saved result of this
        run whose report was never delivered gets it now, logged at the result's own step."""
        publisher = self._publisher_now() if self.is_global_zero else None
        if publisher is None:
            return
        results = self.results
        for position, result in enumerate(results):
            if not publisher.delivered(result):
                self._publish(publisher, result, result.step, history=results[:position + 1])

    def _publisher_now(self):
        """The publisher, built at the first computation: the loggers exist by then (Hugging Face
        starts its W&B run after the callbacks are set up)."""
        if self.config.report.mode == "off":
            return None
        if self._publisher is None:
            loggers = list(self._loggers() if callable(self._loggers) else self._loggers)
            from lightning_influence.reporting.publisher import ResultPublisher

            cfg = self.config
            kwargs = dict(renderer=cfg.report.renderer, top_k=cfg.scoring.top_k, log_artifacts=cfg.report.log_artifacts,
                          background=cfg.report.mode == "background")
            try:
                self._publisher = ResultPublisher(loggers, **kwargs)
            except TypeError as err:
                self.warn_once("publisher", f"influence results will only be written to disk: {err}")
                self._publisher = ResultPublisher((), **kwargs)
        return self._publisher

    def deliver_reports(self) -> None:
        """Log the reports the background worker has completed (never waits): call from the
        loop's frequent events, so logged figures follow the computations closely."""
        if self._publisher is not None:
            self._reporting(self._publisher.deliver_ready)

    def flush_reports(self) -> None:
        """Wait for the background reports, log them and end the worker thread: call when
        training ends, normally or not (nothing is lost, no thread is left running)."""
        if self._publisher is not None:
            self._reporting(self._publisher.flush)

    def _reporting(self, call: Callable[[], None]) -> None:
        try:
            call()
        except Exception as err:  # noqa: BLE001 - reporting never ends training
            self.warn_once("publish", f"publishing influence results failed ({type(err).__name__}: {err}); "
                                      f"the results are saved under {self.index.output_dir}")

    def add_checkpoint_path(self, step: int, path: str) -> None:
        """Record a checkpoint saved at ``step`` in that step's result (process 0)."""
        entry = self.index.find(step)
        if entry is None or path in entry["checkpoint_paths"]:
            return
        entry["checkpoint_paths"].append(path)
        self.update_meta(entry)

    def release_output_dir(self) -> None:
        """Deliver the pending reports, then let other runs have ``output_dir`` (process 0)."""
        try:
            self.flush_reports()
        finally:
            self.output.release()

    def close(self) -> None:
        """End of the run: reports delivered, ``output_dir`` released, hooks removed."""
        self.release_output_dir()
        self.statistics.end_batch()
        self.statistics.detach()


def warn_once(seen: set, key: str, message: str) -> None:
    """A ``RuntimeWarning`` the first time ``key`` is reported (``seen`` remembers the keys)."""
    if key not in seen:
        seen.add(key)
        warnings.warn(f"lightning-influence: {message}", RuntimeWarning, stacklevel=4)


def unwrapped(model: Any) -> nn.Module:
    """The user's module inside a framework wrapper (Fabric's ``_FabricModule``, DDP)."""
    while hasattr(model, "module") and isinstance(getattr(model, "module"), nn.Module):
        model = model.module
    return model
