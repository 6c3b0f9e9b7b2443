"""A plain PyTorch training loop with StepStatistics and InfluenceSession, in one process or sharded
over gloo processes (FSDP2 ``fully_shard`` or FSDP1 ``FullyShardedDataParallel``), for
``tests/engine/test_fsdp.py``. Each process trains on its share of every batch (the same examples make up
each optimizer step in every mode), so the runs agree up to floating-point summation order.

A module of its own: ``torch.multiprocessing.spawn`` imports the worker by name in each process.
"""

from __future__ import annotations

import datetime
import os
import socket
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, Subset

import lightning_influence as li
from lightning_influence.engine import distributed
from lightning_influence.engine.sharding import reduce_to_owners
from lightning_influence.engine.collector import StepStatistics
from lightning_influence.checkpoint.session import InfluenceSession
from tests import tiny_models
from tests.callback_models import planted_data

TRAIN = 97  # scored and read by the correction pass: 49 and 48 per process, 4 and 3 batches of 16
BATCH = 16
ONE_EXAMPLE = 48  # the planted example: a pool of one leaves the second process without any


class Conv1D(tiny_models.Conv1D):
    """The GPT-2 ``Conv1D`` stand-in with the input size ``nx`` that Hugging Face's keeps (importing
    transformers in every spawned process would cost seconds)."""

    def __init__(self, nf: int, nx: int) -> None:
        super().__init__(nf, nx)
        self.nx = nx


class IndexedStream(IterableDataset):
    """Examples ``(x, y)`` as a streaming pool: ``{"x", "y", "id"}`` dicts, the id their index."""

    def __init__(self, examples) -> None:
        self.examples = examples

    def __iter__(self):
        for index in range(len(self.examples)):
            x, y = self.examples[index]
            yield {"x": x, "y": y, "id": index}


def make_model() -> nn.Module:
    """Linear layers and a GPT-2 ``Conv1D`` (FSDP2 turns it into a subclass ``FSDPConv1D``)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(2, 16), nn.Tanh(), Conv1D(16, 16), nn.Tanh(), nn.Linear(16, 3))


def shard(model: nn.Module, sharding: str) -> nn.Module:
    """Shard every layer and the root: FSDP2 in place, FSDP1 as wrappers (returns the root wrapper,
    whose forward gathers the parameters: the module to run)."""
    if sharding == "fully_shard":
        from torch.distributed.fsdp import fully_shard

        for layer in model:
            if list(layer.parameters()):
                fully_shard(layer)
        fully_shard(model)
        return model
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    return FullyShardedDataParallel(model, auto_wrap_policy=ModuleWrapPolicy({nn.Linear, Conv1D}),
                                    use_orig_params=True, device_id=torch.device("cpu"))


def train_and_score(rank: int, world: int, port: int, out: str, sharding: str, shard_factors: bool = False) -> None:
    """Train 6 steps collecting statistics, then fit factors (``shard_factors``: each layer's on its
    owner) and score the pool, the pool with rank-2 queries, and a pool of one; with sharded factors
    (and in one process) also with the last layer only; then compute influence again with the pool
    as a stream (49 and 48 items per process: 4 and 3 batches); rank 0 saves what the test compares."""
    if world > 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=60))  # a process out of step fails, not hangs
    try:
        model = make_model()
        if world > 1:
            model = shard(model, sharding)
        train, val, planted = planted_data(n_train=TRAIN)
        task = li.ClassificationTask()
        statistics = StepStatistics(li.select_layers(model), task, loss_reduction="mean")
        curvature = dict(correction_batches=None, shard_factors=shard_factors)
        session = InfluenceSession(task, train, Subset(val, range(4)), curvature=curvature,
                                   scoring=dict(top_k=3, batch_size=BATCH))
        session.check(model, statistics.layers)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        statistics.attach()
        shares = ((x[rank::world], y[rank::world]) for x, y in DataLoader(train, batch_size=BATCH, drop_last=True))
        tiny_models.train_recorded(statistics, shares, lambda batch: F.cross_entropy(model(batch[0]), batch[1]),
                                   optimizer)
        statistics.detach()
        forwards = []  # every process must run as many forward passes as the others
        counting = model.register_forward_pre_hook(lambda *_: forwards.append(1))
        covariances = session.reduce_statistics(statistics)
        result, factors = session.compute(model, covariances, step=6, layers=statistics.layers)
        session.query_rank = 2
        low_rank = session.score(model, factors)
        session.query_rank = None
        last_layer = None
        if shard_factors or world == 1:  # one layer on two processes: the second owns none
            last = statistics.layers[-1:]
            factors_of_last = session.fit_factors(model, reduce_to_owners(statistics.stats, last), step=6,
                                                  layers=last)
            last_layer = session.score(model, factors_of_last).scores
        session.pool_ids = torch.tensor([ONE_EXAMPLE])
        single = session.score(model, factors)
        streaming = InfluenceSession(task, IndexedStream(train), Subset(val, range(4)), curvature=curvature,
                                     scoring=dict(top_k=3, batch_size=BATCH))
        streamed, _ = streaming.compute(model, streaming.reduce_statistics(statistics), step=6,
                                        layers=statistics.layers)
        counting.remove()
        forwards = distributed.gather_objects(len(forwards))
        # With sharding each rank holds its own layers' statistics and factors: gathered here.
        eigenvalues = {name: values for held in distributed.gather_objects(
            {name: factors.eigenvalues(name) for name in factors.layers}) for name, values in held.items()}
        covariances = {key: value for held in distributed.gather_objects(covariances.state_dict())
                       for key, value in held.items()}
        if rank == 0:
            torch.save({"layers": [layer.name for layer in statistics.layers], "covariances": covariances,
                        "eigenvalues": eigenvalues, "scores": result.scores, "low_rank": low_rank.scores,
                        "last_layer": last_layer, "forwards": forwards, "streamed": streamed.scores,
                        "streamed_ids": streamed.train_ids,
                        "layer_abs_sums": result.get("layer_abs_sums"),
                        "train_ids": result.train_ids, "top_ids": result.get("top_ids"),
                        "one_example": single.scores, "planted": planted, "world_size": dist.get_world_size()
                        if world > 1 else 1}, out)
    except BaseException:
        if world > 1:
            dist.destroy_process_group()
        raise
    if world > 1:
        leave_process_group()


def leave_process_group() -> None:
    """End a spawned process that succeeded: wait for the other processes, destroy the group, and exit
    without the interpreter's finalization. FSDP1 on gloo leaves C++ work objects that, torn down at
    interpreter exit under load, abort the process ("terminate called without an active exception")
    after everything was computed and saved."""
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run(out: Path, world: int, sharding: str = "fully_shard", shard_factors: bool = False) -> dict:
    """Run :func:`train_and_score` in this process (``world=1``) or in ``world`` spawned processes."""
    if world == 1:
        train_and_score(0, 1, 0, str(out), sharding)
    else:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        torch.multiprocessing.spawn(train_and_score, args=(world, port, str(out), sharding, shard_factors),
                                    nprocs=world)
    return torch.load(out, weights_only=True)
