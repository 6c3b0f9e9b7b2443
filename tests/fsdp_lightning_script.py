"""Train the planted classifier with InfluenceCallback on 2 CPU processes (gloo), under DDP or under
ModelParallelStrategy with FSDP2 (``fully_shard`` in ``configure_model``).

Run as a script (both strategies re-run ``sys.argv`` for the other rank):
``python tests/fsdp_lightning_script.py OUT_DIR ddp|fsdp2``. Each rank sees the same 8 examples of
every optimizer step in both modes (an unshuffled distributed sampler); the scored pool of 33
examples splits into 17 and 16, 2 and 1 batches of 16: the processes must still run the same
passes. Rank 0 writes ``OUT_DIR/summary.pt``.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pytorch_lightning as pl  # noqa: E402
import torch  # noqa: E402
from pytorch_lightning.strategies import ModelParallelStrategy  # noqa: E402

import lightning_influence as li  # noqa: E402
from lightning_influence.loops.callback import InfluenceCallback  # noqa: E402
from tests.callback_models import make_module_class, planted_data  # noqa: E402
from tests.ddp_script import UnshuffledData  # noqa: E402


class ShardedClassifier(make_module_class(pl)):
    """Every linear layer and the network sharded with FSDP2 over the data-parallel mesh."""

    def configure_model(self):
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]
        for layer in self.net:
            if isinstance(layer, torch.nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(self.net, mesh=mesh)


def main(out: Path, mode: str) -> None:
    pl.seed_everything(0, verbose=False)
    train, val, planted = planted_data()
    callback = InfluenceCallback(li.ClassificationTask(), num_queries=4, output_dir=str(out / "influence"),
                                 every_n_epochs=None, on_checkpoint=False, on_error="raise",
                                 curvature=dict(collect_every_n_steps=1),
                                 scoring=dict(max_train_examples=33, batch_size=16),
                                 report=dict(mode="off", show_progress=False))
    strategy = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1) if mode == "fsdp2" else "ddp"
    trainer = pl.Trainer(
        max_epochs=2, accelerator="cpu", devices=2, strategy=strategy, callbacks=[callback], logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        default_root_dir=str(out), use_distributed_sampler=False,
    )
    model = ShardedClassifier() if mode == "fsdp2" else make_module_class(pl)()
    trainer.fit(model, UnshuffledData(train, val, batch_size=8))
    if trainer.is_global_zero:
        (result,) = callback.results
        torch.save({"world_size": trainer.world_size, "step": result.step, "scores": result.scores,
                    "train_ids": result.train_ids, "top_ids": result.get("top_ids"), "planted": planted,
                    "layers": result.layer_names}, out / "summary.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
