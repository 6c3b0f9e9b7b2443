"""Influence in a Hugging Face ``Trainer`` run: a ``TrainerCallback`` over the same core.

Usage::

    from lightning_influence.loops.hf import InfluenceTrainerCallback

    callback = InfluenceTrainerCallback(li.CausalLMTask(), query_data=queries, every_n_train_steps=200)
    trainer = Trainer(model, args, train_dataset=train, data_collator=collator, callbacks=[callback])
    trainer.train()
    callback.results          # <args.output_dir>/influence/step=<N>/, oldest first

How statistics come from the Trainer's own steps, which give callbacks no batch and no loss: a
forward pre-hook on the model sees each training micro-batch (the Trainer calls ``model(**inputs)``)
and starts recording it; a forward hook finds the model's loss (``outputs.loss``) and puts a tensor
hook on it. The gradient reaching that hook is the factor by which the Trainer rescaled the model's
loss before back-propagating it (``1 / gradient_accumulation_steps``, the AMP scale, the number of
processes under ``average_tokens_across_devices``), measured rather than guessed. The model's loss
itself is a token mean over the micro-batch (``loss_reduction="token_mean"``, the default here), or,
when the Trainer passes ``num_items_in_batch`` to the model, the sum over the micro-batch divided by
that count (the label tokens of the whole optimizer step).

The collection cadence, the triggers, the monitors (``meta["window"]``, ``meta["monitors"]``) and
the per-step ledger are the Lightning callback's, run by
:class:`~lightning_influence.loops.protocol.LoopProtocol`: the learning rate is the optimizer's at
``on_step_begin``, the ledger's example ids are traced from the sampler of the Trainer's training
DataLoader (one process; under several processes accelerate shards the batches out of the sampler's
sight, so ``scoring.ledger`` is refused there).

Results: written to disk always; logged to W&B when ``"wandb"`` is in ``args.report_to`` (the run
Hugging Face's ``WandbCallback`` started), other trackers get nothing but the files.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

try:
    from transformers import TrainerCallback
except ImportError as err:  # pragma: no cover - depends on the environment
    raise ImportError("lightning_influence.loops.hf needs transformers: "
                      "pip install 'lightning-influence[hf]'") from err

from lightning_influence._deprecated import merged_group, regroup
from lightning_influence.config import CurvatureConfig, ReportConfig, ScoringConfig
from lightning_influence.loops.monitoring import learning_rate
from lightning_influence.loops.shared import LoopResults, loop_config, unwrapped
from lightning_influence.loops.protocol import LoopProtocol
from lightning_influence.tasks import Task

__all__ = ["InfluenceTrainerCallback"]

NOT_APPLICABLE = {"on_checkpoint": "use on_save=True (compute when the Trainer saves a checkpoint)",
                  "num_queries": "pass the queries themselves as query_data"}


def _loss_reduction(flat: Optional[str], curvature: Any) -> str:
    """The loss reduction the callback's own argument or its curvature group sets (a group's
    dataclass default does not count as set), else Hugging Face's: the mean over labelled tokens."""
    if curvature is None:
        grouped = None
    elif isinstance(curvature, Mapping):  # dicts and OmegaConf's DictConfig
        grouped = curvature.get("loss_reduction")
    else:
        grouped = getattr(curvature, "loss_reduction", None)
        grouped = None if grouped == CurvatureConfig.loss_reduction else grouped
    if flat is not None and grouped is not None and flat != grouped:
        raise ValueError(f"loss_reduction={flat!r} and curvature.loss_reduction={grouped!r} disagree; set one")
    return flat or grouped or "token_mean"


class InfluenceTrainerCallback(LoopResults, TrainerCallback):
    """Accumulate EK-FAC curvature from a Hugging Face Trainer's steps; score the pool at triggers.

    Args:
        task: a :class:`~lightning_influence.Task` or a built-in task's name (``"causal_lm"``, ...).
        query_data: the queries (Dataset or DataLoader; a Dataset is batched with the Trainer's
            data collator).
        train_data: the candidate pool; default: the Trainer's training dataset, with its collator.
        every_n_train_steps: compute every n optimizer steps (``None``: never).
        every_n_epochs: compute at the end of every n-th epoch (``None``: never).
        on_save: compute when the Trainer saves a checkpoint, and record the checkpoint's path.
        on_train_end: compute at the end of training.
        output_dir: refused when it holds another run's results; default ``<args.output_dir>/influence``,
            or its next version ``influence-v1``, ... when another run has it.
        loss_reduction: how the model's own loss reduces the micro-batch: ``"token_mean"``
            (the default, Hugging Face's losses: mean over the labels that count, which for one
            label per example is the mean over examples), ``"mean"`` or ``"sum"``. The same as
            ``curvature.loss_reduction``; set either.
        seed, on_error, curvature, scoring, report: as :class:`~lightning_influence.InfluenceCallback`'s
            (the groups as dataclasses or dicts;
            ``report.show_progress=None`` follows ``args.disable_tqdm``).
        **deprecated: the flat settings of earlier releases (``strategy=``, ``top_k=`` ...), with a
            ``FutureWarning`` naming the group they moved to.
    """

    def __init__(self, task: Union[Task, str], query_data: Union[Dataset, DataLoader], *,
                 train_data: Optional[Union[Dataset, DataLoader]] = None, every_n_train_steps: Optional[int] = None,
                 every_n_epochs: Optional[int] = None, on_save: bool = False, on_train_end: bool = True,
                 output_dir: Optional[str] = None, loss_reduction: Optional[str] = None, seed: int = 0,
                 on_error: str = "warn", curvature: Optional[Union[CurvatureConfig, Dict[str, Any]]] = None,
                 scoring: Optional[Union[ScoringConfig, Dict[str, Any]]] = None,
                 report: Optional[Union[ReportConfig, Dict[str, Any]]] = None, **deprecated: Any) -> None:
        for name, instead in NOT_APPLICABLE.items():
            if name in deprecated:
                raise ValueError(f"{name} does not apply here: {instead}")
        settings = regroup(dict(deprecated, curvature=curvature, scoring=scoring, report=report),
                           "InfluenceTrainerCallback")
        settings["curvature"] = merged_group(settings["curvature"], {
            "loss_reduction": _loss_reduction(loss_reduction, settings["curvature"])})
        self._settings = settings
        self._arguments = dict(task=task, query_data=query_data, every_n_train_steps=every_n_train_steps,
                               every_n_epochs=every_n_epochs, on_checkpoint=on_save, on_train_end=on_train_end,
                               output_dir=output_dir, seed=seed, on_error=on_error)
        # Validate now, with a stand-in pool when the Trainer's dataset is meant: errors surface at construction.
        self.config = loop_config(settings, NOT_APPLICABLE, "InfluenceTrainerCallback", **self._arguments,
                                  train_data=train_data if train_data is not None else [0])
        self._train_data = train_data
        self._loop: Optional[LoopProtocol] = None
        self._hooks: List[Any] = []
        self._in_step = False  # between on_step_begin and on_optimizer_step: forwards are training micro-batches
        self._in_batch = False  # a micro-batch's forward started and its backward has not ended
        self._step, self._step_lr = 0, None
        self._accumulation = 1
        self._loss_seen = False

    # -- public state --------------------------------------------------------------------------------
    # -- set-up --------------------------------------------------------------------------------------
    def on_train_begin(self, args, state, control, model=None, train_dataloader=None, **kwargs):
        problem = _unsupported(args)
        if problem:
            raise ValueError(problem)
        if self._loop is not None:  # an earlier train() that ended in an exception: its output_dir is released
            self._loop.close()
        train = self._train_data if self._train_data is not None else train_dataloader
        if train is None:
            raise ValueError("cannot find the Trainer's training data; pass train_data=<Dataset or DataLoader>")
        config = loop_config(self._settings, NOT_APPLICABLE, "InfluenceTrainerCallback", **self._arguments,
                             train_data=train)
        model = unwrapped(model)
        output_dir = Path(config.output_dir or Path(args.output_dir) / "influence")
        if config.scoring.ledger is not None and train_dataloader is None:
            raise ValueError("scoring.ledger reads each training batch's example ids from the Trainer's training "
                             "DataLoader, which this Trainer did not hand to its callbacks; set scoring.ledger=None")
        if config.scoring.ledger is not None and getattr(args, "world_size", 1) > 1:
            raise ValueError("scoring.ledger needs each training batch's example ids, which accelerate's sharded "
                             "batches hide from the callback under several processes; train in one process, use "
                             "the Lightning callback or a Fabric loop (InfluenceMonitor) for the ledger under DDP, or "
                             "set scoring.ledger=None")
        self._loop = LoopProtocol(config, model, output_dir=output_dir, is_global_zero=state.is_world_process_zero,
                                  loggers=lambda: _loggers(args), autocast=_autocast_dtype(args),
                                  show_progress=not getattr(args, "disable_tqdm", False))
        self._loop.attach(model, capture_outputs=False)
        self._loop.start(train_dataloader if config.scoring.ledger is not None else None)
        self._accumulation = max(1, int(getattr(args, "gradient_accumulation_steps", 1) or 1))
        self._hooks = [model.register_forward_pre_hook(self._before_forward, with_kwargs=True),
                       model.register_forward_hook(self._after_forward, with_kwargs=True)]

    # -- collecting: the model's hooks ---------------------------------------------------------------
    def _before_forward(self, model, args, kwargs):
        if not (self._in_step and model.training and torch.is_grad_enabled()) or self._in_batch:
            return None  # evaluation, our own passes, or a second forward inside one micro-batch
        batch = {key: value for key, value in kwargs.items() if key != "num_items_in_batch"}
        if args or not batch:
            raise ValueError("InfluenceTrainerCallback expects the Trainer to call the model with keyword inputs "
                             "(model(**inputs)); a custom compute_loss must do the same")
        self._in_batch, self._loss_seen = True, False
        # The loss's scaling (accumulation included) is measured at its gradient: accumulation=1 here.
        self._loop.on_batch_start(batch, self._step, lr=self._step_lr, batches_per_step=self._accumulation,
                                  loss_divisor=kwargs.get("num_items_in_batch"))
        return None

    def _after_forward(self, model, args, kwargs, outputs):
        stats = self._loop.statistics
        if not stats.recording or stats.tracker.in_backward or not torch.is_grad_enabled():
            return None  # not this micro-batch's training forward (no gradients: another callback's loss check)
        loss = _model_loss(outputs)
        if loss is None or not loss.requires_grad:
            raise ValueError("InfluenceTrainerCallback needs the model to compute its loss (outputs.loss, from the "
                             "batch's labels); label_smoothing_factor, compute_loss_func and a compute_loss that "
                             "computes the loss outside the model are not supported")
        loss.register_hook(self._on_loss_gradient)
        # The forward is over: layer calls from now on are recomputations.
        self._loop.on_before_backward(loss, outputs)
        return None

    def _on_loss_gradient(self, grad: Tensor) -> None:
        """The Trainer back-propagates ``grad × outputs.loss``: the factor the statistics undo."""
        self._loss_seen = True
        self._loop.statistics.set_loss_scale(grad.detach().float())

    def _end_micro_batch(self) -> None:
        self._in_batch = False
        if not self._loop.statistics.recording:
            return
        if not self._loss_seen:
            self._loop.statistics.end_batch()
            raise ValueError("the Trainer did not back-propagate the model's own loss (outputs.loss), so the "
                             "statistics cannot be scaled; a custom compute_loss must return the model's loss")
        self._loop.on_batch_end()

    # -- collecting: the Trainer's events ------------------------------------------------------------
    def on_step_begin(self, args, state, control, optimizer=None, **kwargs):
        if self._loop is not None:
            self._in_step, self._in_batch, self._step = True, False, state.global_step
            self._step_lr = learning_rate(optimizer)  # before the scheduler steps: this step's

    def on_substep_end(self, args, state, control, **kwargs):
        if self._loop is not None:
            self._end_micro_batch()

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if self._loop is not None:
            self._end_micro_batch()

    def on_optimizer_step(self, args, state, control, **kwargs):
        # A step the AMP scaler skips has non-finite gradients: the commit drops it.
        if self._loop is not None:
            self._in_step = False
            self._loop.on_optimizer_step()

    # -- triggers ------------------------------------------------------------------------------------
    def on_step_end(self, args, state, control, model=None, **kwargs):
        if self._loop is not None:
            self._loop.on_train_step(unwrapped(model), state.global_step, _epoch(state))

    def on_epoch_end(self, args, state, control, model=None, **kwargs):
        if self._loop is not None:
            self._loop.on_epoch_end(unwrapped(model), state.global_step, _epoch(state))

    def on_save(self, args, state, control, model=None, **kwargs):
        if self._loop is not None:  # the Trainer names its checkpoints <output_dir>/checkpoint-<global step>
            self._loop.on_checkpoint(unwrapped(model), state.global_step, _epoch(state),
                                     path=str(Path(args.output_dir) / f"checkpoint-{state.global_step}"))

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if self._loop is None:
            return
        try:
            self._loop.on_train_end(unwrapped(model), state.global_step, _epoch(state))
        finally:
            for hook in self._hooks:
                hook.remove()
            self._hooks = []
            self._loop.close()


def _epoch(state: Any) -> int:
    """Hugging Face's epoch is fractional: 1.0 ends the first (0)."""
    return max(math.ceil(state.epoch or 0) - 1, 0)


def _model_loss(outputs: Any) -> Optional[Tensor]:
    """The loss the Trainer reads from the model's outputs (``outputs["loss"]``, else ``outputs[0]``)."""
    if isinstance(outputs, dict) or hasattr(outputs, "keys"):
        loss = outputs.get("loss") if hasattr(outputs, "get") else None
    elif isinstance(outputs, (tuple, list)) and outputs:
        loss = outputs[0]
    else:
        loss = None
    return loss if isinstance(loss, Tensor) and loss.dim() == 0 else None


def _unsupported(args: Any) -> Optional[str]:
    """Why the callback cannot monitor a run with these TrainingArguments, or ``None``."""
    if getattr(args, "n_gpu", 1) > 1:
        return ("InfluenceTrainerCallback does not support DataParallel (several GPUs in one process); "
                "launch one process per GPU (torchrun / accelerate launch)")
    if getattr(args, "fsdp", None) or getattr(args, "deepspeed", None):
        return ("InfluenceTrainerCallback does not support FSDP / DeepSpeed through accelerate (not tested: "
                "accelerate wraps the model and may rescale the loss out of the callback's sight); train on a single "
                "device or with DDP, or shard with the Lightning callback (strategy='fsdp' or ModelParallelStrategy "
                "with fully_shard), or in your own loop with StepStatistics and InfluenceSession, which support "
                "FSDP and FSDP2")
    if getattr(args, "torch_compile", False):
        return ("InfluenceTrainerCallback cannot track a torch.compile'd model (compiled graphs bypass module "
                "hooks); set torch_compile=False while collecting influence")
    if getattr(args, "label_smoothing_factor", 0):
        return ("InfluenceTrainerCallback needs the model's own loss; label_smoothing_factor makes the Trainer "
                "compute another one: set it to 0")
    return None


def _autocast_dtype(args: Any) -> Optional[torch.dtype]:
    """The autocast dtype of the Trainer's mixed-precision training steps (``bf16`` / ``fp16``), or ``None``."""
    if getattr(args, "bf16", False):
        return torch.bfloat16
    return torch.float16 if getattr(args, "fp16", False) else None


def _loggers(args: Any) -> List[Any]:
    """The W&B run Hugging Face's WandbCallback started, when ``report_to`` includes ``"wandb"``."""
    report_to = args.report_to if isinstance(args.report_to, (list, tuple)) else [args.report_to]
    wandb = sys.modules.get("wandb")
    if ("wandb" in report_to or "all" in report_to) and wandb is not None and wandb.run is not None:
        return [wandb.run]
    return []
