"""The per-step monitors of every loop: the per-step ledger fed from the training steps, the
learning rate over each window (for trajectory weighting, ``meta["window"]``), and the monitor
scalars of each new result (``meta["monitors"]``, which the Lightning callback also puts into
``trainer.callback_metrics`` so ``EarlyStopping`` / ``ModelCheckpoint(monitor=...)`` can act on them).

Framework-free: the loop protocol (:mod:`~lightning_influence.loops.protocol`) hands it each batch,
its learning rate and example ids; the numerical work lives in
:mod:`~lightning_influence.loops.ledger` and :mod:`~lightning_influence.analysis.monitors`.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Optional

import torch

from lightning_influence.engine.collector import StepStatistics
from lightning_influence.engine.factors import Factors
from lightning_influence.loops.ledger import BatchIds, InfluenceLedger, ledger_queries
from lightning_influence.analysis.monitors import monitor_scalars

NAMESPACE = "influence"


def learning_rate(optimizers: Any) -> Optional[float]:
    """The first optimizer's first parameter group's learning rate (``None`` without an optimizer);
    ``optimizers``: one optimizer or a sequence of them."""
    if optimizers is not None and not isinstance(optimizers, (list, tuple)):
        optimizers = [optimizers]
    groups = getattr(optimizers[0], "param_groups", None) if optimizers else None
    return float(groups[0].get("lr", 0.0)) if groups else None


class TrainingMonitor:
    """Per run: the ledger (``scoring.ledger``), the learning-rate sum of each window, the previous
    result (for drift), and the monitor scalars of each new result."""

    def __init__(self, collector: StepStatistics, config: Any, warn: Callable[[str, str], None]) -> None:
        self.collector, self.warn = collector, warn
        self.every_n_steps, self.top_k = config.curvature.collect_every_n_steps, config.scoring.top_k
        self.ledger = InfluenceLedger() if config.scoring.ledger is not None else None
        self.ledger_subspace = config.scoring.ledger_subspace
        self._ids: Optional[BatchIds] = None
        self._started = False
        self._previous: Any = None  # the run's last result (after a resume: none until the next one)
        self._lr_sum: Optional[float] = 0.0
        self._steps = 0

    def start(self, model: Any, session: Any, ids: Optional[BatchIds] = None) -> None:
        """Before the first training batch: the training batches' example ids (``ids`` traces a
        DataLoader; without it each batch brings its own); until the first computation the ledger
        scores against the plain query gradients (no curvature yet: TracIn itself)."""
        if self.ledger is None or self._started:
            return
        self._started, self._ids = True, ids
        self.collector.observer = self.ledger.on_gradient
        session.keep_prepared_queries = session.query_rank is not None  # at the ledger's rank: reused
        if self.ledger.queries is None:
            plain = Factors("identity", {layer.name: {} for layer in self.collector.layers})
            self.ledger.refresh(ledger_queries(session, model, plain, self.collector.layers, self.ledger_subspace))

    @property
    def needs_ids(self) -> bool:
        """The ledger traces no DataLoader: each batch must bring its example ids."""
        return self.ledger is not None and self._ids is None

    def batch_start(self, batch: Any, *, lr: Optional[float], accumulation: int, collecting: bool,
                    ids: Any = None) -> None:
        """A training (micro-)batch starts: its share of the window's learning rate (``None``:
        unknown, the window then records none) and, for the ledger, its example ids."""
        if lr is None or self._lr_sum is None:
            self._lr_sum = None
        else:
            self._lr_sum += lr / max(1, accumulation)
        self._steps += 1
        if self.ledger is None:
            return
        if ids is not None:
            ids = torch.as_tensor(ids, dtype=torch.long).reshape(-1).cpu()
        elif self._ids is not None:
            ids = self._ids.next_batch(self.collector.task.batch_size(batch))
            if ids is None:
                self.warn("ledger-ids", "the ledger lost track of the training batches' example ids (was the "
                                        "training DataLoader re-created, e.g. by reload_dataloaders_every_n_epochs?); "
                                        "batches without known ids are left out of the ledger")
        if collecting:
            self.ledger.begin_batch(ids, (lr or 0.0) * self.every_n_steps)

    def commit(self, valid: Any) -> None:
        if self.ledger is not None:
            self.ledger.commit(valid)

    def finish(self, model: Any, result: Any, factors: Any, session: Any) -> Dict[str, float]:
        """Complete a new result before it is saved: the window's ledger and learning rates, the
        monitor scalars (returned); then refresh the ledger's queries. Collective (the ledger)."""
        window: Dict[str, Any] = {"optimizer_batches": self._steps}
        if self._lr_sum is not None:
            window["lr_sum"] = self._lr_sum
        result.meta["window"] = window
        self._lr_sum, self._steps = 0.0, 0
        if self.ledger is not None:
            taken = self.ledger.take()
            if taken is not None:
                result.set("ledger_ids", taken[0])
                result.set("ledger_scores", taken[1])
                result.meta["ledger"] = {"captured": dict(self.ledger.queries.captured)}
            self.ledger.refresh(ledger_queries(session, model, factors, self.collector.layers,
                                               self.ledger_subspace))
        scalars = monitor_scalars(result, self._previous, self.top_k)
        result.meta["monitors"] = scalars
        self._previous = result
        return scalars

    def stop(self) -> None:
        if self._ids is not None:
            self._ids.release()
            self._ids = None
        self._started = False
        self.collector.observer = None


def publish_scalars(metrics: Any, scalars: Dict[str, float]) -> None:
    """Put the monitor scalars into a metrics mapping (Lightning's ``trainer.callback_metrics``)."""
    for name, value in scalars.items():
        metrics[f"{NAMESPACE}/{name}"] = torch.tensor(value)
