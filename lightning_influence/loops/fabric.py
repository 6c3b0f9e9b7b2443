"""Influence in a Lightning Fabric loop: statistics from your training steps, results on request.

Usage (three touch points in the loop)::

    monitor = InfluenceMonitor(fabric, model, li.ClassificationTask(), train_data=train_set,
                               query_data=query_set, output_dir="runs/influence")
    for batch in loader:
        with monitor.step(batch, optimizer=optimizer):   # records the forward/backward of this batch
            loss = F.cross_entropy(model(batch[0]), batch[1])
            monitor.backward(loss)              # instead of fabric.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        monitor.optimizer_step()                # commits the step's statistics
        if monitor.global_step % 100 == 0:
            monitor.compute()                   # writes <output_dir>/step=<N>/, logs to fabric.loggers
    monitor.close()                             # the last reports logged, hooks removed

Settings are :class:`~lightning_influence.InfluenceConfig` fields (validated there); the callback's
triggers do not apply, since the loop calls :meth:`InfluenceMonitor.compute` itself. The
collection cadence, the monitors (``meta["window"]``, ``meta["monitors"]``) and the per-step ledger
(``scoring.ledger``: pass each batch's example ids, ``monitor.step(batch, ids=...)``, or the training
DataLoader once, ``monitor.start(loader)``) are the Lightning callback's, run by
:class:`~lightning_influence.loops.protocol.LoopProtocol`; ``optimizer=`` gives the learning rate. Under DDP
(``Fabric(strategy="ddp")``) every process calls every method; statistics are summed across
processes and only process 0 writes and logs. Reports (figures, ``report/``, logged media) are
completed in the background (``report.mode="background"``, the default): the loggers get each one at a
later ``step`` or at ``close`` (``report.mode="foreground"``: before the computing step returns).
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Any, Dict, Iterator, Optional, Union

from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from lightning_influence.engine import passes
from lightning_influence.engine.collector import scaler_scale
from lightning_influence.config import CurvatureConfig, ReportConfig, ScoringConfig
from lightning_influence.loops.monitoring import learning_rate
from lightning_influence.loops.shared import LoopResults, loop_config, unwrapped
from lightning_influence.loops.protocol import LoopProtocol
from lightning_influence.results import InfluenceResult
from lightning_influence.tasks import Task

__all__ = ["InfluenceMonitor"]

_TRIGGER = "call monitor.compute() where the loop wants influence"
NOT_APPLICABLE = {"every_n_epochs": _TRIGGER, "every_n_train_steps": _TRIGGER, "on_checkpoint": _TRIGGER,
                  "on_train_end": _TRIGGER, "num_queries": "pass the queries themselves as query_data"}


class InfluenceMonitor(LoopResults):
    """EK-FAC statistics from a Fabric loop's own training steps, and influence when asked.

    Args:
        fabric: the ``lightning.fabric.Fabric`` running the loop (its backward, AMP scaler,
            process rank and loggers are used).
        model: the model being trained (as returned by ``fabric.setup`` or the plain module).
        task: a :class:`~lightning_influence.Task` or a built-in task's name.
        train_data: the candidate pool (map-style Dataset or DataLoader); ids index into it.
        query_data: the queries (Dataset or DataLoader).
        output_dir: where results go (``<output_dir>/step=<N>/``; refused when it holds another
            run's results); default ``<fabric.logger.log_dir>/influence`` or ``./influence``, or their
            next version ``influence-v1``, ... when another run has it.
        seed, on_error, curvature, scoring, report: as :class:`~lightning_influence.InfluenceCallback`'s
            (the groups as dataclasses or dicts).
        **deprecated: the flat settings of earlier releases (``strategy=``, ``top_k=`` ...), with a
            ``FutureWarning`` naming the group they moved to.
    """

    def __init__(self, fabric: Any, model: Any, task: Union[Task, str], train_data: Union[Dataset, DataLoader],
                 query_data: Union[Dataset, DataLoader], *, output_dir: Optional[Union[str, Path]] = None,
                 seed: int = 0, on_error: str = "warn", curvature: Optional[Union[CurvatureConfig, Dict[str, Any]]] = None,
                 scoring: Optional[Union[ScoringConfig, Dict[str, Any]]] = None,
                 report: Optional[Union[ReportConfig, Dict[str, Any]]] = None, **deprecated: Any) -> None:
        settings = dict(deprecated, curvature=curvature, scoring=scoring, report=report)
        config = loop_config(settings, NOT_APPLICABLE, "InfluenceMonitor", task=task, train_data=train_data,
                             query_data=query_data, output_dir=output_dir, seed=seed, on_error=on_error)
        self.fabric = fabric
        self.model = unwrapped(model)
        self.global_step = 0
        self._started = False
        self._loop = LoopProtocol(config, self.model, output_dir=Path(config.output_dir or _default_dir(fabric)),
                                   is_global_zero=fabric.is_global_zero, loggers=lambda: fabric.loggers,
                                   autocast=passes.autocast_dtype(getattr(self._precision, "precision", None)))
        self._loop.attach(self.model)

    # -- the loop's steps ----------------------------------------------------------------------------
    def start(self, train_loader: Any = None) -> None:
        """Optional, before the first step: with ``scoring.ledger`` the example ids of each batch are
        then traced from ``train_loader``'s sampler (a map-style DataLoader over ``train_data``)
        instead of passed to :meth:`step`. Called by the first :meth:`step` otherwise."""
        if not self._started:
            self._started = True
            self._loop.start(train_loader)

    @contextmanager
    def step(self, batch: Any, *, accumulation: int = 1, optimizer: Any = None, lr: Optional[float] = None,
             ids: Any = None) -> Iterator[None]:
        """Record the forward and backward run inside the block on ``batch`` (on collected steps).

        ``accumulation``: by how much the loop divides this batch's loss for gradient accumulation;
        ``optimizer`` (or ``lr``): the learning rate of this step, for ``meta["window"]["lr_sum"]``
        and the ledger; ``ids``: the batch's example ids (indices into ``train_data``), which
        ``scoring.ledger`` needs unless :meth:`start` was given the training DataLoader."""
        self.start()
        if lr is None:
            lr = learning_rate(optimizer)
        if lr is None and self._loop.config.scoring.ledger is not None:
            raise ValueError("scoring.ledger weighs each step by its learning rate: pass monitor.step(batch, "
                             "optimizer=optimizer) (or lr=...)")
        self._loop.on_batch_start(batch, self.global_step, lr=lr, accumulation=accumulation,
                                  loss_scale=self._loss_scale(), ids=ids)
        try:
            yield
        finally:
            self._loop.on_batch_end()

    def backward(self, loss: Tensor, **kwargs: Any) -> None:
        """``fabric.backward(loss)``, telling the statistics that the backward starts (and, once,
        checking that ``loss`` is reduced as ``loss_reduction`` says)."""
        self._loop.on_before_backward(loss)
        self.fabric.backward(loss, **kwargs)

    def optimizer_step(self) -> None:
        """After ``optimizer.step()``: commit the collected batches of this step, unless the AMP
        scaler skipped it or its values were not finite."""
        self._loop.on_optimizer_step(self._loss_scale())  # GradScaler backs off when it skips
        self.global_step += 1

    # -- influence -----------------------------------------------------------------------------------
    def compute(self, step: Optional[int] = None, epoch: Optional[int] = None,
                reason: str = "requested") -> Optional[InfluenceResult]:
        """Influence at the current weights from the statistics since the last computation; writes
        ``<output_dir>/step=<step>/`` (default: :attr:`global_step`) and logs to ``fabric.loggers``.
        Every process must call it."""
        step = self.global_step if step is None else step
        return self._loop.compute(self.model, step=step, epoch=epoch, reason=reason)

    @property
    def session(self):
        """The :class:`~lightning_influence.checkpoint.session.InfluenceSession` computing the results."""
        return self._loop.session

    def _loss_scale(self) -> float:
        return scaler_scale(self._precision)  # Fabric's precision plugin holds the scaler

    @property
    def _precision(self) -> Any:
        """Fabric's precision plugin (its setting and AMP scaler), if this Fabric has one."""
        return getattr(self.fabric, "_precision", None)

    def close(self) -> None:
        """Log the reports still being completed in the background and remove the hooks from the
        model (the statistics and results stay readable). Call at the end of training."""
        self._loop.close()


def _default_dir(fabric: Any) -> Path:
    log_dir = getattr(fabric.logger, "log_dir", None) if fabric.loggers else None
    return Path(log_dir or ".") / "influence"
