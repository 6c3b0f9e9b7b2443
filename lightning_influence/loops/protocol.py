"""The one protocol every training loop speaks: the Lightning callback, the Fabric helper and the
Hugging Face callback translate their loop's events into the calls of :class:`LoopProtocol`, which
owns everything else, so every loop gets every feature (or refuses it at set-up):

- the collection cadence: which steps are collected (``collect_every_n_steps``), the recording of
  each collected batch's forward and backward, the true Fisher's targets (the step's own outputs
  reused, else one extra backward), the loss reduction's check, the commit of each optimizer step;
- the per-step monitors (:class:`~lightning_influence.loops.monitoring.TrainingMonitor`): the
  ledger, the learning rate of each window (``meta["window"]``) and the monitor scalars;
- the triggers: ``every_n_train_steps``, ``every_n_epochs``, ``on_checkpoint``, ``on_train_end``
  (one computation per step; another trigger at the same step adds its reason).

Events, in the order a loop sends them::

    protocol.attach(module)                       # set-up: hooks on the tracked layers
    protocol.start(train_loader)                  # before the first batch (the ledger's ids, queries)
    for each optimizer step, for each micro-batch:
        protocol.on_batch_start(batch, step, lr=..., accumulation=..., ids=...)
        protocol.on_before_backward(loss)         # between the forward and the backward
        protocol.on_batch_end()                   # after the backward
    protocol.on_optimizer_step(loss_scale)        # after optimizer.step(): commit
    protocol.on_train_step(model, step, epoch, last_batch=...)    # triggers
    protocol.on_epoch_end(model, step, epoch) / on_checkpoint(model, step, epoch, path) / on_train_end(...)
    protocol.close()
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Optional

import torch
from torch import nn

from lightning_influence.engine import passes
from lightning_influence.loops.ledger import BatchIds
from lightning_influence.loops.monitoring import TrainingMonitor
from lightning_influence.loops.shared import LoopInfluence
from lightning_influence.results import InfluenceResult

__all__ = ["LoopProtocol"]


class LoopProtocol(LoopInfluence):
    """:class:`~lightning_influence.loops.shared.LoopInfluence` driven by a loop's events (see the
    module's docstring); takes the same arguments."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.monitor = TrainingMonitor(self.statistics, self.config, self.warn_once)
        self.scalars: Dict[str, float] = {}  # the monitor scalars of the latest result
        self.module: Optional[nn.Module] = None
        self._output_hook: Any = None
        self._last_outputs: Any = None
        self._collecting = False

    # -- set-up --------------------------------------------------------------------------------------
    def attach(self, module: nn.Module, *, capture_outputs: bool = True) -> None:
        """Hooks on the tracked layers. ``module``: the one the loop calls in its training steps
        (its outputs serve the true Fisher, the loss check and the ledger's query gradients);
        ``capture_outputs=False`` when the loop hands the outputs to :meth:`on_before_backward`."""
        self.module = module
        self.statistics.attach()
        if self.statistics.fisher == "true" and capture_outputs and self._output_hook is None:
            self._output_hook = module.register_forward_hook(torch.compiler.disable(self._capture_outputs))

    def start(self, train_loader: Any = None) -> None:
        """Before the first training batch. With ``scoring.ledger``: the example ids are traced from
        ``train_loader``'s sampler (refused clearly when impossible); without a loader each
        :meth:`on_batch_start` must bring its batch's ``ids``."""
        ledger = self.config.scoring.ledger is not None
        ids = BatchIds(train_loader) if ledger and train_loader is not None else None
        self.monitor.start(self.module, self.session, ids)

    def _capture_outputs(self, module: Any, inputs: Any, output: Any) -> None:
        if self._collecting and self.statistics.recording:
            self._last_outputs = output

    # -- the collection cadence ----------------------------------------------------------------------
    def collects(self, step: int) -> bool:
        """Whether optimizer step ``step`` (0-based, the number of steps before it) is collected."""
        return step % self.config.curvature.collect_every_n_steps == 0

    def on_batch_start(self, batch: Any, step: int, *, lr: Optional[float] = None, accumulation: int = 1,
                       loss_scale: float = 1.0, loss_divisor: Any = None, ids: Any = None,
                       batches_per_step: Optional[int] = None) -> bool:
        """A training (micro-)batch of optimizer step ``step`` starts; returns whether it is recorded.

        ``lr``: the learning rate the step will use (``None``: unknown, the window then records no
        ``lr_sum`` and the ledger weighs nothing); ``accumulation``: by how much the loss is divided
        for gradient accumulation (1 where the statistics measure it, as Hugging Face's do);
        ``batches_per_step``: micro-batches per optimizer step, each taking that share of the
        step's learning rate (default ``accumulation``); ``loss_scale``: the AMP scale; ``loss_divisor``: see
        :meth:`~lightning_influence.engine.collector.StepStatistics.begin_batch`; ``ids``: the
        batch's example ids (indices into the pool) when :meth:`start` had no loader to trace."""
        self.deliver_reports()
        self._collecting = self.collects(step)
        self._last_outputs = None
        if ids is None and self.monitor.needs_ids:
            raise ValueError("scoring.ledger needs each training batch's example ids (indices into train_data): pass "
                             "them with the batch, or the training DataLoader at the start; or set scoring.ledger=None")
        self.monitor.batch_start(batch, lr=lr, accumulation=batches_per_step or accumulation,
                                 collecting=self._collecting, ids=ids)
        if self._collecting:
            self.statistics.begin_batch(batch, accumulation=accumulation, loss_scale=loss_scale,
                                        loss_divisor=loss_divisor)
        return self._collecting

    def on_before_backward(self, loss: torch.Tensor, outputs: Any = None) -> None:
        """Between the forward and the backward of the batch: mark the backward's start, sample the
        true Fisher's targets (from ``outputs`` or the captured ones, else an extra backward) and,
        once, check the loss reduction."""
        if not (self._collecting and self.statistics.recording):
            return
        if outputs is None:
            outputs = self._last_outputs
        self._last_outputs = None
        with passes.eager():
            message = self.statistics.before_backward(self.module, loss, outputs)
        if message:
            self.warn_once("loss-reduction", message)

    def on_batch_end(self) -> None:
        """The batch's backward is over: stop recording it."""
        self._last_outputs = None
        if self.statistics.recording:
            self.statistics.end_batch()
            self.statistics.check_single_runs()

    def on_optimizer_step(self, loss_scale: Optional[float] = None) -> Optional[bool]:
        """The optimizer stepped: commit the step's recorded batches (statistics and ledger), unless
        the AMP scaler skipped it (``loss_scale`` fell) or its values were not finite. Returns
        whether the step counted (``None``: nothing was recorded)."""
        counted = self.statistics.commit_step(loss_scale)
        if counted is not None:
            self.monitor.commit(counted)
        self._collecting = False
        return counted

    # -- triggers ------------------------------------------------------------------------------------
    def on_train_step(self, model: nn.Module, step: int, epoch: Optional[int], *, last_batch: bool = False,
                      observe: Optional[Callable[..., None]] = None) -> None:
        """After optimizer step number ``step`` (1-based: steps done), the epoch's last when
        ``last_batch``: ``every_n_train_steps`` and ``every_n_epochs``."""
        cfg = self.config
        if cfg.every_n_train_steps and step % cfg.every_n_train_steps == 0:
            self.compute(model, step=step, epoch=epoch, reason="every_n_train_steps", observe=observe)
        if last_batch and self._epoch_due(epoch):
            self.compute(model, step=step, epoch=epoch, reason="every_n_epochs", observe=observe)

    def on_epoch_end(self, model: nn.Module, step: int, epoch: int,
                     observe: Optional[Callable[..., None]] = None) -> None:
        """Epoch ``epoch`` (0-based) ended: ``every_n_epochs`` (once per step, so a loop may also
        have reported its last batch)."""
        if self._epoch_due(epoch):
            self.compute(model, step=step, epoch=epoch, reason="every_n_epochs", observe=observe)

    def _epoch_due(self, epoch: Optional[int]) -> bool:
        every = self.config.every_n_epochs
        return bool(every) and epoch is not None and (epoch + 1) % every == 0

    def on_checkpoint(self, model: nn.Module, step: int, epoch: Optional[int], path: Optional[str] = None,
                      observe: Optional[Callable[..., None]] = None) -> None:
        """The loop saves a checkpoint at ``step``: ``on_checkpoint``; ``path`` (when already
        known) is recorded in that step's result."""
        if self.config.on_checkpoint:
            self.compute(model, step=step, epoch=epoch, reason="checkpoint", observe=observe)
        if path is not None:
            self.add_checkpoint_path(step, str(path))

    def on_train_end(self, model: nn.Module, step: int, epoch: Optional[int],
                     observe: Optional[Callable[..., None]] = None) -> None:
        """Training ended: ``on_train_end``, then every pending report is logged."""
        if self.config.on_train_end:
            self.compute(model, step=step, epoch=epoch, reason="train_end", observe=observe)
        self.flush_reports()

    def compute(self, model: nn.Module, *, step: int, epoch: Optional[int], reason: str,
                observe: Optional[Callable[..., None]] = None) -> Optional[InfluenceResult]:
        """Influence at ``step`` (see :meth:`LoopInfluence.compute`), each new result completed by
        the monitors (``meta["window"]``, ``meta["monitors"]``, the ledger) before ``observe``."""
        def complete(result: InfluenceResult, factors: Any) -> None:
            self.scalars = self.monitor.finish(self.module if self.module is not None else model, result,
                                               factors, self.session)
            if observe is not None:
                observe(result, factors)

        with passes.eager():  # the engine's passes run a compiled model's code eagerly
            return super().compute(model, step=step, epoch=epoch, reason=reason, observe=complete)

    # -- the end -------------------------------------------------------------------------------------
    def detach(self) -> None:
        """Remove every hook (the statistics and results stay readable)."""
        self.statistics.end_batch()
        self.statistics.detach()
        self.monitor.stop()
        if self._output_hook is not None:
            self._output_hook.remove()
            self._output_hook = None

    def close(self) -> None:
        """End of the run: reports delivered, ``output_dir`` released, hooks removed."""
        try:
            self.release_output_dir()
        finally:
            self.detach()
