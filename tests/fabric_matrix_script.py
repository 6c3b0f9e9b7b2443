"""The Fabric integration (``InfluenceMonitor``) under one strategy, in one process group, one
training loop per option: ``python tests/fabric_matrix_script.py OUT_DIR single|ddp|fsdp2``. DDP is
``Fabric(strategy="ddp")``, FSDP2 Fabric's ``ModelParallelStrategy`` with ``fully_shard`` on every
layer (both re-run ``sys.argv`` for the other rank).

The learning rate is 0: the weights stay fixed, so every mode scores the same weights. Each
optimizer step sees the same 16 examples in every mode (one batch of 16, or rows ``rank::2`` of it
per process); the scored pool of 33 examples splits into 17 and 16. Process 0 writes
``OUT_DIR/summary.pt``: per option the result's tensors (:func:`tests.matrix_helpers.summary`).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from lightning.fabric import Fabric  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader, Subset  # noqa: E402

import lightning_influence as li  # noqa: E402
from lightning_influence.loops.fabric import InfluenceMonitor  # noqa: E402
from tests.callback_models import merged_settings, planted_data  # noqa: E402
from tests.fsdp_helpers import IndexedStream  # noqa: E402
from tests.matrix_helpers import summary  # noqa: E402

POOL = 33
BATCH = 16


def options(train) -> dict:
    return {
        "plain": {},
        "shard_factors": {"curvature": {"shard_factors": True}},
        "stream": {"train_data": IndexedStream(Subset(train, range(POOL)))},
        "stream_sharded": {"train_data": IndexedStream(Subset(train, range(POOL))),
                           "curvature": {"shard_factors": True}},
        "self_influence": {"scoring": {"self_influence": True}},
        "keep_top_scores": {"scoring": {"keep_top_scores": 8}},
        "query_rank": {"scoring": {"query_rank": 2}},
    }


def classifier() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(2, 16), nn.Tanh(), nn.Linear(16, 3))


def shard_every_layer(model: nn.Module, device_mesh) -> nn.Module:
    """Fabric's ``ModelParallelStrategy`` parallelize function: FSDP2 on every linear layer and the root."""
    from torch.distributed.fsdp import fully_shard

    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=device_mesh["data_parallel"])
    return fully_shard(model, mesh=device_mesh["data_parallel"])


def make_fabric(mode: str) -> Fabric:
    if mode == "single":
        return Fabric(accelerator="cpu", devices=1)
    if mode == "ddp":
        strategy = "ddp"
    else:
        from lightning.fabric.strategies import ModelParallelStrategy

        strategy = ModelParallelStrategy(shard_every_layer, data_parallel_size=2, tensor_parallel_size=1)
    fabric = Fabric(accelerator="cpu", devices=2, strategy=strategy)
    fabric.launch()
    return fabric


def train_and_compute(fabric: Fabric, out: Path, option: str, settings: dict, train, queries):
    """Two epochs of 6 steps with lr=0, the monitor's three touch points, then one computation."""
    rank, world = fabric.global_rank, fabric.world_size
    model = fabric.setup_module(classifier())
    optimizer = fabric.setup_optimizers(torch.optim.SGD(model.parameters(), lr=0.0))
    common = dict(train_data=Subset(train, range(POOL)), curvature=dict(collect_every_n_steps=1),
                  scoring=dict(batch_size=BATCH, top_k=3), report=dict(mode="off", show_progress=False))
    monitor = InfluenceMonitor(fabric, model, li.ClassificationTask(), query_data=queries, output_dir=out / option,
                               on_error="raise", **merged_settings(common, settings))
    for _ in range(2):
        for x, y in DataLoader(train, batch_size=BATCH):
            batch = (x[rank::world], y[rank::world])
            with monitor.step(batch):
                monitor.backward(F.cross_entropy(model(batch[0]), batch[1]))
            optimizer.step()
            optimizer.zero_grad()
            monitor.optimizer_step()
    result = monitor.compute(epoch=1)
    monitor.close()
    return summary(result) if fabric.is_global_zero else None


def main(out: Path, mode: str) -> None:
    fabric = make_fabric(mode)
    train, val, _ = planted_data()
    queries = Subset(val, range(4))
    saved = {option: train_and_compute(fabric, out, option, settings, train, queries)
             for option, settings in options(train).items()}
    if fabric.is_global_zero:
        torch.save(saved, out / "summary.pt")
    fabric.barrier()


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
