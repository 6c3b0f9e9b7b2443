"""Find deliberately mislabelled training images with influence functions.

A small convolutional network learns scikit-learn's bundled 8x8 digits (no download), after 10%
of the training labels have been flipped to a wrong class. ``InfluenceCallback`` fits EK-FAC
curvature during training and, at the end, scores every training image against a clean
validation set and, with ``scoring.self_influence=True``, on itself (live: in the same computation, saved with
the result, logged as ``influence/self/...`` scalars and as the report's self-influence table). Two
influence signals should single out the flipped labels:

* **self-influence** ``∇ℓ(z)ᵀ (G + λI)⁻¹ ∇ℓ(z)``: how far the model must move to fit ``z``; a
  wrong label needs an unusually large, unusual step;
* **influence on clean data**: the sum of ``z``'s scores over the validation queries; a wrong
  label makes the right answers on clean images less likely, so its total is negative.

The run reports, for each signal, the precision of the examples it flags (as many as were
flipped), next to the rate by chance and to the training loss, a strong simple baseline.

    python examples/digits_flipped_labels.py          # under a minute on a laptop CPU
    python examples/digits_flipped_labels.py --quick
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Dict, Optional, Sequence

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_influence as li

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import HelpFormatter, add_common_arguments, logger_location, make_logger, section, set_up  # noqa: E402


class DigitsData(pl.LightningDataModule):
    """Digits as ``[1, 8, 8]`` images in [0, 1]: a clean validation split, and a training split
    whose labels are flipped to a random other class for ``flip_fraction`` of the examples
    (``flipped`` marks them: the ground truth the influence signals are scored against).
    """

    def __init__(self, flip_fraction: float = 0.1, validation_size: int = 400, batch_size: int = 64,
                 seed: int = 0) -> None:
        super().__init__()
        self.batch_size = batch_size
        digits = load_digits()
        images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
        labels = torch.tensor(digits.target)
        generator = torch.Generator().manual_seed(seed)
        order = torch.randperm(len(labels), generator=generator)
        val, train = order[:validation_size], order[validation_size:]
        noisy = labels[train].clone()
        self.flipped = torch.zeros(len(train), dtype=torch.bool)
        self.flipped[torch.randperm(len(train), generator=generator)[: round(flip_fraction * len(train))]] = True
        shift = torch.randint(1, 10, (int(self.flipped.sum()),), generator=generator)  # never the true class
        noisy[self.flipped] = (noisy[self.flipped] + shift) % 10
        self.train_set = TensorDataset(images[train], noisy)
        self.val_set = TensorDataset(images[val], labels[val])

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=256)


class DigitsNet(pl.LightningModule):
    """Two convolutions and a linear classifier: every layer is one EK-FAC block."""

    def __init__(self, lr: float = 2e-3, weight_decay: float = 1e-4) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
            nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten(),
        )
        self.classifier = nn.Linear(32 * 4 * 4, 10)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(images))

    def training_step(self, batch, batch_idx):
        images, labels = batch
        loss = F.cross_entropy(self(images), labels)  # a mean over examples: curvature.loss_reduction="mean"
        self.log("train/loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        images, labels = batch
        logits = self(images)
        self.log_dict({"val/loss": F.cross_entropy(logits, labels),
                       "val/accuracy": (logits.argmax(-1) == labels).float().mean()}, prog_bar=True)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)


def precision_at(scores: torch.Tensor, flipped: torch.Tensor, count: int) -> float:
    """Fraction of flipped labels among the ``count`` highest ``scores``."""
    return float(flipped[scores.topk(count).indices].float().mean())


def build_parser() -> argparse.ArgumentParser:
    """Command-line flags (``--help`` lists them)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=HelpFormatter)
    parser.add_argument("--flip-fraction", type=float, default=0.1, help="share of training labels flipped")
    parser.add_argument("--validation-size", type=int, default=400, help="clean validation images")
    parser.add_argument("--queries", type=int, default=200, help="validation images used as influence queries")
    parser.add_argument("--epochs", type=int, default=15, help="training epochs")
    parser.add_argument("--max-steps", type=int, default=-1, help="stop after this many steps (-1: no limit)")
    parser.add_argument("--quick", action="store_true", help="fewer epochs and queries, for smoke tests")
    add_common_arguments(parser, default_output="runs/digits_flipped_labels",
                         quick_output="runs/digits_flipped_labels_quick")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, object]:
    """Train on partly flipped labels, then rank training images by influence; returns the rates."""
    args = build_parser().parse_args(argv)
    if args.quick:
        args.epochs, args.queries = 5, 50
    started = time.perf_counter()
    set_up(args)
    data = DigitsData(args.flip_fraction, args.validation_size, seed=args.seed)
    train_set, flipped = data.train_set, data.flipped
    model = DigitsNet()

    influence = li.InfluenceCallback(
        task=li.ClassificationTask(),
        query_data="val", num_queries=args.queries,  # clean images
        every_n_epochs=None, on_checkpoint=False,      # once, when training ends
        # output_dir unset: <log dir>/influence, or influence-v1, -v2, ... when an earlier run is there
        curvature={"fisher": "true"},                  # sampled labels: the flipped ones do not shape the curvature
        scoring={"self_influence": True},              # each training image scored on itself, live
        report={"show_progress": False},
    )
    logger = make_logger(args, project="digits-flipped-labels")
    trainer = pl.Trainer(
        max_epochs=args.epochs, max_steps=args.max_steps, callbacks=[influence], logger=logger,
        accelerator="cpu", devices=1, deterministic=True, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, log_every_n_steps=10, num_sanity_val_steps=0,
    )
    trainer.fit(model, datamodule=data)
    result = influence.results[-1]

    # The live self-influence of the result, per training index (-inf: not in the scored pool).
    self_influence = torch.full((len(train_set),), float("-inf")).index_copy_(0, result.train_ids,
                                                                             result.self_scores.float())
    on_clean = torch.zeros(len(train_set)).index_add_(0, result.train_ids, result.scores.sum(0))
    with torch.no_grad():
        images, labels = train_set.tensors
        training_loss = F.cross_entropy(model(images), labels, reduction="none")

    count = int(flipped.sum())
    rates = {
        "chance": float(flipped.float().mean()),
        "self_influence": precision_at(self_influence, flipped, count),
        "negative_influence": precision_at(-on_clean, flipped, count),
        "training_loss": precision_at(training_loss, flipped, count),
    }
    seconds = time.perf_counter() - started

    section("Where everything is")
    print(f"influence result : {result.path}  (report: {Path(result.path) / 'report'}, its self-influence table "
          "lists the top candidates)")
    print(f"logger run       : {logger_location(logger)}")
    print(f"validation accuracy {float(trainer.callback_metrics['val/accuracy']):.1%}; total time {seconds:.0f} s")
    section("Finding the flipped labels")
    print(f"{count} of {len(train_set)} training labels were flipped. Precision of the {count} examples "
          "each signal flags:")
    for key, label in (("self_influence", "highest self-influence (live, from the callback)"),
                       ("negative_influence", f"most negative influence on {result.num_queries} clean images"),
                       ("training_loss", "highest training loss (baseline)"),
                       ("chance", "chance")):
        print(f"  {label:<52} {rates[key]:6.1%}")
    if not args.no_wandb:
        import wandb

        wandb.finish()
    return {"rates": rates, "result": result, "self_influence": self_influence, "flipped": flipped,
            "seconds": seconds, "model": model, "train_set": train_set}


if __name__ == "__main__":
    main()
