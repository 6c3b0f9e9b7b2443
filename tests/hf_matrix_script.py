"""The Hugging Face Trainer integration (``InfluenceTrainerCallback``) in one process or under DDP,
one callback per option in the same Trainer: ``python tests/hf_matrix_script.py OUT_DIR single``, or
``python -m torch.distributed.run --standalone --nproc-per-node 2 tests/hf_matrix_script.py OUT_DIR ddp``
(``TrainingArguments(use_cpu=True, ddp_backend="gloo")``).

A one-layer GPT-2 (its forward takes ``num_items_in_batch``, so under DDP the Trainer divides each
micro-batch's summed loss by the label tokens of the whole step across processes) trained with
learning rate 0, so every mode scores the same weights: 24 sequences, 8 per optimizer step (one
process: micro-batches of 4, two accumulated; DDP: micro-batches of 2 per process, two accumulated),
3 steps per epoch, 2 epochs. Influence at the end of training, the pool being the Trainer's own
training data. Process 0 writes ``OUT_DIR/summary.pt``: per option the result's tensors.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import transformers  # noqa: E402

from lightning_influence.loops.hf import InfluenceTrainerCallback  # noqa: E402
from tests.callback_models import merged_settings  # noqa: E402
from tests.matrix_helpers import summary  # noqa: E402
from tests.loops.test_integrations import TokenData, tiny_gpt2  # noqa: E402

OPTIONS = {
    "plain": {},
    "shard_factors": {"curvature": {"shard_factors": True}},
    "self_influence": {"scoring": {"self_influence": True}},
    "keep_top_scores": {"scoring": {"keep_top_scores": 8}},
    "query_rank": {"scoring": {"query_rank": 2}},
}


def main(out: Path, mode: str) -> None:
    distributed = mode == "ddp"
    common = dict(curvature=dict(collect_every_n_steps=1, max_tokens_per_step=None),
                  scoring=dict(top_k=3, batch_size=8), report=dict(mode="off", show_progress=False))
    callbacks = {option: InfluenceTrainerCallback("causal_lm", TokenData(4, seed=1), output_dir=str(out / option),
                                                  on_train_end=True, on_error="raise",
                                                  **merged_settings(common, settings))
                 for option, settings in OPTIONS.items()}
    args = transformers.TrainingArguments(
        output_dir=str(out / "hf"), per_device_train_batch_size=2 if distributed else 4, gradient_accumulation_steps=2,
        learning_rate=0.0, num_train_epochs=2, use_cpu=True, ddp_backend="gloo" if distributed else None,
        dataloader_num_workers=0, save_strategy="no", report_to=[], logging_strategy="no", disable_tqdm=True, seed=0,
    )
    trainer = transformers.Trainer(model=tiny_gpt2(), args=args, train_dataset=TokenData(24, seed=0),
                                   callbacks=list(callbacks.values()))
    trainer.train()
    if trainer.is_world_process_zero():
        saved = {}
        for option, callback in callbacks.items():
            (result,) = callback.results
            saved[option] = summary(result)
        torch.save(saved, out / "summary.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
