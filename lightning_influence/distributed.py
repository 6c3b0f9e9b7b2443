"""The few collectives the callback needs, on plain ``torch.distributed`` (whatever started it).

Statistics are always reduced as sums and counts, never as means, so any split of the examples
across processes gives the same totals. Every function here is a no-op in a single process and
must be called on every rank when a process group is running.
"""

from __future__ import annotations

from typing import Any, List, Sequence

import torch
import torch.distributed as dist
from torch import Tensor


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def all_reduce_sum_(tensors: Sequence[Tensor]) -> None:
    """In-place sum over processes; one flat buffer per dtype keeps the number of calls small."""
    if world_size() == 1:
        return
    by_dtype = {}
    for tensor in tensors:
        by_dtype.setdefault(tensor.dtype, []).append(tensor)
    for group in by_dtype.values():
        flat = torch.cat([t.reshape(-1) for t in group])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        offset = 0
        for tensor in group:
            tensor.copy_(flat[offset:offset + tensor.numel()].view_as(tensor))
            offset += tensor.numel()


def split_range(total: int) -> range:
    """This rank's contiguous share of ``range(total)`` (sizes differ by at most one)."""
    size, here = world_size(), rank()
    base, extra = divmod(total, size)
    start = here * base + min(here, extra)
    return range(start, start + base + (1 if here < extra else 0))


def gather_last_dim(local: Tensor, total: int) -> Tensor:
    """Concatenate every rank's ``local [..., n_r]`` (the shares of :func:`split_range`) along the
    last dimension. Shares are padded to equal length for ``all_gather`` and the padding dropped."""
    if world_size() == 1:
        return local
    size = world_size()
    longest = -(-total // size)
    padded = torch.zeros(*local.shape[:-1], longest, dtype=local.dtype, device=local.device)
    padded[..., :local.shape[-1]] = local
    pieces: List[Tensor] = [torch.empty_like(padded) for _ in range(size)]
    dist.all_gather(pieces, padded.contiguous())
    base, extra = divmod(total, size)
    return torch.cat([piece[..., :base + (1 if r < extra else 0)] for r, piece in enumerate(pieces)], dim=-1)


def gather_objects(value: Any) -> List[Any]:
    """Every rank's ``value`` (e.g. tensors whose size differs between ranks), in rank order; held in
    memory only, never written."""
    if world_size() == 1:
        return [value]
    gathered: List[Any] = [None] * world_size()
    dist.all_gather_object(gathered, value)
    return gathered
