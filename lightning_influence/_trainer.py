"""What the callback reads from a Lightning Trainer, in one place.

Duck-typed, so both ``pytorch_lightning`` and ``lightning.pytorch`` Trainers work. Lightning's
private attributes are read only here: when a Lightning release renames one, this module is the
one to change.
"""

from __future__ import annotations

from typing import Any, List, NamedTuple, Optional, Sequence

from torch.utils.data import DataLoader, Dataset, Subset

# Strategies Lightning shards the model with: hooks would see shards, not layers.
SHARDED_STRATEGIES = ("FSDP", "DeepSpeed", "ModelParallel", "XLA")


def unsupported(trainer: Any, pl_module: Any) -> Optional[str]:
    """Why the callback cannot monitor this run (a message saying what to do), or ``None``."""
    strategy = type(trainer.strategy).__name__
    if any(tag.lower() in strategy.lower() for tag in SHARDED_STRATEGIES):
        return (f"InfluenceCallback does not support the {strategy} strategy (sharded parameters hide the "
                "layers' weights from the hooks); use a single device or DDP")
    if not getattr(pl_module, "automatic_optimization", True):
        return ("InfluenceCallback needs automatic optimization (the loss it rescales is the one Lightning "
                "back-propagates); manual optimization / multiple optimizers are not supported")
    if getattr(pl_module, "_compiler_ctx", None) or any(type(m).__name__ == "OptimizedModule"
                                                        for m in pl_module.modules()):
        return ("InfluenceCallback cannot track a torch.compile'd model (compiled graphs bypass the module "
                "hooks it records layers with); train without torch.compile while collecting influence")
    return None


def fitting(trainer: Any) -> bool:
    return getattr(trainer.state, "fn", None) == "fit"


def loss_scale(trainer: Any) -> float:
    """The AMP GradScaler's current scale (1 without one)."""
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    if scaler is None or not scaler.is_enabled():
        return 1.0
    return float(scaler.get_scale())


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
