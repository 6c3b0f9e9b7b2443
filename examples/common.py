"""Helpers shared by the examples: command-line flags, the W&B logger, and terminal output.

Kept in one place so that each example reads top to bottom as "data, model, callback, results".
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Optional, Sequence

import torch

_ANSI_RESET = "\033[0m"
_ANSI_POSITIVE = "\033[41;97m"  # white on red: the token helps the query
_ANSI_NEGATIVE = "\033[44;97m"  # white on blue: the token hurts the query


def add_common_arguments(parser: argparse.ArgumentParser, default_output: str,
                         quick_output: Optional[str] = None) -> None:
    """Flags every example understands: where to write, seed, W&B mode, colours.

    With ``quick_output``, ``--output-dir`` defaults to ``None`` and :func:`set_up` picks
    ``quick_output`` for ``--quick`` runs and ``default_output`` otherwise, so a smoke run's results
    never mix with a full run's. Help texts leave defaults to :class:`HelpFormatter`, which prints
    each once.
    """
    where = "where logs, checkpoints, influence results and the report go"
    if quick_output is None:
        parser.add_argument("--output-dir", type=Path, default=Path(default_output), help=where)
    else:
        parser.add_argument("--output-dir", type=Path, default=None,
                            help=f"{where} (default: {default_output}, or {quick_output} with --quick)")
        parser.set_defaults(output_dirs=(Path(default_output), Path(quick_output)))
    parser.add_argument("--seed", type=int, default=0, help="seed of the data, the model and training")
    parser.add_argument("--online", action="store_true",
                        help="sync the W&B run to wandb.ai (otherwise it stays offline: `wandb sync` it later)")
    parser.add_argument("--no-wandb", action="store_true", help="log to CSV only (no W&B run)")
    parser.add_argument("--color", choices=("auto", "always", "never"), default="auto",
                        help="highlight influential tokens with ANSI colours (auto: when stdout is a terminal)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (these models are too small to gain from more, "
                             "and extra threads slow down sharply when the cores are busy)")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends ``(default: X)`` once: not where the help already states its default, nor for
    switches and unset values (``False`` / ``None``)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        help_text = action.help or ""
        if "(default:" in help_text or action.default is None or action.default is False:
            return help_text
        return super()._get_help_string(action)


def set_up(args: argparse.Namespace) -> None:
    """Choose the output directory, seed everything and set the CPU thread count (call first in ``main``)."""
    import pytorch_lightning as pl

    if args.output_dir is None:
        full, quick = args.output_dirs
        args.output_dir = quick if args.quick else full

    torch.set_num_threads(args.threads)
    pl.seed_everything(args.seed, workers=True, verbose=False)


def make_logger(args: argparse.Namespace, project: str):
    """A ``WandbLogger`` (offline unless ``--online``), or a ``CSVLogger`` with ``--no-wandb``.

    Offline runs need no account: W&B writes the run under ``<output-dir>/wandb/`` and
    ``wandb sync <run dir>`` uploads it later.
    """
    from pytorch_lightning.loggers import CSVLogger, WandbLogger

    args.output_dir.mkdir(parents=True, exist_ok=True)
    if args.no_wandb:
        return CSVLogger(save_dir=str(args.output_dir), name=project)
    os.environ.setdefault("WANDB_SILENT", "true")
    return WandbLogger(project=project, save_dir=str(args.output_dir), offline=not args.online)


def logger_location(logger) -> str:
    """Where a logger's run lives on disk, and how to see it."""
    from pytorch_lightning.loggers import WandbLogger

    if isinstance(logger, WandbLogger):
        run = logger.experiment
        if run.offline:
            return f"{Path(run.dir).parent} (offline; upload with `wandb sync {Path(run.dir).parent}`)"
        return str(getattr(run, "url", None) or run.dir)
    return str(logger.log_dir)


def use_color(choice: str) -> bool:
    """Resolve ``--color auto|always|never``."""
    return choice == "always" or (choice == "auto" and sys.stdout.isatty())


def highlight_tokens(tokens: Sequence[str], scores: Optional[torch.Tensor], mask: Optional[torch.Tensor] = None,
                     *, color: bool, threshold: float = 0.25) -> str:
    """Tokens joined by spaces, those carrying a large share of the influence highlighted.

    A token is highlighted when ``|score| >= threshold * max |score|`` over the valid tokens: in
    colour (red: helps the query, blue: hurts it) or, without colour, as ``[+token]`` / ``[-token]``.
    A token's score is the influence flowing through the position that *reads* it (the token
    before the one it predicts), as in Grosse et al. (2023).
    """
    if scores is None:
        return " ".join(tokens)
    values = scores[: len(tokens)].double()
    valid = torch.ones_like(values, dtype=torch.bool) if mask is None else mask[: len(tokens)].bool()
    peak = float(values[valid].abs().max()) if valid.any() else 0.0
    words = []
    for token, value, ok in zip(tokens, values.tolist(), valid.tolist()):
        if not ok or peak == 0.0 or abs(value) < threshold * peak:
            words.append(token)
        elif color:
            words.append(f"{_ANSI_POSITIVE if value > 0 else _ANSI_NEGATIVE}{token}{_ANSI_RESET}")
        else:
            words.append(f"[{'+' if value > 0 else '-'}{token}]")
    return " ".join(words)


def section(title: str) -> None:
    """Print a section header."""
    print(f"\n== {title} " + "=" * max(0, 76 - len(title)))
