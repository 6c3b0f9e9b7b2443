"""Curvature sharded across processes: each layer's statistics, eigenbases and preconditioned
queries belong to one owning rank (``curvature.shard_factors=True`` under DDP), so that per-process factor
memory is about ``1/world`` of the total plus the largest layer.

Per checkpoint, with ``W`` processes and layers balanced by :func:`distributed.assign_owners`:

1. statistics: each layer's sums are reduced onto its owner (``dist.reduce``, one layer at a
   time), counts of every layer are all-reduced (a few numbers);
2. eigendecomposition: by the owner, of its layers only;
3. eigenvalue correction: the owner runs the correction pass for its layers over every process's
   share of the correction examples, each share with the seed that process would use unsharded.
   No basis ever leaves its owner (zero traffic), at the price of ``W`` times the correction
   pass's compute per process (the pass is bounded: ``correction_batches``);
4. queries: every process computes the query gradients; owners precondition (and truncate) their
   layers' and broadcast them, so each process scores its share of the pool against all layers.

Every process runs every pass of steps 3 and 4, over the same batches, and differentiates each
w.r.t. the outputs of every tracked layer (keeping its own layers' results), even one that owns no
layer: under FSDP each forward and backward gathers weights with collectives, and processes whose
backward passes reached different layers would pair mismatched collectives (an abort under gloo,
a hang under NCCL).
   Traffic per process: the preconditioned queries, ``Q·Σ_ℓ d_out·d_in`` dense or
   ``Q·r·Σ_ℓ (d_in + d_out)`` at rank r.

Plain PyTorch (``torch.distributed``); every function is collective.
"""

from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from lightning_influence.engine import distributed
from lightning_influence.engine import freshness
from lightning_influence.engine import passes
from lightning_influence.engine.approximations import approximation, approximation_names
from lightning_influence.engine.curvature_passes import _warn_left_out, curvature_at_checkpoint
from lightning_influence.engine.factors import Factors
from lightning_influence.engine.fitting import factors_from_statistics
from lightning_influence.engine.statistics import CovarianceStatistics
from lightning_influence.engine.queries import PreconditionedQueries, precondition_queries
from lightning_influence.tasks import Task
from lightning_influence.engine.tracking import TrackedLayer, layers_by_name

def check_can_shard(strategy: str, needs: str = "sharded factors need", hint: str = "") -> None:
    """Raise unless the approximation ``strategy`` may spread its layers over processes."""
    if not approximation(strategy).can_shard:
        able = " or ".join(repr(name) for name in approximation_names() if approximation(name).can_shard)
        raise ValueError(f"{needs} strategy {able}, got {strategy!r}{hint}")


def owners_of(layers: Sequence[TrackedLayer]) -> Dict[str, int]:
    """The owning rank of each layer for the current process group."""
    return distributed.assign_owners({layer.name: distributed.factor_cost(layer.d_out, layer.d_in) for layer in layers})


def reduce_to_owners(local: CovarianceStatistics, layers: Sequence[TrackedLayer],
                     held_by_owners: bool = False) -> CovarianceStatistics:
    """Every process's sums of each layer, on the layer's owner only (collective). The local sums
    are left as they are (moving averages keep going). ``held_by_owners``: each process's ``local``
    holds only its own layers (statistics collected sharded), which are then its totals. Raises, on
    every process alike, when a layer has no statistics at all."""
    owners = owners_of(layers)
    device = _device_of(local)
    none = torch.zeros((), dtype=torch.float64, device=device)
    counts = torch.stack([local.state[layer.name][key].double().to(device) if layer.name in local.state else none
                          for layer in layers for key in ("a_count", "s_count")])
    distributed.all_reduce_sum_([counts])
    if bool((counts == 0).any()):
        raise RuntimeError("no statistics were collected for some tracked layers; influence cannot be computed yet")
    mine = [layer for layer in layers if owners[layer.name] == distributed.rank()]
    dtype = next((parts["a_sum"].dtype for parts in local.state.values()), torch.float32)
    out = CovarianceStatistics(mine, dtype=dtype, device=device)
    for position, layer in enumerate(layers):
        parts = local.state.get(layer.name)
        if held_by_owners:
            summed = [parts["a_sum"], parts["s_sum"]] if owners[layer.name] == distributed.rank() else []
        else:
            summed = distributed.reduce_to_owner([parts["a_sum"], parts["s_sum"]], owners[layer.name])
        if summed:
            target = out.state[layer.name]
            target["a_sum"].copy_(summed[0])
            target["s_sum"].copy_(summed[1])
            target["a_count"].fill_(float(counts[2 * position]))
            target["s_count"].fill_(float(counts[2 * position + 1]))
    return out


def _device_of(stats: CovarianceStatistics) -> torch.device:
    return next((parts["a_sum"].device for parts in stats.state.values()), torch.device("cpu"))


def fit_sharded_factors(model: nn.Module, task: Task, statistics: CovarianceStatistics,
                        layers: Sequence[TrackedLayer], shares: Sequence[Any], seeds: Sequence[int], *,
                        strategy: str, fisher: str, batch_size: int, eigenbasis_dtype: torch.dtype = torch.float64,
                        show_progress: bool = False, refresh: str = "never") -> Factors:
    """This process's layers of the factors (collective): ``statistics`` are its layers' totals
    (:func:`reduce_to_owners`); ``shares[r]`` and ``seeds[r]`` are the correction examples and
    sampling seed of process ``r`` in the unsharded computation, which this reproduces, refreshing
    stale layers as :func:`~lightning_influence.engine.curvature_passes.curvature_at_checkpoint` does."""
    check_can_shard(strategy, hint="; set shard_factors=False")
    owners = owners_of(layers)
    mine = layers_by_name(model, list(statistics.state))
    left_out: List[int] = []
    bases, correction, curvature = curvature_at_checkpoint(  # seed + 1: as fit_factors seeds its correction pass
        model, task, [(share, seed + 1) for share, seed in zip(shares, seeds)], mine, statistics,
        strategy=strategy, refresh=refresh, eigenbasis_dtype=eigenbasis_dtype, reduce=None,
        any_process=distributed.any_process, reach=layers, fisher=fisher, batch_size=batch_size,
        show_progress=show_progress, left_out=left_out)
    _warn_left_out(left_out)
    nonfinite, tokens_seen, measured, refreshed = set(), {}, {}, []
    for positions, tokens, report in distributed.gather_objects(
            (sorted(set(left_out)), curvature.pop("tokens_seen", None) or {
                name: float(parts["a_count"]) for name, parts in statistics.state.items()}, curvature)):
        nonfinite.update(positions)
        tokens_seen.update(tokens)
        measured.update(report.get("per_layer", {}))
        refreshed.extend(report.get("refreshed_layers", []))
    meta = {"fisher": fisher, "num_samples": 1, "layers": [layer.name for layer in layers],
            "nonfinite_examples": len(nonfinite), "tokens_seen": {n.name: tokens_seen[n.name] for n in layers},
            "sharded": {"world_size": distributed.world_size()}}
    if measured:
        meta["curvature"] = freshness.staleness_report({n.name: measured[n.name] for n in layers if n.name in measured},
                                                       refreshed, refresh)
    local = factors_from_statistics(strategy, mine, bases, correction, meta)
    summaries: Dict[str, Tuple[float, int, float]] = {}
    for gathered in distributed.gather_objects({n: local.eigenvalue_summary(n) for n in local.layers}):
        summaries.update(gathered)
    return Factors(strategy, local.layers, meta, owners, summaries)


def precondition_sharded_queries(model: nn.Module, task: Task, query_data: Any, factors: Factors,
                                 layers: Sequence[TrackedLayer], damping: Mapping[str, float],
                                 query_rank: Optional[int] = None, batch_size: int = 32,
                                 show_progress: bool = False) -> Tuple[PreconditionedQueries, Tensor]:
    """What :func:`~lightning_influence.engine.scoring.precondition_queries` returns, on every process,
    from sharded factors: owners precondition their layers, then broadcast them (collective)."""
    here = distributed.rank()
    mine = [layer for layer in layers if factors.owners[layer.name] == here]
    device = passes.model_device(model)
    local, bad = precondition_queries(model, task, query_data, factors, mine, damping, query_rank,
                                      batch_size, show_progress, reach=layers)
    unusable = bad.to(device, torch.float32)
    distributed.all_reduce_sum_([unusable])
    bad = unusable > 0
    described = {}
    for gathered in distributed.gather_objects({
            name: ([(tuple(t.shape), str(t.dtype).replace("torch.", "")) for t in _parts(local, name)],
                   name in local.dense and local.rows_transposed(name))
            for name in (layer.name for layer in mine)}):
        described.update(gathered)
    dense: Dict[str, Tensor] = {}
    low_rank: Dict[str, Tuple[Tensor, ...]] = {}
    for layer in layers:
        specs, transposed = described[layer.name]
        parts = _parts(local, layer.name) if factors.owners[layer.name] == here else [
            torch.empty(shape, dtype=getattr(torch, dtype), device=device) for shape, dtype in specs]
        distributed.broadcast_from(parts, factors.owners[layer.name])
        for part in parts:
            part.masked_fill_(bad[:, None, None], 0.0)
        if len(parts) == 1:
            dense[layer.name] = parts[0].transpose(1, 2) if transposed else parts[0]
        else:
            low_rank[layer.name] = tuple(parts)
    return PreconditionedQueries(dense, query_rank, low_rank), bad


def _parts(queries: PreconditionedQueries, name: str) -> List[Tensor]:
    """The contiguous tensors that carry layer ``name``'s queries (dense ones stored transposed travel
    as their contiguous transpose: collectives send contiguous memory)."""
    if name not in queries.dense:
        return list(queries.low_rank[name])
    dense = queries.dense[name]
    return [dense.transpose(1, 2) if queries.rows_transposed(name) else dense]
