"""Train the planted classifier with InfluenceCallback in one process or with DDP on 2 CPU processes.

Run as a script (Lightning's ``ddp`` strategy re-runs ``sys.argv`` for the other ranks):
``python tests/ddp_script.py OUT_DIR single|ddp|ddp-sharded`` (``ddp-sharded``: ``shard_factors=True``). The same examples make up each optimizer step
in both modes (16 per step: one batch of 16, or 8 per rank with an unshuffled distributed
sampler), so the two runs must agree up to floating-point summation order. Rank 0 writes
``OUT_DIR/summary.pt``.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pytorch_lightning as pl  # noqa: E402
import torch  # noqa: E402
from pytorch_lightning.callbacks import ModelCheckpoint  # noqa: E402
from torch.utils.data import DataLoader, DistributedSampler  # noqa: E402

import lightning_influence as li  # noqa: E402
from lightning_influence.loops.callback import InfluenceCallback  # noqa: E402
from tests.callback_models import make_datamodule_class, make_module_class, planted_data  # noqa: E402


class UnshuffledData(make_datamodule_class(pl)):
    """Lightning's own distributed sampler shuffles training data; this one keeps the order."""

    def train_dataloader(self):
        sampler = DistributedSampler(self.train, shuffle=False) if self.trainer.world_size > 1 else None
        return DataLoader(self.train, batch_size=self.batch_size, sampler=sampler)


def main(out: Path, mode: str) -> None:
    ddp = mode.startswith("ddp")
    pl.seed_everything(0, verbose=False)
    train, val, planted = planted_data()
    callback = InfluenceCallback(li.ClassificationTask(), num_queries=4, output_dir=str(out / "influence"),
                                 every_n_epochs=None, on_checkpoint=False, on_error="raise",
                                 curvature=dict(collect_every_n_steps=1, shard_factors=mode == "ddp-sharded"),
                                 scoring=dict(max_train_examples=45), report=dict(mode="off", show_progress=False))
    trainer = pl.Trainer(
        max_epochs=2, accelerator="cpu", devices=2 if ddp else 1, strategy="ddp" if ddp else "auto",
        callbacks=[callback, ModelCheckpoint(dirpath=out / "ckpt", save_top_k=-1)], logger=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, default_root_dir=str(out),
        use_distributed_sampler=False,
    )
    model = make_module_class(pl)()
    trainer.fit(model, UnshuffledData(train, val, batch_size=8 if ddp else 16))
    (out / f"run_id.rank{trainer.global_rank}").write_text(callback.run_id)  # one run: every rank agrees
    if trainer.is_global_zero:
        (result,) = callback.results
        first = torch.load(out / "ckpt" / "epoch=0-step=6.ckpt", weights_only=True)["callbacks"][callback.state_key]
        torch.save({
            "world_size": trainer.world_size, "step": result.step, "scores": result.scores,
            "layer_abs_sums": result.get("layer_abs_sums"), "train_ids": result.train_ids, "top_ids": result.get("top_ids"),
            "epoch0_stats": first["collector"]["stats"], "planted": planted,
            "result_dirs": sorted(p.name for p in (out / "influence").iterdir()),  # no lock file left behind
            "run_id": result.meta["run"]["id"],
            "factor_files": sorted(p.name for p in (out / "influence" / f"step={result.step}" / "factors").iterdir()),
        }, out / "summary.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
