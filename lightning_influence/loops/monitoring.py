"""The callback's monitoring glue: the per-step ledger fed from the training steps, the learning
rate over each window (for trajectory weighting), and the monitor scalars that reach
``trainer.callback_metrics`` (so ``EarlyStopping`` / ``ModelCheckpoint(monitor=...)`` can act on
them) and every logger (through the result's ``meta["monitors"]``).

Reads the Trainer duck-typed (works for ``pytorch_lightning`` and ``lightning.pytorch``); the
numerical work lives in :mod:`~lightning_influence.loops.ledger` and :mod:`~lightning_influence.analysis.monitors`.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch

from lightning_influence.engine.collector import StepStatistics
from lightning_influence.engine.factors import Factors
from lightning_influence.loops.ledger import BatchIds, InfluenceLedger, ledger_queries
from lightning_influence.analysis.monitors import monitor_scalars

NAMESPACE = "influence"


def learning_rate(trainer: Any) -> float:
    """The first optimizer's first parameter group's learning rate (0 without an optimizer)."""
    optimizers = getattr(trainer, "optimizers", None) or []
    groups = getattr(optimizers[0], "param_groups", None) if optimizers else None
    return float(groups[0].get("lr", 0.0)) if groups else 0.0


class TrainingMonitor:
    """Per run: the ledger (``ledger=True``), the learning-rate sum of each window, the previous
    result (for drift), and the monitor scalars of each new result."""

    def __init__(self, collector: StepStatistics, config: Any, warn: Callable[[str, str], None]) -> None:
        self.collector, self.warn = collector, warn
        self.every_n_steps, self.top_k = config.curvature.collect_every_n_steps, config.scoring.top_k
        self.ledger = InfluenceLedger() if config.scoring.ledger is not None else None
        self.ledger_subspace = config.scoring.ledger_subspace
        self._ids: Optional[BatchIds] = None
        self._previous: Any = None  # the run's last result (after a resume: none until the next one)
        self._lr_sum, self._steps = 0.0, 0

    def start(self, trainer: Any, pl_module: Any, session: Any) -> None:
        """Before the first training batch: trace the training DataLoader's example ids (refused
        clearly when impossible, before any step runs); until the first computation the ledger
        scores against the plain query gradients (no curvature yet: TracIn itself)."""
        if self.ledger is not None and self._ids is None:
            self._ids = BatchIds(trainer.train_dataloader)
            self.collector.observer = self.ledger.on_gradient
            session.keep_prepared_queries = session.query_rank is not None  # at the ledger's rank: reused
            if self.ledger.queries is None:
                plain = Factors("identity", {layer.name: {} for layer in self.collector.layers})
                self.ledger.refresh(ledger_queries(session, pl_module, plain, self.collector.layers,
                                                   self.ledger_subspace))

    def batch_start(self, trainer: Any, batch: Any, collecting: bool) -> None:
        rate = learning_rate(trainer)
        self._lr_sum += rate / max(1, trainer.accumulate_grad_batches)
        self._steps += 1
        if self.ledger is None:
            return
        ids = self._ids.next_batch(self.collector.task.batch_size(batch))
        if ids is None:
            self.warn("ledger-ids", "the ledger lost track of the training batches' example ids (was the training "
                                    "DataLoader re-created, e.g. by reload_dataloaders_every_n_epochs?); batches "
                                    "without known ids are left out of the ledger")
        if collecting:
            self.ledger.begin_batch(ids, rate * self.every_n_steps)

    def commit(self, valid: bool) -> None:
        if self.ledger is not None:
            self.ledger.commit(valid)

    def finish(self, trainer: Any, pl_module: Any, result: Any, factors: Any, session: Any) -> None:
        """Complete a new result before it is saved: the window's ledger and learning rates, the
        monitor scalars (also into ``trainer.callback_metrics``); then refresh the ledger's queries."""
        result.meta["window"] = {"optimizer_batches": self._steps, "lr_sum": self._lr_sum}
        self._lr_sum, self._steps = 0.0, 0
        if self.ledger is not None:
            taken = self.ledger.take()
            if taken is not None:
                result.set("ledger_ids", taken[0])
                result.set("ledger_scores", taken[1])
                result.meta["ledger"] = {"captured": dict(self.ledger.queries.captured)}
            self.ledger.refresh(ledger_queries(session, pl_module, factors, self.collector.layers,
                                               self.ledger_subspace))
        scalars = monitor_scalars(result, self._previous, self.top_k)
        result.meta["monitors"] = scalars
        self._previous = result
        metrics = trainer.callback_metrics
        for name, value in scalars.items():
            metrics[f"{NAMESPACE}/{name}"] = torch.tensor(value)

    def stop(self) -> None:
        if self._ids is not None:
            self._ids.release()
            self._ids = None
        self.collector.observer = None
