"""The few collectives the callback needs, on plain ``torch.distributed`` (whatever started it).

Statistics are always reduced as sums and counts, never as means, so any split of the examples
across processes gives the same totals. Every function here is a no-op in a single process and
must be called on every rank when a process group is running.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

# Bytes this process sent and received through the reductions and broadcasts below (an all-reduce
# counted as a ring all-reduce moves them): what the sharding benchmark reports; nothing depends on it.
traffic = {"sent": 0, "received": 0}


def _count(sent: int = 0, received: int = 0) -> None:
    traffic["sent"] += sent
    traffic["received"] += received


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
        flat = flat.to(_wire_device(flat))
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        ring = flat.numel() * flat.element_size() * 2 * (world_size() - 1) // world_size()
        _count(sent=ring, received=ring)  # what a ring all-reduce moves per process
        offset = 0
        for tensor in group:
            tensor.copy_(flat[offset:offset + tensor.numel()].view_as(tensor))
            offset += tensor.numel()


def split_range(total: int, for_rank: Optional[int] = None) -> range:
    """This rank's (or ``for_rank``'s) contiguous share of ``range(total)`` (sizes differ by at most one)."""
    size, here = world_size(), rank() if for_rank is None else for_rank
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


# -- curvature sharded across processes ---------------------------------------------------------------
def _wire_device(tensor: Tensor) -> torch.device:
    """Where a collective can take ``tensor``: NCCL only moves GPU tensors, so statistics kept on the
    CPU (``statistics_device="cpu"``) travel through the current GPU under NCCL."""
    if tensor.device.type == "cpu" and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return tensor.device


def reduce_to_owner(tensors: Sequence[Tensor], owner: int) -> List[Tensor]:
    """The sums over processes of ``tensors``, returned on ``owner`` (an empty list elsewhere); the
    inputs are left as they are. One flat buffer per call: the caller passes one layer at a time, so
    no process ever holds more than that layer twice."""
    if world_size() == 1:
        return [t.clone() for t in tensors]
    device, dtype = _wire_device(tensors[0]), tensors[0].dtype
    flat = torch.cat([t.reshape(-1).to(device, dtype) for t in tensors])
    dist.reduce(flat, dst=owner, op=dist.ReduceOp.SUM)
    nbytes = flat.numel() * flat.element_size()
    if rank() != owner:
        _count(sent=nbytes)
        return []
    _count(received=nbytes * (world_size() - 1))
    out, offset = [], 0
    for t in tensors:
        out.append(flat[offset:offset + t.numel()].view_as(t).to(t.device).clone())
        offset += t.numel()
    return out


def broadcast_from(tensors: Sequence[Tensor], owner: int) -> None:
    """In place: every process's ``tensors`` (same shapes and dtypes everywhere) become ``owner``'s."""
    if world_size() == 1:
        return
    for tensor in tensors:
        wire = tensor if _wire_device(tensor) == tensor.device else tensor.to(_wire_device(tensor))
        dist.broadcast(wire, src=owner)
        if wire is not tensor:
            tensor.copy_(wire)
        nbytes = tensor.numel() * tensor.element_size()
        _count(sent=nbytes * (world_size() - 1)) if rank() == owner else _count(received=nbytes)


def any_process(flag: bool) -> bool:
    """Whether ``flag`` holds on some process (collective): a decision every process then takes alike."""
    if world_size() == 1:
        return flag
    vote = torch.tensor([float(flag)])
    vote = vote.to(_wire_device(vote))
    dist.all_reduce(vote, op=dist.ReduceOp.MAX)
    return bool(vote.item())


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def assign_owners(costs: Dict[str, int], size: Optional[int] = None) -> Dict[str, int]:
    """Layer -> owning rank, balanced greedily: largest cost first, each onto the least-loaded rank
    (the lowest on ties). Deterministic, so every process (and any later loader) computes the same
    assignment from the same costs. Per-rank load is at most ``total / size + the largest cost``."""
    size = world_size() if size is None else size
    load = [0] * size
    owners: Dict[str, int] = {}
    for position, name in sorted(enumerate(costs), key=lambda item: (-costs[item[1]], item[0])):
        owner = min(range(size), key=lambda r: (load[r], r))
        owners[name] = owner
        load[owner] += costs[name]
    return {name: owners[name] for name in costs}


def factor_cost(d_out: int, d_in: int) -> int:
    """Elements of one layer's EK-FAC factors (``q_a``, ``q_s``, eigenvalues): what ownership balances."""
    return d_in * d_in + d_out * d_out + d_out * d_in
