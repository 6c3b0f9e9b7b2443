"""What the callback reads from a Lightning Trainer, in one place.

Duck-typed, so both ``pytorch_lightning`` and ``lightning.pytorch`` Trainers work. Lightning's
private attributes are read only here: when a Lightning release renames one, this module is the
one to change.
"""

from __future__ import annotations

from typing import Any, List, NamedTuple, Optional, Sequence, Tuple

import torch
from torch.utils.data import DataLoader, Dataset, Subset

from lightning_influence.engine import passes
from lightning_influence.engine.collector import scaler_scale

def unsupported(trainer: Any, pl_module: Any) -> Optional[str]:
    """Why the callback cannot monitor this run (a message saying what to do), or ``None``.

    Sharded strategies are supported where the hooks see whole layers: FSDP (``strategy="fsdp"``) and
    ``ModelParallelStrategy`` (FSDP2 ``fully_shard``) gather each layer's weight for its forward and
    backward, so the hooks see full activations and output gradients, and the statistics never read
    a weight. DeepSpeed ZeRO stages 1 and 2 shard optimizer state and gradients, not parameters: as DDP."""
    strategy = trainer.strategy
    name = type(strategy).__name__
    if "xla" in name.lower():
        return (f"InfluenceCallback does not support the {name} strategy (TPU; not tested); use GPUs or CPUs, "
                "with DDP, FSDP (strategy='fsdp') or ModelParallelStrategy (FSDP2)")
    if "deepspeed" in name.lower():
        return _deepspeed_problem(strategy, trainer)
    return None


def _deepspeed_problem(strategy: Any, trainer: Any) -> Optional[str]:
    """DeepSpeed runs the callback supports: ZeRO stages 0-2, without what DeepSpeed's engine does to
    the loss behind Lightning's back (fp16 loss scaling, division for gradient accumulation), which
    would rescale every gradient the statistics see."""
    config = getattr(strategy, "config", None) or {}
    stage = (config.get("zero_optimization") or {}).get("stage", 0)
    if stage == 3:
        return ("InfluenceCallback does not support DeepSpeed ZeRO stage 3: it partitions the parameters "
                "themselves, outside PyTorch's module hooks. Shard with FSDP instead (strategy='fsdp', or "
                "ModelParallelStrategy with fully_shard), which the callback supports, or use ZeRO stage 1 or 2")
    fp16 = str(trainer.precision_plugin.precision).startswith("16") or (config.get("fp16") or {}).get("enabled")
    if fp16:
        return ("InfluenceCallback does not support DeepSpeed with fp16: DeepSpeed scales the loss with its own "
                "dynamic loss scale, which the callback cannot see and which would rescale the curvature statistics; "
                "train with precision='bf16-mixed' or '32-true'")
    if trainer.accumulate_grad_batches > 1:
        return ("InfluenceCallback does not support DeepSpeed with accumulate_grad_batches > 1: DeepSpeed's engine "
                "divides the loss by its gradient_accumulation_steps on top of Lightning's division, which the "
                "statistics cannot see; "
                "accumulate with DDP or FSDP instead, or set accumulate_grad_batches=1")
    return None


def influence_model(trainer: Any, pl_module: Any) -> Any:
    """The module the callback's own passes run: the LightningModule, or under FSDP1
    (``strategy="fsdp"``) the ``FullyShardedDataParallel`` wrapper around it, whose forward gathers
    the parameters the LightningModule holds outside its wrapped submodules. (FSDP2's hooks sit on the
    sharded modules themselves.)"""
    if not torch.distributed.is_available():  # a PyTorch build without FSDP
        return pl_module
    from torch.distributed.fsdp import FullyShardedDataParallel

    wrapper = getattr(trainer.strategy, "model", None)
    if isinstance(wrapper, FullyShardedDataParallel) and wrapper.module is pl_module:
        return wrapper
    return pl_module


def unsupported_training(trainer: Any, pl_module: Any, tracked: Sequence[Any]) -> Optional[str]:
    """Why the training of the ``tracked`` modules cannot be monitored, or ``None``; known once the
    optimizers exist (``on_fit_start``). Manual optimisation is monitored like automatic
    optimisation when each training step runs one backward pass for one optimizer (several
    backward passes are refused at the first step that runs them)."""
    optimizers = len(trainer.optimizers)
    if not getattr(pl_module, "automatic_optimization", True) and optimizers > 1:
        return (f"InfluenceCallback supports manual optimization with one optimizer; configure_optimizers returned "
                f"{optimizers}. The curvature statistics belong to one loss and one set of parameters: train with "
                "one optimizer (several parameter groups are fine) while collecting influence")
    return _compile_problem(compiled_contexts(pl_module, tracked), trainer.strategy.root_device.type)


def compiled_contexts(pl_module: Any, tracked: Sequence[Any]) -> List[Tuple[str, Any]]:
    """``(where, torch.compile context)`` for every compiled region holding a ``tracked`` module:
    the LightningModule compiled as a whole (what ``trainer.fit(torch.compile(model))`` makes of
    it: Lightning's ``from_compiled``) or a compiled submodule."""
    found = []
    lightning_ctx = getattr(pl_module, "_compiler_ctx", None)
    if lightning_ctx:
        found.append(("the LightningModule", lightning_ctx.get("dynamo_ctx")))
    tracked_ids = {id(module) for module in tracked}
    found += [(f"submodule {name!r}", getattr(module, "dynamo_ctx", None)) for name, module in pl_module.named_modules()
              if type(module).__name__ == "OptimizedModule" and any(id(m) in tracked_ids for m in module.modules())]
    return found


def _compile_problem(contexts: Sequence[Tuple[str, Any]], device_type: str) -> Optional[str]:
    """Compilation modes the callback cannot monitor. Its hooks run eagerly at every tracked layer
    (``torch.compiler.disable``): a graph break, which ``fullgraph=True`` forbids."""
    for where, ctx in contexts:
        if getattr(ctx, "fullgraph", False):
            return (f"InfluenceCallback cannot monitor {where}, compiled with torch.compile(fullgraph=True): its "
                    "hooks run eagerly at every tracked layer, a graph break that fullgraph=True forbids; compile "
                    "without fullgraph=True (the code between tracked layers stays compiled)")
        if device_type == "cuda" and (getattr(ctx, "compiler_config", None) or {}).get("triton.cudagraphs"):
            return (f"InfluenceCallback cannot monitor {where}, compiled with CUDA graphs (torch.compile "
                    "mode='reduce-overhead' or 'max-autotune'): its hooks keep layer inputs from the forward to the "
                    "backward pass, and CUDA graph replays reuse static memory (not verified to be safe); compile "
                    "with mode='default' or 'max-autotune-no-cudagraphs'")
    return None


def fitting(trainer: Any) -> bool:
    return getattr(trainer.state, "fn", None) == "fit"


def loss_scale(trainer: Any) -> float:
    """The AMP GradScaler's current scale (1 without one)."""
    return scaler_scale(trainer.precision_plugin)


def _source_loader(source: Any) -> Any:
    """The DataLoader behind one of the trainer's data sources (a DataModule or LightningModule
    hook, or the object passed to ``fit``)."""
    return source.dataloader() if source.instance is not None else None


def train_loader(trainer: Any) -> Any:
    """The training DataLoader the trainer was given (``None`` when it cannot be found)."""
    return _source_loader(trainer.fit_loop._data_source)


def eval_loader(trainer: Any, split: str) -> Optional[DataLoader]:
    """The first validation (``"val"``) or test DataLoader, or ``None``."""
    loop = trainer.fit_loop.epoch_loop.val_loop if split == "val" else trainer.test_loop
    source = loop._data_source
    loader = _source_loader(source) if source.is_defined() else None
    if isinstance(loader, (list, tuple)) and loader:
        loader = loader[0]
    return loader if isinstance(loader, DataLoader) else None


def checkpoints_saved_at(trainer: Any, step: int) -> List[str]:
    """Paths of the checkpoints the trainer's ModelCheckpoint callbacks last saved at ``step``."""
    return [str(path) for cb in trainer.checkpoint_callbacks
            if getattr(cb, "_last_global_step_saved", None) == step
            for path in [getattr(cb, "_last_checkpoint_saved", "")] if path]


def total_steps(trainer: Any) -> Optional[int]:
    """The run's optimizer steps when Lightning can tell (not for iterable data of unknown length)."""
    try:
        total = trainer.estimated_stepping_batches
    except Exception:  # noqa: BLE001 - unknown length: nothing to say
        return None
    return total if isinstance(total, int) else None


def steps_per_epoch(trainer: Any) -> Optional[int]:
    batches = trainer.num_training_batches
    if not isinstance(batches, int) or batches <= 0:
        return None
    return max(1, batches // trainer.accumulate_grad_batches)


class InfluenceData(NamedTuple):
    train: Any  # the candidate pool: a Dataset or DataLoader
    queries: Any  # the queries: a Dataset or DataLoader
    query_ids: Optional[Sequence[int]]  # their indices in query_dataset (None: 0..Q-1)
    query_dataset: Any  # what query ids index (for showing queries)
    note: Optional[str]  # something the user should hear about


def influence_data(trainer: Any, train_data: Any, query_data: Any, num_queries: int) -> InfluenceData:
    """The pool and queries a configuration names, found in the trainer's own data where it says
    so (``train_data=None``, ``query_data="val"`` / ``"test"``); fails naming what to pass instead."""
    train = train_data if train_data is not None else train_loader(trainer)
    if not isinstance(train, (Dataset, DataLoader)) and not hasattr(train, "__getitem__"):
        raise ValueError("cannot find the training dataset (the trainer's training data is not a single "
                         "DataLoader); pass train_data=<Dataset or DataLoader>")
    if not isinstance(query_data, str):
        dataset = query_data.dataset if isinstance(query_data, DataLoader) else query_data
        return InfluenceData(train, query_data, None, dataset, None)
    loader = eval_loader(trainer, query_data)
    if loader is None:
        raise ValueError(f"query_data={query_data!r} but the trainer has no {query_data} DataLoader; "
                         "pass query_data=<Dataset or DataLoader>")
    dataset = loader.dataset
    if not hasattr(dataset, "__len__"):
        raise ValueError(f"the {query_data} dataset has no __len__; pass query_data=<map-style Dataset>")
    count = min(num_queries, len(dataset))
    note = None
    if count < num_queries:
        note = (f"num_queries={num_queries} but the {query_data} dataset holds {len(dataset)} examples; "
                f"using all {count} as queries")
    queries = DataLoader(Subset(dataset, range(count)), collate_fn=loader.collate_fn)
    return InfluenceData(train, queries, range(count), dataset, note)


def autocast_dtype(trainer: Any) -> Optional[torch.dtype]:
    """The autocast dtype of the trainer's training steps (``precision="bf16-mixed"`` /
    ``"16-mixed"``), or ``None``."""
    return passes.autocast_dtype(trainer.precision)
