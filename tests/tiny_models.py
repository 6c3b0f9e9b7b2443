"""Tiny models and data sets shared by the engine tests (float64 so exactness checks are tight)."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.utils.data import Dataset, TensorDataset


def mlp(d_in: int = 6, hidden: int = 8, d_out: int = 4) -> nn.Module:
    return nn.Sequential(nn.Linear(d_in, hidden), nn.Tanh(), nn.Linear(hidden, d_out)).double()


class TinyConvNet(nn.Module):
    def __init__(self, classes: int = 3) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 3, kernel_size=3, padding=1, stride=2)
        self.head = nn.Linear(3 * 3 * 3, classes)

    def forward(self, x):
        return self.head(torch.tanh(self.conv(x)).flatten(1))


class Conv1D(nn.Module):
    """Stand-in for Hugging Face GPT-2's ``Conv1D``: weight stored as ``[d_in, d_out]``."""

    def __init__(self, nf: int, nx: int) -> None:
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.3)
        self.bias = nn.Parameter(torch.randn(nf) * 0.1)

    def forward(self, x):
        return torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight).view(*x.shape[:-1], self.nf)


class TinyTransformer(nn.Module):
    """One pre-norm causal self-attention block plus an MLP, GPT-2 style (``Conv1D`` projections)."""

    def __init__(self, vocab: int = 5, width: int = 8, context: int = 6) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.pos = nn.Embedding(context, width)
        self.norm1 = nn.LayerNorm(width)
        self.qkv = Conv1D(3 * width, width)
        self.proj = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width)
        self.fc = nn.Linear(width, 2 * width)
        self.out = nn.Linear(2 * width, width)
        self.head = nn.Linear(width, vocab)
        self.width = width

    def forward(self, input_ids, attention_mask=None):
        steps = input_ids.shape[1]
        h = self.embed(input_ids) + self.pos(torch.arange(steps, device=input_ids.device))
        q, k, v = self.qkv(self.norm1(h)).split(self.width, dim=-1)
        logits = q @ k.transpose(1, 2) / math.sqrt(self.width)
        allowed = torch.ones(steps, steps, dtype=torch.bool, device=input_ids.device).tril()
        if attention_mask is not None:
            allowed = allowed & attention_mask.bool()[:, None, :]
        logits = logits.masked_fill(~allowed, -1e9)
        h = h + self.proj(torch.softmax(logits, -1) @ v)
        h = h + self.out(torch.tanh(self.fc(self.norm2(h))))
        return self.head(h)


def classification_data(n: int = 48, d_in: int = 6, classes: int = 4, seed: int = 0) -> TensorDataset:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d_in, generator=gen, dtype=torch.float64)
    y = torch.randint(0, classes, (n,), generator=gen)
    return TensorDataset(x, y)


def regression_data(n: int = 40, d_in: int = 4, d_out: int = 3, seed: int = 0) -> TensorDataset:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d_in, generator=gen, dtype=torch.float64)
    y = torch.randn(n, d_out, generator=gen, dtype=torch.float64)
    return TensorDataset(x, y)


def image_data(n: int = 32, classes: int = 3, seed: int = 0) -> TensorDataset:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 6, 6, generator=gen, dtype=torch.float64)
    y = torch.randint(0, classes, (n,), generator=gen)
    return TensorDataset(x, y)


class TokenData(Dataset):
    """Random token sequences with right padding (``attention_mask``) and Hugging Face-style labels."""

    def __init__(self, n: int = 16, length: int = 6, vocab: int = 5, seed: int = 0, pad: bool = True) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.input_ids = torch.randint(0, vocab, (n, length), generator=gen)
        lengths = torch.randint(length // 2, length + 1, (n,), generator=gen) if pad else torch.full((n,), length)
        self.attention_mask = (torch.arange(length)[None, :] < lengths[:, None]).long()
        self.input_ids = self.input_ids.masked_fill(self.attention_mask == 0, 0)

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, index):
        ids = self.input_ids[index]
        return {"input_ids": ids, "attention_mask": self.attention_mask[index], "labels": ids.clone()}


def train_recorded(statistics, batches, loss_of, optimizer) -> None:
    """Train on ``batches`` with ``statistics`` (a ``StepStatistics``) recording every optimizer step,
    as a user's own loop drives it: ``loss_of(batch)`` is the training loss of one batch."""
    for batch in batches:
        statistics.begin_batch(batch)
        loss = loss_of(batch)
        statistics.begin_backward()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        statistics.end_batch()
        statistics.commit()
