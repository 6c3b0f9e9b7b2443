"""Tasks: how to get a per-example loss, the query measurement and the output curvature from a batch.

A task is the only place that knows the batch layout and the likelihood. Everything else in the
engine sees ``loss(...) -> Tensor[B]``: each example's loss **summed over its tokens**.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn


# Keys holding the targets in a dict batch, tried in order (Hugging Face's first).
LABEL_KEYS = ("labels", "label", "y")


def unwrap_logits(outputs: Any) -> Tensor:
    """Models may return a tensor, a tuple (first element) or an object/dict with ``logits``."""
    if isinstance(outputs, Tensor):
        return outputs
    if isinstance(outputs, Mapping) and "logits" in outputs:
        return outputs["logits"]
    if hasattr(outputs, "logits"):
        return outputs.logits
    if isinstance(outputs, (tuple, list)) and outputs and isinstance(outputs[0], Tensor):
        return outputs[0]
    raise TypeError(
        f"cannot find the model's predictions in an output of type {type(outputs).__name__}; "
        "return a tensor or an object with `.logits`, or override Task.forward"
    )


class Task:
    """How the engine evaluates a model on a batch. Subclass to support your own batches or losses.

    Batches: a tuple ``(inputs, targets)`` (``inputs`` a tensor, passed positionally, or a dict,
    passed as keyword arguments), or a dict. In a dict the targets are ``batch[label_key]``, by
    default the first of ``"labels"``, ``"label"``, ``"y"`` present; the inputs are
    ``batch[input_key]`` passed positionally when ``input_key`` is given, else every other key as
    keyword arguments (``{"pixel_values", "labels"}`` -> ``model(pixel_values=...)``, as Hugging
    Face models take them), except that a lone remaining key ``"x"`` is passed positionally
    (``{"x", "y"}`` -> ``model(x)``).

    Override :meth:`forward` and :meth:`loss_from_outputs` (and, for ``fisher="true"`` /
    ``"exact"``, :meth:`sample_loss_from_outputs` / :meth:`output_hessian_sqrt`). Splitting the
    forward from the loss lets the true Fisher reuse one forward for several sampled targets.

    Args:
        input_key: the dict key of the model's single (positional) input.
        label_key: the dict key of the targets.
    """

    # Whether a dict batch must hold targets: checked before the forward, for a clear error.
    requires_targets = False

    def __init__(self, input_key: Optional[str] = None, label_key: Optional[str] = None) -> None:
        self.input_key = input_key
        self.label_key = label_key

    def forward(self, model: nn.Module, batch: Any) -> Tensor:
        """The model's predictions for ``batch`` (logits for classification)."""
        inputs = batch[0] if isinstance(batch, (tuple, list)) else self._dict_inputs(batch)
        if isinstance(inputs, Mapping):
            return unwrap_logits(model(**inputs))
        return unwrap_logits(model(inputs))

    def _label_key(self, batch: Mapping, required: bool) -> Optional[str]:
        """The key of a dict batch's targets; ``None`` when absent and not ``required``."""
        candidates = (self.label_key,) if self.label_key is not None else LABEL_KEYS
        key = next((key for key in candidates if key in batch), None)
        if key is None and required:
            raise KeyError(f"no targets in a dict batch with keys {sorted(batch)}: looked for "
                           f"{', '.join(map(repr, candidates))}; name the key with label_key=...")
        return key

    def _dict_inputs(self, batch: Any) -> Any:
        """A dict batch's model input: one tensor, or a dict of keyword arguments (see the class)."""
        if not isinstance(batch, Mapping):
            return batch
        if self.input_key is not None:
            return batch[self.input_key]
        label = self._label_key(batch, self.requires_targets)  # no targets (a custom loss): every key
        inputs = {key: value for key, value in batch.items() if key != label}
        return inputs["x"] if list(inputs) == ["x"] else inputs

    def loss_from_outputs(self, outputs: Tensor, batch: Any) -> Tensor:
        """Per-example loss ``[B]`` summed over tokens, with the batch's own targets."""
        raise NotImplementedError

    def sample_loss_from_outputs(self, outputs: Tensor, batch: Any, generator: torch.Generator) -> Tensor:
        """Per-example loss ``[B]`` with targets drawn from the model's predictive distribution."""
        raise NotImplementedError(f"{type(self).__name__} does not support fisher='true'")

    def output_hessian_sqrt(self, outputs: Tensor, batch: Any) -> Tensor:
        """``[K, *outputs.shape]``: vectors ``v_k`` with ``Σ_k v_k v_kᵀ`` = the Hessian of the summed
        loss w.r.t. the outputs, per example. Back-propagating each gives the exact Gauss-Newton."""
        raise NotImplementedError(f"{type(self).__name__} does not support fisher='exact'")

    def loss(self, model: nn.Module, batch: Any, sample: bool = False,
             generator: Optional[torch.Generator] = None) -> Tensor:
        """Per-example loss ``[B]`` summed over tokens; ``sample=True`` draws targets from the model."""
        outputs = self.forward(model, batch)
        if sample:
            return self.sample_loss_from_outputs(outputs, batch, generator or torch.Generator(outputs.device))
        return self.loss_from_outputs(outputs, batch)

    def measurement(self, model: nn.Module, batch: Any) -> Tensor:
        """The query quantity whose change influence predicts, ``[B]``. Default: log-likelihood."""
        return -self.loss(model, batch)

    def token_mask(self, batch: Any) -> Optional[Tensor]:
        """``[B, T]`` bool mask of real (non-padding) input positions, or ``None`` (all real): the
        ``attention_mask`` of a dict batch (or of a tuple's input dict), as tokenizers pad. Inside
        the model padded positions still have activations; they must count in no statistic."""
        inputs = batch[0] if isinstance(batch, (tuple, list)) and batch else batch
        if isinstance(inputs, Mapping) and "attention_mask" in inputs:
            return inputs["attention_mask"].bool()
        return None

    def loss_token_count(self, batch: Any) -> Tensor:
        """How many terms a token-mean training loss divides by (``loss_reduction="token_mean"``):
        the real input positions, or one per example when the task has no token axis."""
        mask = self.token_mask(batch)
        if mask is not None:
            return mask.sum()
        return torch.tensor(float(self.batch_size(batch)))

    def batch_size(self, batch: Any) -> int:
        first = batch[0] if isinstance(batch, (tuple, list)) else batch
        if isinstance(first, Mapping):
            first = next(iter(first.values()))
        return int(first.shape[0])

    def targets(self, batch: Any) -> Tensor:
        if isinstance(batch, Mapping):
            return batch[self._label_key(batch, required=True)]
        return batch[1]


class ClassificationTask(Task):
    """Softmax cross-entropy on ``(x, y)`` batches or dicts (see :class:`Task` for the layouts).

    Logits may have extra dimensions ``[B, ..., C]`` (e.g. per-token classification); the loss is
    summed over them, ignoring targets equal to ``ignore_index``.
    """

    requires_targets = True

    def __init__(self, ignore_index: int = -100, input_key: Optional[str] = None,
                 label_key: Optional[str] = None) -> None:
        super().__init__(input_key, label_key)
        self.ignore_index = ignore_index

    def _per_example(self, logits: Tensor, targets: Tensor) -> Tensor:
        flat = F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
            reduction="none", ignore_index=self.ignore_index,
        )
        return flat.view(logits.shape[0], -1).sum(1)

    def loss_from_outputs(self, outputs: Tensor, batch: Any) -> Tensor:
        return self._per_example(outputs, self.targets(batch))

    def loss_token_count(self, batch: Any) -> Tensor:
        """Targets that count in the loss (not ``ignore_index``): a token-mean loss divides by these."""
        return (self.targets(batch) != self.ignore_index).sum()

    def _valid(self, outputs: Tensor, batch: Any) -> Tensor:
        return (self.targets(batch) != self.ignore_index).reshape(outputs.shape[:-1])

    def sample_loss_from_outputs(self, outputs: Tensor, batch: Any, generator: torch.Generator) -> Tensor:
        probs = torch.softmax(outputs.detach().float(), -1).reshape(-1, outputs.shape[-1])
        # Non-finite logits draw from a uniform stand-in (their example's statistics are left out).
        probs = probs.masked_fill(~torch.isfinite(probs).all(-1, keepdim=True), 1.0)
        sampled = torch.multinomial(probs, 1, generator=generator).view(outputs.shape[:-1])
        sampled = sampled.masked_fill(~self._valid(outputs, batch), self.ignore_index)
        return self._per_example(outputs, sampled)

    def output_hessian_sqrt(self, outputs: Tensor, batch: Any) -> Tensor:
        # Per position, H = diag(p) - p pᵀ = Σ_c p_c (e_c - p)(e_c - p)ᵀ: one vector per (position, class).
        probs = torch.softmax(outputs.detach(), -1) * self._valid(outputs, batch).unsqueeze(-1)
        batch_size, num_classes = outputs.shape[0], outputs.shape[-1]
        flat = probs.reshape(batch_size, -1, num_classes)  # [B, P, C]
        positions = flat.shape[1]
        eye = torch.eye(num_classes, dtype=flat.dtype, device=flat.device)
        # cols[p, c, b, p', c'] = sqrt(p_bpc) (e_c - p_bp)[c'] if p' == p else 0
        cols = flat.new_zeros(positions, num_classes, batch_size, positions, num_classes)
        for pos in range(positions):
            p = flat[:, pos]  # [B, C]
            cols[pos, :, :, pos] = (p.sqrt().T.unsqueeze(-1)) * (eye.unsqueeze(1) - p.unsqueeze(0))
        return cols.reshape(positions * num_classes, *outputs.shape)


class RegressionTask(Task):
    """Squared error summed over output dimensions: ``ℓ = Σ (f(x) - y)²`` (``reduction="sum"``), on
    ``(x, y)`` batches or dicts (see :class:`Task` for the layouts).

    This is the negative log-likelihood (up to a constant) of ``y ~ N(f(x), ½ I)``, which is the
    distribution the true Fisher samples from; its output Hessian is ``2 I``.
    """

    requires_targets = True

    def loss_from_outputs(self, outputs: Tensor, batch: Any) -> Tensor:
        targets = self.targets(batch).reshape(outputs.shape).to(outputs.dtype)
        return (outputs - targets).pow(2).reshape(outputs.shape[0], -1).sum(1)

    def sample_loss_from_outputs(self, outputs: Tensor, batch: Any, generator: torch.Generator) -> Tensor:
        noise = torch.randn(outputs.shape, generator=generator, device=outputs.device, dtype=outputs.dtype)
        sampled = outputs.detach() + noise * (0.5 ** 0.5)
        return (outputs - sampled).pow(2).reshape(outputs.shape[0], -1).sum(1)

    def output_hessian_sqrt(self, outputs: Tensor, batch: Any) -> Tensor:
        dims = outputs[0].numel()
        eye = torch.eye(dims, dtype=outputs.dtype, device=outputs.device) * (2.0 ** 0.5)
        return eye.unsqueeze(1).expand(dims, outputs.shape[0], dims).reshape(dims, *outputs.shape)


class CausalLMTask(ClassificationTask):
    """Next-token prediction on dict batches with ``input_ids`` (and optional ``labels``,
    ``attention_mask``), or tuples ``(input_ids,)`` / ``(input_ids, labels)``, for models returning
    logits ``[B, T, V]`` or an object with ``.logits``.

    As in Hugging Face, ``labels`` are aligned with ``input_ids`` and shifted inside the loss
    (position t predicts token t+1); labels equal to ``ignore_index`` and padded positions are
    skipped. Without ``labels`` the inputs themselves are the labels.
    """

    def __init__(self, ignore_index: int = -100) -> None:
        super().__init__(ignore_index)

    def forward(self, model: nn.Module, batch: Any) -> Tensor:
        batch = _token_fields(batch)
        kwargs = {"input_ids": batch["input_ids"]}
        if "attention_mask" in batch and _accepts_attention_mask(model):
            kwargs["attention_mask"] = batch["attention_mask"]
        return unwrap_logits(model(**kwargs))

    def targets(self, batch: Any) -> Tensor:
        batch = _token_fields(batch)
        labels = batch["labels"] if "labels" in batch else batch["input_ids"]
        if "attention_mask" in batch:
            labels = labels.masked_fill(batch["attention_mask"] == 0, self.ignore_index)
        shifted = labels.new_full(labels.shape, self.ignore_index)
        shifted[:, :-1] = labels[:, 1:]  # the logits at t are scored against the token at t+1
        return shifted

    def batch_size(self, batch: Any) -> int:
        return int(_token_fields(batch)["input_ids"].shape[0])


def _token_fields(batch: Any) -> Mapping[str, Tensor]:
    """A causal-LM batch as a mapping with ``input_ids`` (tuples ``(input_ids[, labels])`` accepted)."""
    if isinstance(batch, Mapping) and "input_ids" in batch:
        return batch
    if isinstance(batch, (tuple, list)) and 1 <= len(batch) <= 2 and all(isinstance(t, Tensor) for t in batch):
        return dict(zip(("input_ids", "labels"), batch))
    if isinstance(batch, Mapping):
        got = f"a dict with keys {sorted(batch)}"
    elif isinstance(batch, (tuple, list)):
        got = f"a {type(batch).__name__} of {len(batch)}"
    else:
        got = f"a {type(batch).__name__}"
    raise TypeError(f"CausalLMTask expects a dict batch with 'input_ids' (optionally 'labels' and "
                    f"'attention_mask'), or a tuple (input_ids,) or (input_ids, labels); got {got}")


def _accepts_attention_mask(model: nn.Module) -> bool:
    import inspect

    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False
    return "attention_mask" in params or any(p.kind == p.VAR_KEYWORD for p in params.values())
