"""Curvature statistics from the user's own training steps (plain PyTorch; the callback drives it).

Per training batch the tracker's tensor hooks see each tracked layer's input ``a`` and the gradient
``g_user`` of the loss the user back-propagates. That loss is usually a mean, divided again by
Lightning for gradient accumulation and multiplied by the AMP loss scale, so the gradient of each
example's token-summed loss (``S = Σ g gᵀ / N_examples`` is defined on it) is recovered as

    g = g_user × reduction × accumulation / loss_scale

with ``reduction`` the batch size (mean over examples), the number of loss tokens (mean over
tokens) or 1 (sum). A step's statistics are buffered and committed only when its optimizer step
happens with finite values (AMP steps the scaler skips and non-finite steps are dropped and
counted), so the accumulated sums never see a step that training itself discarded.
"""

from __future__ import annotations

import math
from contextlib import ExitStack
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from lightning_influence.engine import distributed
from lightning_influence.engine import passes
from lightning_influence.engine.statistics import CovarianceStatistics
from lightning_influence.engine.sharding import owners_of
from lightning_influence.tasks import Task, unwrap_logits
from lightning_influence.engine.tracking import LayerTracker, TrackedLayer

# The training loss may differ from the task's by regularisers or dropout; beyond this factor the
# declared loss_reduction is almost certainly wrong (a sum declared as a mean differs by the batch size).
LOSS_RATIO_TOLERANCE = 1.5
# Training-side phases: which statistic a gradient reaching the tracker's tensor hooks feeds.
_IDLE, _TRAIN, _OWN = "idle", "train", "own"


class StepStatistics:
    """Accumulates ``Σ a aᵀ`` and ``Σ g gᵀ`` (sums and counts) from training batches.

    Args:
        layers: the tracked layers.
        task: gives per-batch token masks, batch sizes and, for ``fisher="true"``, sampled losses.
        fisher: ``"empirical"`` (gradients of the training loss, free) or ``"true"`` (gradients of
            a loss with targets sampled from the model: one extra backward per collected batch).
        loss_reduction: how the user's loss reduces per-example losses (``"mean"``, ``"sum"``,
            ``"token_mean"``).
        max_tokens_per_step: cap on the token positions used per layer and training batch (a
            random subset from a private generator; ``S`` is reweighted to stay unbiased).
        window: ``"reset"`` (cleared by :meth:`reset` after each influence computation) or
            ``"ema"`` (each committed step first multiplies sums and counts by ``ema_decay``).
        dtype: accumulation dtype (float32 even when training runs in bf16 / fp16).
        device: the tracked modules' device (of the private generators, and of the statistics
            unless ``statistics_device`` says otherwise).
        seed: seed of the private generators (token subsets, sampled targets).
        statistics_device: where the sums live (e.g. ``"cpu"``: off the GPU; each layer's
            product is computed on ``device`` and added there); default ``device``.
        shard: in a process group, each process accumulates only the layers it owns
            (:func:`~lightning_influence.engine.sharding.owners_of`), from its own batches: statistics
            memory per process about ``1/world``, no communication during training, each layer's
            statistics from ``1/world`` of the batches. For sharded factors only.
        share_inputs: layers found reading the same input tensor object in the first recorded
            forward (the q/k/v projections of an attention block, gate/up of a gated MLP) share one
            activation covariance: one Gram per batch and one ``d_in x d_in`` sum per group, the
            same numbers as per layer. A group's token subset (``max_tokens_per_step``) is the same
            positions for all its layers either way. ``False`` only to compare or debug.
    """

    def __init__(self, layers: Sequence[TrackedLayer], task: Task, *, fisher: str = "empirical",
                 loss_reduction: str = "mean", max_tokens_per_step: Optional[int] = None,
                 window: str = "reset", ema_decay: float = 0.99, dtype: torch.dtype = torch.float32,
                 device: Optional[torch.device] = None, seed: int = 0,
                 statistics_device: Union[None, str, torch.device] = None, shard: bool = False,
                 share_inputs: bool = True) -> None:
        self.layers = list(layers)
        self.sharded = shard and distributed.world_size() > 1
        owners = owners_of(self.layers) if self.sharded else {}
        here = distributed.rank()
        accumulated = [layer for layer in self.layers if owners.get(layer.name, here) == here]
        self.task = task
        self.fisher = fisher
        self.loss_reduction = loss_reduction
        self.max_tokens = max_tokens_per_step
        self.window = window
        self.ema_decay = ema_decay
        self.device = device or torch.device("cpu")
        self.statistics_device = torch.device(statistics_device) if statistics_device is not None else self.device
        self.stats = CovarianceStatistics(accumulated, dtype=dtype, device=self.statistics_device)
        self._pending = CovarianceStatistics(accumulated, dtype=dtype, device=self.statistics_device)
        self.tracker = LayerTracker(self.layers, on_gradient=self._on_gradient)
        self._own_tracker = LayerTracker(self.layers)  # for the extra forward of the true Fisher
        self._token_generator = torch.Generator().manual_seed(seed)
        self._sample_generator = torch.Generator(self.device).manual_seed(seed + 1)
        self.steps_committed = torch.zeros((), dtype=torch.float64, device=self.device)
        # The steps the statistics hold now: since the last reset, or their decayed count (ema).
        self.steps_in_window = torch.zeros((), dtype=torch.float64, device=self.device)
        self.steps_skipped = torch.zeros((), dtype=torch.float64, device=self.device)
        self.miscounted: Dict[str, int] = {}  # layer -> hook calls in a batch where it was not 1
        # Sees each recorded layer's activations and output gradients, with the factor that turns the
        # gradients into those of each example's token-summed loss: the ledger.
        self.observer: Optional[Callable[[TrackedLayer, Tensor, Tensor, Any], None]] = None
        self.hooks_bypassed = False  # a batch back-propagated while no tracked layer's hook fired
        self._phase = _IDLE
        self._batch: Any = None
        self._batch_size = 0
        self._token_total: Optional[Tensor] = None
        self._grad_factor: Any = 1.0
        self._reduction: Any = 1.0
        self._loss_divisor: Any = None
        self._loss_scale: Any = 1.0
        self._accumulation = 1
        self._loss_checked = False  # the loss reduction is checked once, on the first recorded backward
        self._window_scale: Optional[float] = None  # AMP scale at the optimizer step's first recorded batch
        # Input groups (layers reading one input tensor), found on the first recorded backward.
        self.share_inputs = share_inputs
        self._group_of: Optional[Dict[str, List[str]]] = None
        self._batch_groups: Dict[str, Any] = {}  # per batch: group -> checked / its token subset / added

    # -- hooks ----------------------------------------------------------------------------------
    def attach(self) -> None:
        self.tracker.attach()
        self._own_tracker.attach()

    def detach(self) -> None:
        self.tracker.detach()
        self._own_tracker.detach()

    def begin_batch(self, batch: Any, *, accumulation: int = 1, loss_scale: float = 1.0,
                    loss_divisor: Any = None) -> None:
        """Start recording the forward/backward of one training batch.

        ``loss_divisor``: what the loss divides the batch's summed per-example losses by, when the
        loop knows it better than ``loss_reduction`` (Hugging Face's ``num_items_in_batch``: the
        label tokens of every micro-batch of the optimizer step)."""
        self._batch = batch
        self._batch_size = self.task.batch_size(batch)
        mask = self.task.token_mask(batch)
        self._token_total = mask.sum() if mask is not None else None
        if loss_divisor is not None:
            reduction: Any = torch.as_tensor(loss_divisor, dtype=torch.float32, device=self.device)
        elif self.loss_reduction == "mean":
            reduction = float(self._batch_size)
        elif self.loss_reduction == "token_mean":
            reduction = self.task.loss_token_count(batch).to(self.device, torch.float32)
        else:
            reduction = 1.0
        self._loss_divisor = loss_divisor
        self._reduction = reduction
        self._accumulation = accumulation
        if self._window_scale is None:
            self._window_scale = float(loss_scale)
        self.set_loss_scale(float(loss_scale))
        self.tracker.reset()
        self._batch_groups = {}
        self.tracker.token_mask = mask
        self.tracker.active = True
        self.tracker.in_backward = False
        self._phase = _TRAIN

    def set_loss_scale(self, loss_scale: Any) -> None:
        """The factor the back-propagated loss carries beyond ``loss_reduction`` and accumulation
        (the AMP scale), for loops where it is known only as the backward starts: Hugging Face's
        Trainer rescales the model's loss after the forward. A tensor avoids a host synchronisation."""
        self._loss_scale = loss_scale
        self._grad_factor = self._reduction * (float(self._accumulation) / loss_scale)

    def begin_backward(self) -> None:
        """The user's backward pass of the batch starts: forwards from now on are recomputations
        (activation checkpointing), not new uses of the layers."""
        self.tracker.in_backward = True

    def end_batch(self) -> None:
        """Stop recording and drop references to the batch's tensors."""
        if self.tracker.in_backward and not any(self.tracker.call_counts().values()):
            self.hooks_bypassed = True
        self.tracker.active = False
        self.tracker.in_backward = False
        self.tracker.reset()
        self.tracker.token_mask = None
        self._phase = _IDLE
        self._batch = None

    @property
    def recording(self) -> bool:
        return self._phase != _IDLE

    def check_loss_reduction(self, model: nn.Module, loss: Tensor) -> Optional[str]:
        """Compare the loss the user back-propagates (``loss``, as Lightning passes it: divided for
        gradient accumulation, multiplied by the AMP scale) with the task's per-example losses on
        the batch being recorded, reduced as declared. Returns a warning when they differ by more
        than a factor of ``LOSS_RATIO_TOLERANCE``: a wrong ``loss_reduction`` (or a scaled loss)
        rescales every gradient the statistics see, and so the scores, with no other sign.

        Runs one extra forward without gradients, in the model's current mode, with the global
        random state and the module buffers restored afterwards."""
        actual = float(loss.detach().float()) * self._accumulation / self._loss_scale
        with ExitStack() as stack:
            stack.enter_context(passes.fork_rng(self.device))
            stack.enter_context(passes.buffers_restored(model))
            stack.enter_context(torch.no_grad())
            per_example = self.task.loss(model, self._batch).detach().double()
        total = float(per_example.sum())
        expected = {"mean": total / self._batch_size, "sum": total,
                    "token_mean": total / max(float(self.task.loss_token_count(self._batch)), 1.0)}
        declared = total / float(self._loss_divisor) if self._loss_divisor is not None else \
            expected[self.loss_reduction]

        def fits(value: float) -> bool:
            return value > 0 and 1 / LOSS_RATIO_TOLERANCE <= actual / value <= LOSS_RATIO_TOLERANCE

        if not (math.isfinite(actual) and actual > 0) or fits(declared) or declared <= 0:
            return None
        matching = [name for name, value in expected.items() if fits(value)]
        advice = (f"set loss_reduction={matching[0]!r}" if matching else
                  "return the task's loss from training_step, reduced as loss_reduction says (a scaled loss "
                  "scales every influence score by the same factor)")
        return (f"the training loss ({actual:.4g}) is {actual / declared:.3g}x what loss_reduction="
                f"{self.loss_reduction!r} predicts from the task's per-example losses ({declared:.4g}) on the "
                f"first collected batch; {advice}")

    def check_single_runs(self) -> None:
        """Refuse layers that ran more than once in a training step's forward pass (the set-up
        check saw each run once): shared weights, or a training step that runs the model twice.
        Their per-example gradients would be mixed up. Also refuse a step that back-propagated while
        no tracked layer's hook fired: its statistics would be missing without a sign."""
        if self.hooks_bypassed:
            raise ValueError(
                "a training step back-propagated without running any tracked layer's hooks: its forward bypasses "
                "module hooks: code compiled by torch.compile before the hooks existed and not recognised as compiled "
                "(call torch._dynamo.reset() before fit), or a training_step that applies the layers' weights "
                "functionally (call the modules)")
        if not self.miscounted:
            return
        listing = ", ".join(f"{name} (x{calls})" for name, calls in self.miscounted.items())
        raise ValueError(
            f"tracked layers ran more than once in one training step: {listing} (shared weights, or a "
            "training_step that runs the model more than once); run the model once per step, or exclude these "
            "layers (exclude=[...])"
        )

    def _on_gradient(self, layer: TrackedLayer, acts: Tensor, grads: Tensor) -> None:
        if self._phase != _TRAIN:
            return  # our own backward for sampled targets: handled by sample_true_fisher
        calls = self.tracker.call_count(layer.name)
        if calls != 1:
            self.miscounted[layer.name] = calls
            return
        if layer.name not in self._pending.state:
            return  # another process's layer (shard)
        group = self._input_group(layer.name)
        with torch.no_grad(), torch.autocast(acts.device.type, enabled=False):
            acts_kept, grads_kept, weight, tokens = self._subsample(acts, grads, group)
            target = self._pending.activations_of(layer.name)  # an input group's sums: added once per batch
            if ("added", target) not in self._batch_groups:
                self._batch_groups["added", target] = True
                self._pending.add_activations(target, acts_kept, tokens)
            if self.fisher == "empirical":
                self._pending.add_gradients(layer.name, grads_kept.float() * self._grad_factor,
                                            self._batch_size, weight)
            if self.observer is not None:  # scale the observer's result, not the gradients (cheaper)
                self.observer(layer, acts, grads, self._grad_factor)

    def _input_group(self, name: str) -> Optional[str]:
        """The first layer of ``name``'s input group (``None``: in none), finding the groups on the
        first call and checking on each batch that the group's layers still read one tensor (else
        they stop sharing: their sums so far are equal, so each gets a copy)."""
        if self._group_of is None:
            groups = self.tracker.input_groups()
            if self.share_inputs:
                self._pending.share_inputs(self.stats.share_inputs(groups))
            self._group_of = {member: group for group in groups for member in group}
        group = self._group_of.get(name)
        if group is None:
            return None
        if ("checked", group[0]) not in self._batch_groups:
            self._batch_groups["checked", group[0]] = True
            keys = {self.tracker.input_key(member) for member in group}
            if len(keys) != 1 or None in keys:
                for statistics in (self.stats, self._pending):
                    statistics.split_inputs(group)
                for member in group:
                    del self._group_of[member]
                return None
        return group[0]

    def _token_subset(self, positions: int) -> Tuple[Optional[Tensor], float]:
        """Which of ``positions`` token rows to keep (``None``: all of them) and the weight on ``S``
        that keeps it unbiased."""
        if self.max_tokens is None or positions <= self.max_tokens:
            return None, 1.0
        keep = torch.randperm(positions, generator=self._token_generator)[: self.max_tokens]
        return keep, positions / self.max_tokens

    def _subsample(self, acts: Tensor, grads: Tensor, group: Optional[str] = None):
        """Flatten token positions and keep at most ``max_tokens`` of them: ``(acts, grads, S
        weight, real tokens kept)``. The layers of an input ``group`` keep the same positions."""
        positions = acts.shape[0] * acts.shape[1]
        mask = self.tracker.token_mask
        mask_applies = mask is not None and mask.shape[1] == acts.shape[1]
        acts = acts.reshape(positions, -1)
        grads = grads.reshape(positions, -1)
        if group is None:
            keep, weight = self._token_subset(positions)
        else:
            if ("subset", group) not in self._batch_groups:
                self._batch_groups["subset", group] = self._token_subset(positions)
            keep, weight = self._batch_groups["subset", group]
        if keep is None:
            tokens = self._token_total if mask_applies else float(positions)
            return acts, grads, weight, tokens
        keep = keep.to(acts.device)
        tokens = mask.reshape(-1)[keep].sum() if mask_applies else float(self.max_tokens)
        return acts[keep], grads[keep], weight, tokens

    def _add_sampled(self, layer: TrackedLayer, grads: Tensor, factor: float, weight: float = 1.0,
                     share: float = 1.0) -> None:
        if layer.name not in self._pending.state:
            return  # another process's layer (shard)
        with torch.no_grad(), torch.autocast(grads.device.type, enabled=False):
            flat = grads.reshape(-1, grads.shape[-1])
            keep, scale = self._token_subset(flat.shape[0])
            if keep is not None:
                flat = flat[keep.to(flat.device)]
            self._pending.add_gradients(layer.name, flat.float() * factor, self._batch_size * share, weight * scale)

    # -- true Fisher ----------------------------------------------------------------------------
    def sample_true_fisher(self, model: nn.Module, outputs: Any = None) -> bool:
        """Add ``S`` from targets sampled from the model, before the user's backward frees the graph.

        Reuses ``outputs`` (what the model returned in this training step) when the task can
        compute its loss from them: one extra backward, via ``torch.autograd.grad`` on the tracked
        outputs (no ``.grad`` is touched). Otherwise runs an extra forward and backward on the batch
        in eval mode with buffers restored. Returns whether the step's outputs were reused.
        """
        batch = self._batch
        reused = outputs is not None and self._sample_from_outputs(outputs, batch)
        if not reused:
            self._sample_with_extra_pass(model, batch)
        return reused

    def _sample_from_outputs(self, outputs: Any, batch: Any) -> bool:
        counts = self.tracker.call_counts()
        if any(count != 1 for count in counts.values()):
            return False
        try:
            logits = unwrap_logits(outputs)
            loss = self.task.sample_loss_from_outputs(logits, batch, self._sample_generator)
        except (TypeError, ValueError, KeyError, IndexError, RuntimeError, AttributeError):
            return False
        if loss.shape != (self._batch_size,) or not loss.requires_grad:
            return False
        phase, self._phase = self._phase, _OWN
        try:
            grads = torch.autograd.grad(loss.sum() * self._loss_scale, self.tracker.outputs(),
                                        retain_graph=True, allow_unused=True)
        finally:
            self._phase = phase
        if any(grad is None for grad in grads):
            return False
        for layer, grad in zip(self.layers, grads):
            masked = self.tracker.masked(layer.output_gradients(grad), self.tracker.token_mask)
            self._add_sampled(layer, masked, 1.0 / self._loss_scale)
        return True

    def _sample_with_extra_pass(self, model: nn.Module, batch: Any) -> None:
        active, self.tracker.active = self.tracker.active, False
        try:
            with ExitStack() as stack:
                stack.enter_context(passes.fork_rng(self.device))
                stack.enter_context(passes.evaluation_mode(model))
                outputs = passes.forward(model, self.task, batch, self._own_tracker)
                for weight, share, grads in passes.fisher_gradients(outputs, self.task, batch, self._own_tracker,
                                                                    "true", self._sample_generator):
                    for layer, grad in zip(self.layers, grads):
                        self._add_sampled(layer, grad, 1.0, weight, share)
        finally:
            self._own_tracker.reset()
            self.tracker.active = active

    # -- committing steps -----------------------------------------------------------------------
    def before_backward(self, model: nn.Module, loss: Tensor, outputs: Any = None) -> Optional[str]:
        """Between the forward and the backward of a recorded batch: mark the backward's start,
        sample the true Fisher's targets (reusing ``outputs`` when given), and on the first such
        batch check the loss reduction (the warning is returned)."""
        self.begin_backward()
        message = None
        if not self._loss_checked:
            self._loss_checked = True
            message = self.check_loss_reduction(model, loss)
        if self.fisher == "true":
            self.sample_true_fisher(model, outputs)
        return message

    def commit_step(self, loss_scale: Optional[float] = None) -> Optional[bool]:
        """The optimizer stepped: commit the batches recorded since the last step, unless the AMP
        scaler skipped it (its scale fell below the one at the step's first recorded batch).
        Returns whether the step counted, or ``None`` when no batch was recorded."""
        if self._window_scale is None:
            return None
        valid = loss_scale is None or loss_scale >= self._window_scale
        self.commit(valid=valid)
        return valid

    def commit(self, valid: bool = True) -> None:
        """Fold the buffered batches of one optimizer step into the statistics, unless the step
        was skipped (``valid=False``) or produced non-finite values; no host synchronisation."""
        pending = self._pending.tensors()
        # A process accumulating no layer (shard) counts the step as the others do.
        has_data = torch.stack([p["s_count"] > 0 for p in self._pending.state.values()] or
                               [torch.ones((), dtype=torch.bool, device=self.device)]).any()
        # One sum per tensor finds NaN and inf (they propagate) without an element-wise mask; a step
        # whose finite sums overflow float32 is skipped too: its statistics would overflow the totals.
        finite = torch.stack([t.sum() for t in pending] or [torch.zeros((), device=self.device)]).isfinite().all()
        ok = finite & has_data & valid
        decay = torch.where(ok, self.ema_decay, 1.0) if self.window == "ema" else None
        for total, new in zip(self.stats.tensors(), pending):
            if decay is not None:
                total.mul_(decay.to(total.dtype))
            total.add_(new.masked_fill_(~ok, 0.0))  # the buffer is zeroed below anyway
        if decay is not None:
            self.steps_in_window.mul_(decay.to(self.steps_in_window.dtype))
        self.steps_in_window += ok
        self.steps_committed += ok
        self.steps_skipped += has_data & ~ok
        self._pending.zero_()
        self._window_scale = None

    def reset(self) -> None:
        """Start a new window (``curvature.ema_decay=None``); moving averages keep going."""
        if self.window == "reset":
            self.stats.zero_()
            self.steps_in_window.zero_()

    # -- across processes -----------------------------------------------------------------------
    def reduced(self) -> CovarianceStatistics:
        """The statistics summed over every process (collective); the local sums stay as they are."""
        if self.sharded:
            raise ValueError("statistics collected sharded (shard=True) are reduced onto their owners only: "
                             "use InfluenceSession(curvature={'shard_factors': True}).reduce_statistics")
        total = CovarianceStatistics(self.layers, dtype=self.stats.state[self.layers[0].name]["a_sum"].dtype,
                                     device=self.statistics_device)
        total.share_inputs(self.stats.input_groups)
        total.merge_(self.stats)
        distributed.all_reduce_sum_(total.tensors())
        return total

    def held_bytes(self) -> int:
        """Bytes of the sums and of one step's buffer this process holds."""
        return sum(t.numel() * t.element_size() for t in self.stats.tensors() + self._pending.tensors())

    def consolidate_(self) -> None:
        """Move every process's sums onto rank 0 (the totals are unchanged), so rank 0's state
        alone describes the run: what a checkpoint written by rank 0 needs (collective). Sharded,
        the sums stay with their owners and :meth:`state_dict` gathers them."""
        if distributed.world_size() == 1 or self.sharded:
            return
        distributed.all_reduce_sum_(self.stats.tensors())
        if distributed.rank() != 0:
            self.stats.zero_()

    # -- persistence ----------------------------------------------------------------------------
    def layer_shapes(self) -> list:
        return [[layer.name, layer.d_out, layer.d_in] for layer in self.layers]

    def state_dict(self) -> Dict[str, Any]:
        """Every layer's sums (sharded: gathered from their owners, collective)."""
        stats = self.stats.state_dict()
        if self.sharded:
            stats = {key: value for held in distributed.gather_objects(stats) for key, value in held.items()}
        return {
            "layers": self.layer_shapes(),
            "stats": stats,
            "steps_committed": float(self.steps_committed),
            "steps_in_window": float(self.steps_in_window),
            "steps_skipped": float(self.steps_skipped),
            "token_generator": self._token_generator.get_state(),
            "sample_generator": self._sample_generator.get_state().cpu(),
        }

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore a consolidated state (every rank loads it; only rank 0 keeps the sums); refuse
        the statistics of other layers."""
        saved = [list(item) for item in state.get("layers", self.layer_shapes())]
        if saved != self.layer_shapes():
            raise ValueError(
                f"the checkpoint's influence statistics track other layers ({[n for n, *_ in saved][:8]}) than this "
                f"callback ({[layer.name for layer in self.layers][:8]}); resume with the same curvature.layers / "
                "curvature.exclude settings"
            )
        if self.sharded:  # this process's layers, whoever held them when the checkpoint was written
            self.stats.load_state_dict({key: value for key, value in state["stats"].items()
                                        if key.rpartition("/")[0] in self.stats.state})
        else:
            self.stats.load_state_dict(state["stats"])
            if distributed.rank() != 0:
                self.stats.zero_()
        for group in self._pending.input_groups:  # a group the saved sums split: the step buffer follows
            if group not in self.stats.input_groups:
                self._pending.split_inputs(group)
        self.steps_committed.fill_(state["steps_committed"])
        self.steps_in_window.fill_(state.get("steps_in_window", state["steps_committed"]))  # older states: one window
        self.steps_skipped.fill_(state["steps_skipped"])
        self._token_generator.set_state(state["token_generator"])
        self._sample_generator.set_state(state["sample_generator"])


def scaler_scale(precision: Any) -> float:
    """The current scale of the AMP GradScaler a Lightning / Fabric precision plugin holds (1 without
    one): what a training loop's loss carries beyond its reduction."""
    scaler = getattr(precision, "scaler", None)
    if scaler is None or not scaler.is_enabled():
        return 1.0
    return float(scaler.get_scale())
