"""DDP on 2 CPU processes (gloo) gives the single-process statistics and scores.

Lightning's ``ddp`` strategy re-runs ``sys.argv`` for the other ranks (inside pytest that would be
pytest), so both runs are launched as ``tests/ddp_script.py`` in subprocesses.
"""

import os
import subprocess
import sys
from pathlib import Path

import torch

from tests.ddp_script import main

SCRIPT = Path(__file__).resolve().parents[1] / "ddp_script.py"


def test_ddp_matches_single_process(tmp_path):
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    ddp_run = subprocess.Popen([sys.executable, str(SCRIPT), str(tmp_path / "ddp"), "ddp"], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    main(tmp_path / "single", "single")  # the reference, in this process meanwhile
    output, _ = ddp_run.communicate(timeout=300)
    assert ddp_run.returncode == 0, f"DDP run failed:\n{output[-4000:]}"
    single, ddp = (torch.load(tmp_path / mode / "summary.pt", weights_only=True) for mode in ("single", "ddp"))
    assert (single["world_size"], ddp["world_size"]) == (1, 2)
    # Statistics in rank 0's checkpoint are the sums over both ranks (consolidated), not one rank's half.
    for key, value in single["epoch0_stats"].items():
        torch.testing.assert_close(ddp["epoch0_stats"][key], value, rtol=1e-4, atol=1e-5, msg=key)
    # The pool is scored in two halves and gathered in order; only rank 0 wrote one result.
    assert ddp["result_dirs"] == single["result_dirs"] == ["step=12"]
    assert {(tmp_path / "ddp" / f"run_id.rank{rank}").read_text() for rank in (0, 1)} == {ddp["run_id"]}
    assert torch.equal(ddp["train_ids"], single["train_ids"]) and len(single["train_ids"]) == 45
    torch.testing.assert_close(ddp["layer_abs_sums"], single["layer_abs_sums"], rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(ddp["scores"], single["scores"], rtol=1e-3, atol=1e-3)
    assert torch.equal(ddp["top_ids"], single["top_ids"])
