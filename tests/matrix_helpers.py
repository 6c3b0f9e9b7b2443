"""What the distributed matrix tests share: each process group is one script run in a subprocess
(the strategies re-run ``sys.argv`` for the other ranks, which inside pytest would be pytest), its
process 0 saving a summary per option, which is compared with the single process's."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Dict, Sequence

import torch

SUMMARY_FIELDS = ("scores", "self_scores", "ledger_ids", "ledger_scores", "kept_top_ids", "kept_top_scores", "top_ids",
                  "score_moments")


def summary(result) -> dict:
    """The fields of one result that the matrix compares (those the result has)."""
    return {"step": result.step, "train_ids": result.train_ids, "world_size": result.meta["world_size"],
            **{name: result.get(name) for name in SUMMARY_FIELDS if result.get(name) is not None}}


def launch(commands: Dict[str, Sequence[str]], out: Path, timeout: float = 600) -> Dict[str, dict]:
    """Run the commands side by side, ``{out}`` in their arguments replaced by ``out/<name>``; every
    one must succeed; returns each one's ``out/<name>/summary.pt``."""
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    started = {name: subprocess.Popen([part.replace("{out}", str(out / name)) for part in command], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
               for name, command in commands.items()}
    for name, run in started.items():
        output, _ = run.communicate(timeout=timeout)
        assert run.returncode == 0, f"{name} run failed:\n{output[-4000:]}"
    return {name: torch.load(out / name / "summary.pt", weights_only=True) for name in commands}


def assert_same_result(single: dict, distributed: dict, *, world_size: int = 2, step: int = 12,
                       rtol: float = 1e-3, atol: float = 1e-3) -> None:
    """The same fields; integer tensors (ids) equal, floating ones within tolerance."""
    assert (single["world_size"], distributed["world_size"]) == (1, world_size)
    assert distributed["step"] == single["step"] == step
    assert sorted(distributed) == sorted(single)  # the same fields: nothing missing under the strategy
    for name, expected in single.items():
        if isinstance(expected, torch.Tensor) and not expected.is_floating_point():
            assert torch.equal(distributed[name], expected), name
        elif isinstance(expected, torch.Tensor):
            torch.testing.assert_close(distributed[name], expected, rtol=rtol, atol=atol, msg=name)
