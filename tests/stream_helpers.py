"""A streaming pool for the tests: the planted blobs as an ``IterableDataset`` of dicts with a
stable id, in an order of its own (so that ids, not positions, must identify examples)."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn
from torch.utils.data import Dataset, IterableDataset

import lightning_influence as li
from lightning_influence.engine.curvature_passes import accumulate_covariances
from tests.callback_models import planted_data

ID_OFFSET = 1000  # stream ids are not positions: example i carries id 1000 + i


class DictExamples(Dataset):
    """The planted training blobs as ``{"x", "y"}`` dicts (what the stream yields, less the id)."""

    def __init__(self) -> None:
        self.x, self.y = planted_data()[0].tensors

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, index: int):
        return {"x": self.x[index], "y": self.y[index]}


class BlobStream(IterableDataset):
    """The same examples, streamed in reverse order with ``"id": 1000 + index``; counts the items
    its iterations handed out (``yielded``). ``id_key=None`` leaves the id out."""

    def __init__(self, id_key: Optional[str] = "id", id_of=lambda index: ID_OFFSET + index) -> None:
        self.examples, self.id_key, self.id_of = DictExamples(), id_key, id_of
        self.yielded = 0

    def __iter__(self):
        for index in reversed(range(len(self.examples))):
            self.yielded += 1
            item = dict(self.examples[index])
            if self.id_key is not None:
                item[self.id_key] = self.id_of(index)
            yield item


def trained_blob_model() -> nn.Module:
    """The blob classifier after a few full-batch steps (deterministic)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 16), nn.Tanh(), nn.Linear(16, 3))
    x, y = planted_data()[0].tensors
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(20):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    return model


def blob_statistics(model: nn.Module):
    """Empirical-Fisher covariances of the whole pool (what training steps would have collected)."""
    return accumulate_covariances(model, li.ClassificationTask(), DictExamples(), li.select_layers(model),
                                  fisher="empirical", batch_size=16)
