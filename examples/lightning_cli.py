"""Configure the influence callback from YAML with Lightning's own command line (``LightningCLI``).

The model and data are the flipped-label digits of ``digits_flipped_labels.py``; everything else
— trainer, W&B logger, ``InfluenceCallback`` — comes from ``cli_config.yaml`` as
``class_path`` / ``init_args`` entries, so a run is changed from the command line alone:

    python examples/lightning_cli.py fit --config examples/cli_config.yaml
    python examples/lightning_cli.py fit --config examples/cli_config.yaml \\
        --trainer.max_epochs=3 --trainer.callbacks.init_args.num_queries=32
    python examples/lightning_cli.py fit --config examples/cli_config.yaml --print_config

A ready-made callback file from ``callbacks/lightning_cli/`` can replace the one in the config:
``--trainer.callbacks=callbacks/lightning_cli/monitoring.yaml``.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional, Sequence

import torch
from pytorch_lightning.cli import LightningCLI

sys.path.insert(0, str(Path(__file__).resolve().parent))
from digits_flipped_labels import DigitsData, DigitsNet  # noqa: E402


def main(argv: Optional[Sequence[str]] = None) -> LightningCLI:
    """Run the CLI on ``argv`` (default: the command line); returns it, with its trainer and model."""
    torch.set_num_threads(1)  # a tiny model: one thread is fastest, and immune to busy cores
    return LightningCLI(DigitsNet, DigitsData, args=None if argv is None else list(argv),
                        save_config_kwargs={"overwrite": True})


if __name__ == "__main__":
    main()
