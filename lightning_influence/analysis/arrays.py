"""Scores arrive as tensors, numpy arrays or lists: the analyses read them as one or the other."""

from __future__ import annotations

from typing import Sequence, Union

import numpy as np
import torch

ArrayLike = Union[torch.Tensor, np.ndarray, Sequence[float]]


def as_numpy(values: ArrayLike) -> np.ndarray:
    """Float64 numpy values, detached and on the CPU."""
    if isinstance(values, torch.Tensor):
        return values.detach().cpu().double().numpy()
    return np.asarray(values, dtype=np.float64)


def as_tensor(values: ArrayLike) -> torch.Tensor:
    """A CPU tensor, detached, in the values' own dtype."""
    if isinstance(values, torch.Tensor):
        return values.detach().cpu()
    return torch.as_tensor(np.asarray(values))
