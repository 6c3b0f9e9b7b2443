"""The candidate pool as the checkpoint procedure reads it: a map-style dataset's chosen indices,
or a stream read once, each process its share, every item known by a stable integer id."""

from __future__ import annotations

import itertools
import numbers
from collections.abc import Mapping
from typing import Any, Callable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, IterableDataset


class PoolStream(IterableDataset):
    """A streaming pool read once: its first ``limit`` items, of which every ``world``-th from
    ``rank`` (or, with ``wanted``, only the items with those ids), each without its id key, so that
    the task and the model see the item as it was. ``ids`` lists, in order, the ids of the items
    read by the current iteration (filled as the DataLoader fetches them in this process)."""

    def __init__(self, source: IterableDataset, id_key: str, limit: Optional[int], world: int = 1, rank: int = 0,
                 wanted: Optional[Tensor] = None) -> None:
        self.source, self.id_key, self.limit, self.world, self.rank = source, id_key, limit, world, rank
        self.wanted = set(wanted.tolist()) if wanted is not None else None
        self.ids: List[int] = []

    def __iter__(self):
        self.ids.clear()  # in place: callers hold this list to learn the ids after the pass
        for position, item in enumerate(itertools.islice(self.source, self.limit)):
            if position % self.world != self.rank:
                continue
            example_id = stable_id(item, self.id_key, position)
            if self.wanted is not None and example_id not in self.wanted:
                continue
            self.ids.append(example_id)
            yield {key: value for key, value in item.items() if key != self.id_key}

    def dataset_indices(self, positions: Sequence[int]) -> List[int]:
        """The ids of the items read at ``positions`` of the current iteration."""
        return [self.ids[position] for position in positions]


def stable_id(item: Any, key: str, position: int) -> int:
    """The integer id a streaming pool item carries under ``key``, or a ``ValueError`` saying what to change."""
    if not isinstance(item, Mapping):
        raise ValueError(f"item {position} of the streaming pool is a {type(item).__name__}, not a mapping: a "
                         f"streaming train_data must yield dicts with a stable integer id under {key!r}")
    if key not in item:
        raise ValueError(f"item {position} of the streaming pool has no {key!r} key (it has {sorted(map(str, item))}): "
                         "each item needs a stable integer id there (e.g. its row number in the source), or set "
                         "pool_id_key to the key that holds it")
    value = item[key]
    if isinstance(value, Tensor) and value.numel() == 1 and not value.is_floating_point() and not value.is_complex():
        value = value.item()
    if not isinstance(value, numbers.Integral) or isinstance(value, bool):
        raise ValueError(f"item {position} of the streaming pool has {key!r} = {value!r}; ids must be integers "
                         "(map string keys to integers, e.g. a row number kept with the data)")
    return int(value)


def choose_pool_ids(size: int, max_train_examples: Optional[int], seed: int) -> Tensor:
    """All pool indices, or a seeded random subset of ``max_train_examples`` of them, sorted."""
    if max_train_examples is None:
        return torch.arange(size)
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(size, generator=generator)[:max_train_examples].sort().values


def dataset_and_collate(data: Any, what: str) -> Tuple[Any, Optional[Callable]]:
    """A DataLoader's dataset and collate function, or a Dataset with no collate function of its own."""
    if isinstance(data, DataLoader):
        return data.dataset, data.collate_fn
    if isinstance(data, Dataset) or hasattr(data, "__getitem__"):
        return data, None
    raise TypeError(f"{what} must be a Dataset or DataLoader, got {type(data).__name__}")
