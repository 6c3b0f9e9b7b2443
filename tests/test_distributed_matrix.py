"""Every option of the callback under DDP and FSDP2 (``ModelParallelStrategy`` + ``fully_shard``) on 2
CPU processes (gloo) gives the single-process result: ``shard_factors``, a streaming pool split
unevenly (with and without ``shard_factors``), the ledger, ``self_influence``, ``keep_top_scores``,
``query_rank``, and a run resumed from its first epoch's checkpoint (FSDP2: Lightning's distributed
checkpoint, a directory). One process group per strategy
(``tests/matrix_script.py``: one callback per option in the same Trainer), the three runs side by side."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).with_name("matrix_script.py")
MODES = ("single", "ddp", "fsdp2")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("matrix")
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    started = {mode: subprocess.Popen([sys.executable, str(SCRIPT), str(out / mode), mode], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
               for mode in MODES}
    for mode, run in started.items():
        output, _ = run.communicate(timeout=600)
        assert run.returncode == 0, f"{mode} run failed:\n{output[-4000:]}"
    return {mode: torch.load(out / mode / "summary.pt", weights_only=True) for mode in MODES}


OPTIONS = ("plain", "shard_factors", "stream", "stream_sharded", "ledger", "self_influence", "keep_top_scores", "query_rank",
           "resumed")


@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
@pytest.mark.parametrize("option", OPTIONS)
def test_every_option_gives_the_single_process_result(runs, mode, option):
    single, distributed = runs["single"][option], runs[mode][option]
    assert (single["world_size"], distributed["world_size"]) == (1, 2)
    assert distributed["step"] == single["step"] == 12
    assert sorted(distributed) == sorted(single)  # the same fields: nothing missing under the strategy
    for name, expected in single.items():
        if isinstance(expected, torch.Tensor) and not expected.is_floating_point():
            assert torch.equal(distributed[name], expected), name
        elif isinstance(expected, torch.Tensor):
            torch.testing.assert_close(distributed[name], expected, rtol=1e-3, atol=1e-3, msg=name)
    assert len(single["train_ids"]) == 33


def test_the_options_compute_what_they_name(runs):
    """The single-process reference holds each option's own output (so the comparison above is not empty)."""
    single = runs["single"]
    assert single["ledger"]["ledger_ids"].tolist() == list(range(96))  # two epochs over the 96 examples
    assert bool(single["ledger"]["ledger_scores"].abs().sum() > 0)
    assert single["self_influence"]["self_scores"].shape == (33,)
    assert single["keep_top_scores"]["kept_top_ids"].shape == (4, 8) and "scores" not in single["keep_top_scores"]
    assert not torch.allclose(single["query_rank"]["scores"], single["plain"]["scores"], rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(single["resumed"]["scores"], single["plain"]["scores"], rtol=1e-4, atol=1e-4)
    assert single["stream_sharded"]["train_ids"].tolist() == list(range(33))
