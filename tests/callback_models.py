"""Tiny Lightning modules and data for the callback tests (CPU, seconds per run).

Works for both Lightning packages: :func:`classifier_module` builds the LightningModule class over
the given package's ``LightningModule``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

NUM_CLASSES = 3
SETTINGS_GROUPS = ("curvature", "scoring", "report")
CENTRES = torch.tensor([[2.0, 0.0], [-1.0, 1.7], [-1.0, -1.7]])


def blobs(n: int, seed: int, noise: float = 0.6):
    """Three Gaussian blobs in 2-D, labelled by blob."""
    gen = torch.Generator().manual_seed(seed)
    y = torch.randint(0, NUM_CLASSES, (n,), generator=gen)
    x = CENTRES[y] + noise * torch.randn(n, 2, generator=gen)
    return x, y


def planted_data(n_train: int = 96, n_val: int = 16, seed: int = 0):
    """Training and validation sets where validation example 0 sits in blob 0 with the unusual
    label 2, and training example ``planted`` is a near-copy of it with the same label."""
    x, y = blobs(n_train, seed)
    xv, yv = blobs(n_val, seed + 1)
    xv[0], yv[0] = CENTRES[0] + torch.tensor([0.3, 0.2]), 2
    planted = n_train // 2
    x[planted], y[planted] = xv[0] + 0.01, 2
    return TensorDataset(x, y), TensorDataset(xv, yv), planted


def merged_settings(defaults: dict, overrides: dict) -> dict:
    """``defaults`` updated by ``overrides``, a settings group given as a dict on both sides merged
    field by field (``curvature={"fisher": "true"}`` keeps the defaults' other curvature fields)."""
    merged = {**defaults, **overrides}
    for group in SETTINGS_GROUPS:
        if isinstance(defaults.get(group), dict) and isinstance(overrides.get(group), dict):
            merged[group] = {**defaults[group], **overrides[group]}
    return merged


def make_module_class(pl):
    """A LightningModule class for ``pl`` (``pytorch_lightning`` or ``lightning.pytorch``)."""

    class Classifier(pl.LightningModule):
        def __init__(self, hidden: int = 16, dropout: float = 0.0, lr: float = 0.1, call_self: bool = True):
            super().__init__()
            layers = [nn.Linear(2, hidden), nn.Tanh()]
            if dropout:
                layers.append(nn.Dropout(dropout))
            layers.append(nn.Linear(hidden, NUM_CLASSES))
            self.net = nn.Sequential(*layers)
            self.lr = lr
            self.call_self = call_self

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            x, y = batch
            logits = self(x) if self.call_self else self.net(x)
            return F.cross_entropy(logits, y)

        def validation_step(self, batch, batch_idx):
            x, y = batch
            self.log("val_loss", F.cross_entropy(self(x), y))

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.5)

    return Classifier


def make_datamodule_class(pl):
    class BlobData(pl.LightningDataModule):
        def __init__(self, train, val, batch_size: int = 16, shuffle: bool = True):
            super().__init__()
            self.train, self.val, self.batch_size, self.shuffle = train, val, batch_size, shuffle

        def train_dataloader(self):
            return DataLoader(self.train, batch_size=self.batch_size, shuffle=self.shuffle)

        def val_dataloader(self):
            return DataLoader(self.val, batch_size=self.batch_size)

    return BlobData
