"""Every option of the callback under one strategy, in one process group: the planted classifier
trained with one InfluenceCallback per option side by side, then resumed from its first epoch's
checkpoint. ``python tests/matrix_script.py OUT_DIR single|ddp|fsdp2`` (DDP and FSDP2 re-run
``sys.argv`` for the other rank; FSDP2 is ``ModelParallelStrategy`` with ``fully_shard``).

The learning rate is tiny (1e-3): the strategies' own training arithmetic differs in the last
bits, which EK-FAC amplifies; the ledger, weighted by the learning rate, still records something.
Each optimizer step sees the same 16 examples in every mode (one batch of 16, or 8 per rank from an
unshuffled distributed sampler); the scored pool of 33 examples splits into 17 and 16 (2 and 1
batches of 16), the streaming pool likewise. Rank 0 writes ``OUT_DIR/summary.pt``: per option the
result's tensors, the resumed run's, and each process's ``statistics_bytes()`` per option.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pytorch_lightning as pl  # noqa: E402
import torch  # noqa: E402
from pytorch_lightning.callbacks import ModelCheckpoint  # noqa: E402
from pytorch_lightning.strategies import ModelParallelStrategy  # noqa: E402

import lightning_influence as li  # noqa: E402
from lightning_influence.engine.distributed import gather_objects  # noqa: E402
from lightning_influence.loops.callback import InfluenceCallback  # noqa: E402
from tests.callback_models import make_module_class, merged_settings, planted_data  # noqa: E402
from tests.ddp_script import UnshuffledData  # noqa: E402
from tests.fsdp_helpers import IndexedStream  # noqa: E402
from tests.fsdp_lightning_script import ShardedClassifier  # noqa: E402
from tests.matrix_helpers import summary as result_summary  # noqa: E402

LEARNING_RATE = 1e-3
POOL = 33


class OptionCallback(InfluenceCallback):
    """An InfluenceCallback whose checkpoint state is keyed by its option: the resumed run (another
    ``output_dir``, which the default key names) finds each option's state."""

    def __init__(self, option: str, **settings) -> None:
        super().__init__(**settings)
        self.option = option

    @property
    def state_key(self) -> str:
        return f"InfluenceCallback[{self.option}]"


def options(train) -> dict:
    return {
        "plain": {},
        "shard_factors": {"curvature": {"shard_factors": True}},
        "stream": {"train_data": IndexedStream(train)},
        "stream_sharded": {"train_data": IndexedStream(train), "curvature": {"shard_factors": True}},
        "ledger": {"scoring": {"ledger": 32}},
        "self_influence": {"scoring": {"self_influence": True}},
        "keep_top_scores": {"scoring": {"keep_top_scores": 8}},
        "query_rank": {"scoring": {"query_rank": 2}},
        # approximate: each process collects from its own batches
        "shard_statistics": {"curvature": {"shard_factors": True, "shard_statistics": True}},
    }


def callbacks(out: Path, train, chosen) -> list:
    common = dict(num_queries=4, every_n_epochs=None, on_checkpoint=False, on_error="raise",
                  curvature=dict(collect_every_n_steps=1),
                  scoring=dict(max_train_examples=POOL, batch_size=16, top_k=3),
                  report=dict(mode="off", show_progress=False))
    return [OptionCallback(option, task=li.ClassificationTask(), output_dir=str(out / option),
                           **merged_settings(common, settings))
            for option, settings in options(train).items() if option in chosen]


def fit(out: Path, mode: str, chosen, ckpt_path=None, checkpoints=()):
    train, val, _ = planted_data()
    distributed = mode != "single"
    strategy = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1) if mode == "fsdp2" else \
        "ddp" if distributed else "auto"
    influence = callbacks(out, train, chosen)
    trainer = pl.Trainer(
        max_epochs=2, accelerator="cpu", devices=2 if distributed else 1, strategy=strategy,
        callbacks=influence + list(checkpoints), logger=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, default_root_dir=str(out), use_distributed_sampler=False,
        enable_checkpointing=bool(checkpoints),
    )
    model = ShardedClassifier(lr=LEARNING_RATE) if mode == "fsdp2" else make_module_class(pl)(lr=LEARNING_RATE)
    trainer.fit(model, UnshuffledData(train, val, batch_size=8 if distributed else 16), ckpt_path=ckpt_path)
    return trainer, influence


def summary(callback) -> dict:
    (result,) = callback.results
    return result_summary(result)


def main(out: Path, mode: str) -> None:
    pl.seed_everything(0, verbose=False)
    every_epoch = ModelCheckpoint(dirpath=out / "ckpt", save_top_k=-1, save_weights_only=False)
    trainer, influence = fit(out / "run", mode, set(options(None)), checkpoints=[every_epoch])
    held = gather_objects({callback.option: callback.statistics_bytes() for callback in influence})
    saved = {callback.option: summary(callback) for callback in influence} if trainer.is_global_zero else None
    first_epoch = sorted((out / "ckpt").glob("epoch=0*"))
    resumed_trainer, resumed = fit(out / "resumed", mode, {"plain", "shard_statistics"}, ckpt_path=str(first_epoch[0]))
    if resumed_trainer.is_global_zero:
        saved.update({f"resumed_{callback.option}": summary(callback) for callback in resumed})
        saved["statistics_bytes"] = held  # per rank, per option
        torch.save(saved, out / "summary.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
