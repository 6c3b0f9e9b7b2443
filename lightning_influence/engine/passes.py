"""The engine's own forward/backward passes over data: batching, device placement, eval mode, and
the pseudo-gradients of each Fisher kind. Shared by factor fitting and scoring."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
from collections.abc import Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, Callable, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset

from lightning_influence.engine import distributed
from lightning_influence.tasks import Task
from lightning_influence.engine.tracking import LayerTracker, TrackedLayer


def as_loader(data: Any, batch_size: int) -> DataLoader:
    """A Dataset becomes a sequential DataLoader; a DataLoader is used as given (order must be
    deterministic for example ids to mean dataset indices)."""
    if isinstance(data, DataLoader):
        return data
    if isinstance(data, Dataset) or hasattr(data, "__getitem__"):
        if not hasattr(data, "__len__"):
            raise TypeError(f"{type(data).__name__} has no __len__; pass a map-style Dataset or a DataLoader")
        # A private generator: even a sequential loader draws a base seed per iteration, which
        # would otherwise come from (and advance) the global random state of the training run.
        return DataLoader(data, batch_size=batch_size, shuffle=False, generator=torch.Generator())
    raise TypeError(f"expected a Dataset or DataLoader, got {type(data).__name__}")


class PoolSubset(Subset):
    """Some of a candidate pool's examples, known by their indices in the pool (what results and
    warnings call dataset indices), not by their positions in this subset."""

    def dataset_indices(self, positions: Sequence[int]) -> List[int]:
        return [int(self.indices[position]) for position in positions]


def dataset_indices(data: Any, positions: Sequence[int]) -> List[int]:
    """The dataset indices of the examples at ``positions`` in the order ``data`` yields them: what
    a session's pool reader (:class:`PoolSubset`, a streaming pool) says; of other data, the
    positions themselves (data are read in order: see :func:`as_loader`)."""
    dataset = data.data if isinstance(data, Lockstep) else data
    dataset = dataset.dataset if isinstance(dataset, DataLoader) else dataset
    known = getattr(dataset, "dataset_indices", None)
    return known(positions) if callable(known) else list(positions)


def example_count(data: Any) -> Optional[int]:
    """How many examples ``data`` (a Dataset or DataLoader) holds, when known before it is read;
    ``None`` for a streaming pool or anything else without a length."""
    dataset = data.dataset if isinstance(data, DataLoader) else data
    try:
        return len(dataset) if isinstance(dataset, Dataset) or hasattr(dataset, "__getitem__") else None
    except TypeError:
        return None


@dataclasses.dataclass
class Lockstep:
    """One process's share of data, padded with ``filler`` (a real batch, whose results are
    discarded) to ``batches`` batches: the same number on every process. Under FSDP each forward
    and backward gathers the weights with collectives, so a process running one pass more than the
    others would wait for them forever. ``batches=None`` (a share of unknown length: a streaming
    pool): read in rounds, every process running one more batch while any still has one (one
    vote per batch, collective)."""

    data: Any
    batches: Optional[int]
    filler: Any


def iterate_batches(data: Any, batch_size: int, device: torch.device, desc: str, show_progress: bool,
                    max_batches: Optional[int] = None) -> Iterator[Tuple[Any, bool]]:
    """``(batch, counted)`` for the first ``max_batches`` batches of ``data``, on ``device``, with a
    progress bar; ``counted`` is ``False`` for a :class:`Lockstep` filler, which the caller runs
    like any batch (the collectives inside the model need it) and then leaves out of its results."""
    padding = data if isinstance(data, Lockstep) else None
    loader = as_loader(padding.data if padding else data, batch_size)
    try:
        length: Optional[int] = len(loader)
    except TypeError:  # a streaming pool (IterableDataset): its length is known once read
        length = None
    total = length if max_batches is None else max_batches if length is None else min(length, max_batches)
    if padding is not None and padding.batches is None:
        batches, total, fillers = _in_rounds(itertools.islice(loader, total), padding.filler), None, 0
    else:
        fillers = max(0, padding.batches - total) if padding is not None else 0
        batches = itertools.chain(((batch, True) for batch in itertools.islice(loader, total)),
                                  itertools.repeat((padding.filler if padding else None, False), fillers))
    for batch, counted in progress(batches, None if total is None else total + fillers, desc, show_progress):
        yield to_device(batch, device), counted


def _in_rounds(batches: Iterator[Any], filler: Any) -> Iterator[Tuple[Any, bool]]:
    """``(batch, True)`` while this process has batches, then ``(filler, False)``, for as long as
    any process still has one (a collective vote before each batch)."""
    for batch in itertools.chain(batches, itertools.repeat(None)):
        if not distributed.any_process(batch is not None):
            return
        yield (batch, True) if batch is not None else (filler, False)


def outside_inference_mode(function: Callable) -> Callable:
    """Run an engine entry point outside ``inference_mode``: Lightning's validation hooks run
    inside it, and inference tensors (batches, statistics) cannot take part in backward passes or
    be updated in place afterwards."""

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        with torch.inference_mode(False):
            return function(*args, **kwargs)

    return wrapper


def to_device(batch: Any, device: torch.device) -> Any:
    """Move every tensor of a batch to ``device``: inside mappings (dicts, and ``UserDict``s such as
    Hugging Face's ``BatchEncoding``, rebuilt as their own type when their constructor takes a
    dict, else as a dict), lists, tuples (named ones too), dataclasses, and any object with a
    ``.to(device)`` method. Anything else is returned as it is."""
    if isinstance(batch, Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        moved = {k: to_device(v, device) for k, v in batch.items()}
        try:
            return type(batch)(moved)
        except TypeError:  # a mapping whose constructor takes something else (e.g. defaultdict)
            return moved
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):
        return type(batch)(*(to_device(v, device) for v in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    if dataclasses.is_dataclass(batch) and not isinstance(batch, type):
        return dataclasses.replace(batch, **{f.name: to_device(getattr(batch, f.name), device)
                                             for f in dataclasses.fields(batch) if f.init})
    if callable(getattr(batch, "to", None)):
        return batch.to(device)
    return batch


def model_device(model: nn.Module) -> torch.device:
    for param in model.parameters():
        return param.device
    return torch.device("cpu")


def fork_rng(device: torch.device):
    """``torch.random.fork_rng`` over the CPU and, on a GPU, that device: the global random state
    is the same after the block as before, whatever ran inside (the engine's passes never shift
    the training run's randomness)."""
    devices = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    return torch.random.fork_rng(devices=devices)


@contextmanager
def buffers_restored(model: nn.Module) -> Iterator[None]:
    """Run the block on copies of every module buffer (e.g. batch-norm running statistics) and put
    the originals back untouched. Untouched matters: the training step's graph may hold a buffer
    for its backward (batch norm's running statistics in training mode, BERT's ``token_type_ids``),
    and any in-place write to it, even restoring its value, makes that backward fail."""
    originals = [(module, name, buf) for module in model.modules()
                 for name, buf in module._buffers.items() if buf is not None]
    with torch.inference_mode(False):  # copies that may take part in a backward (entered from validation)
        for module, name, buf in originals:
            module._buffers[name] = buf.clone()
    try:
        yield
    finally:
        for module, name, buf in originals:
            module._buffers[name] = buf


@contextmanager
def evaluation_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode with gradients enabled (even inside ``inference_mode``); restores each module's
    train flag and every buffer afterwards, so the engine's passes never perturb training."""
    flags = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with buffers_restored(model), torch.inference_mode(False), torch.enable_grad():
            yield
    finally:
        for module, flag in flags.items():
            module.training = flag


def eager():
    """Run compiled code eagerly inside the block (``torch.compile`` is ignored): the engine's own
    passes run the model in eval mode and without gradients, which would otherwise compile new
    graphs of a training model, and differentiate w.r.t. layer outputs that only eager code exposes."""
    return torch.compiler.set_stance("force_eager")


def progress(iterable, total: Optional[int], desc: str, enabled: bool):
    """Wrap in a tqdm bar (the library behind Lightning's own progress bar) when enabled."""
    if not enabled:
        return iterable
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm ships with Lightning
        return iterable
    return tqdm(iterable, total=total, desc=desc, leave=False, dynamic_ncols=True)


# The autocast dtype of the engine's forward passes in the current context (None: full precision).
_AUTOCAST: ContextVar[Optional[torch.dtype]] = ContextVar("lightning_influence_autocast", default=None)
LOW_PRECISION = (torch.bfloat16, torch.float16)
# Lightning / Fabric precision settings whose training steps run under autocast, and its dtype.
MIXED_PRECISION = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}


def autocast_dtype(precision: Any) -> Optional[torch.dtype]:
    """The autocast dtype of a Lightning / Fabric ``precision`` setting (``"bf16-mixed"``,
    ``"16-mixed"``); ``None`` for every other (float32, or weights already in half precision)."""
    return MIXED_PRECISION.get(str(precision))


def check_autocast(dtype: Optional[torch.dtype]) -> Optional[torch.dtype]:
    """``dtype`` if the engine's forwards can run under autocast with it (or ``None``), else raise."""
    if dtype is not None and dtype not in LOW_PRECISION:
        raise ValueError(f"autocast dtype must be torch.bfloat16, torch.float16 or None, got {dtype}")
    return dtype


@contextmanager
def mixed_precision(dtype: Optional[torch.dtype]) -> Iterator[None]:
    """Run the engine's forward passes inside the block under ``torch.autocast(dtype)``, as a
    mixed-precision training step runs them (the scores then describe the model as it is trained,
    and the passes take the activation memory and, on GPUs, the speed of the training steps).
    Only the forwards: activations and output gradients are cast to float32 before any statistic,
    rotation or contraction, and eigendecompositions stay float64. ``None`` runs them in the
    model's own precision."""
    token = _AUTOCAST.set(check_autocast(dtype))
    try:
        yield
    finally:
        _AUTOCAST.reset(token)


def autocast_forward(model: nn.Module):
    """The autocast context of one engine forward of ``model`` (see :func:`mixed_precision`)."""
    dtype = _AUTOCAST.get()
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(model_device(model).type, dtype=dtype)


def full_precision(values: Any) -> Any:
    """A half-precision tensor in float32 (what every statistic and contraction is computed in);
    anything else unchanged."""
    return values.float() if isinstance(values, Tensor) and values.dtype in LOW_PRECISION else values


def forward(model: nn.Module, task: Task, batch: Any, tracker: LayerTracker) -> Tensor:
    """Run the task's forward with the tracker recording; returns the model outputs (in float32
    under :func:`mixed_precision`, so losses and sampled targets are computed in float32)."""
    with tracker.capture(task.token_mask(batch)), autocast_forward(model):
        outputs = task.forward(model, batch)
    tracker.check_single_calls()
    return full_precision(outputs)


def layer_gradients(target: Tensor, tracker: LayerTracker, grad_output: Optional[Tensor] = None,
                    retain_graph: bool = False) -> List[Tensor]:
    """Gradients of ``target`` w.r.t. each tracked layer's output, as ``[B, T, d_out]`` (masked).

    Uses ``torch.autograd.grad`` on the layer outputs (and the tracker's ``reach`` outputs, whose
    gradients are dropped): no parameter gradient is formed and no ``.grad`` attribute is touched.
    A layer the target does not depend on gets zeros.
    """
    outputs = tracker.outputs()
    grads = torch.autograd.grad(target, outputs + tracker.reach_outputs(), grad_outputs=grad_output,
                                retain_graph=retain_graph, allow_unused=True)[:len(outputs)]
    result = []
    for layer, out, grad in zip(tracker.layers, outputs, grads):
        grad = torch.zeros_like(out) if grad is None else grad
        result.append(tracker.masked(layer.output_gradients(full_precision(grad)), tracker.token_mask))
    return result


def fisher_gradients(outputs: Tensor, task: Task, batch: Any, tracker: LayerTracker, fisher: str,
                     generator: torch.Generator, num_samples: int = 1
                     ) -> Iterator[Tuple[float, float, List[Tensor]]]:
    """Yield ``(weight, example_share, per-layer gradients)``: weighted outer products of the
    gradients sum to the batch's curvature, and the shares sum to 1 (so each example is counted
    once). Kinds: the empirical Fisher (real targets); the true Fisher (``num_samples`` sampled
    targets, weight ``1/num_samples``); the exact Gauss-Newton (one backward per column of the
    output Hessian's square root, weight 1)."""
    if fisher == "empirical":
        yield 1.0, 1.0, layer_gradients(task.loss_from_outputs(outputs, batch).sum(), tracker)
    elif fisher == "true":
        for sample in range(num_samples):
            loss = task.sample_loss_from_outputs(outputs, batch, generator).sum()
            grads = layer_gradients(loss, tracker, retain_graph=sample < num_samples - 1)
            yield 1.0 / num_samples, 1.0 / num_samples, grads
    else:
        columns = task.output_hessian_sqrt(outputs, batch)
        for index, column in enumerate(columns):
            grads = layer_gradients(outputs, tracker, grad_output=column.to(outputs.dtype),
                                    retain_graph=index < len(columns) - 1)
            yield 1.0, 1.0 / len(columns), grads


def token_count(acts: Tensor, mask: Optional[Tensor]) -> float:
    """Real tokens in a layer's activations ``[B, T, d]`` (padding excluded when the mask applies)."""
    if mask is None or mask.shape[1] != acts.shape[1]:
        return float(acts.shape[0] * acts.shape[1])
    return float(mask.sum())


def layer_activations(tracker: LayerTracker) -> Sequence[Tuple[TrackedLayer, Tensor]]:
    """Each tracked layer's recorded activations ``[B, T, d_in]``, in float32 at least."""
    return [(layer, full_precision(tracker.activations(layer))) for layer in tracker.layers]
