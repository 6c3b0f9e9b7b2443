"""Workers of the sharded-curvature tests: plain ``torch.distributed`` (gloo) process groups started
with ``torch.multiprocessing.spawn``, each rank collecting statistics from its share of the training
batches through :class:`StepStatistics` and computing influence through :class:`InfluenceSession`.
Each worker saves what the test compares into ``<out>/rank<r>.pt``."""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Subset, TensorDataset

import lightning_influence as li
from lightning_influence.engine import distributed
from lightning_influence.engine.collector import StepStatistics
from lightning_influence.checkpoint.session import InfluenceSession
from tests.callback_models import merged_settings

BATCH = 8


def model_and_data():
    """Five layers of unequal sizes (ownership must balance them) and a fixed pool and query set."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 24), nn.Tanh(), nn.Linear(24, 24), nn.Tanh(), nn.Linear(24, 24), nn.Tanh(),
                          nn.Linear(24, 24), nn.Tanh(), nn.Linear(24, 4))
    generator = torch.Generator().manual_seed(1)
    inputs = torch.randn(64, 8, generator=generator)
    train = TensorDataset(inputs, torch.randint(0, 4, (64,), generator=generator))
    queries = Subset(TensorDataset(torch.randn(6, 8, generator=generator),
                                   torch.randint(0, 4, (6,), generator=generator)), range(6))
    return model, train, queries


def collect(model, train, rank: int = 0, world: int = 1, statistics_device=None) -> StepStatistics:
    """Statistics of the training batches ``i`` with ``i % world == rank`` (fixed weights: no step)."""
    statistics = StepStatistics(li.select_layers(model), li.ClassificationTask(), loss_reduction="mean",
                                statistics_device=statistics_device)
    statistics.attach()
    for index, batch in enumerate(DataLoader(train, batch_size=BATCH)):
        if index % world != rank:
            continue
        statistics.begin_batch(batch)
        loss = F.cross_entropy(model(batch[0]), batch[1])
        statistics.begin_backward()
        loss.backward()
        statistics.end_batch()
        statistics.commit()
    statistics.detach()
    model.zero_grad(set_to_none=True)
    return statistics


def session(train, queries, **settings) -> InfluenceSession:
    defaults = dict(curvature=dict(correction_batches=None), scoring=dict(batch_size=BATCH, top_k=2))
    return InfluenceSession(li.ClassificationTask(), train, queries, **merged_settings(defaults, settings))


def _init(rank: int, world: int, out: str) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{out}/rendezvous", rank=rank, world_size=world)


def fit_and_score(rank: int, world: int, out: str, variants) -> None:
    """Influence for each ``(fisher, shard_factors)`` of ``variants`` in the same process group; the
    sharded empirical result is written the way the callback writes it (every rank stages its
    factors, rank 0 writes)."""
    _init(rank, world, out)
    try:
        model, train, queries = model_and_data()
        statistics = collect(model, train, rank, world)
        saved = {}
        for fisher, shard in variants:
            run = session(train, queries, curvature=dict(fisher=fisher, shard_factors=shard))
            distributed.traffic.update(sent=0, received=0)
            stats = run.reduce_statistics(statistics)
            factors = run.fit_factors(model, stats, step=3, layers=statistics.layers)
            result = run.score(model, factors, step=3)
            saved[f"{fisher}_{'sharded' if shard else 'replicated'}"] = {
                "scores": result.scores, "top_ids": result.get("top_ids"), "held_bytes": factors.held_bytes(),
                "traffic": dict(distributed.traffic), "factors": factors.layers,
                "stats": {f"{n}/{k}": v for n, p in stats.state.items() for k, v in p.items()}}
            if shard and fisher == "empirical":
                path = Path(out) / "step=3"
                run.stage_factors(factors, path)
                if rank == 0:
                    run.write(result, factors, path)
                distributed.barrier()
        torch.save(saved, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def load_and_score(rank: int, world: int, out: str, saved: str) -> None:
    """Factors saved by another number of processes, loaded sharded (each rank its own layers)."""
    _init(rank, world, out)
    try:
        model, train, queries = model_and_data()
        factors = li.load_factors(saved, shard=True)
        run = session(train, queries, curvature=dict(fisher="empirical", shard_factors=True))
        result = run.score(model, factors, step=3)
        torch.save({"scores": result.scores, "held": sorted(factors.layers), "owners": factors.owners},
                   f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def spawn(worker, world: int, out: Path, *args) -> list:
    out.mkdir(parents=True, exist_ok=True)
    torch.multiprocessing.spawn(worker, args=(world, str(out), *args), nprocs=world, join=True)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(world)]
