"""Every option of the callback under DDP and FSDP2 (``ModelParallelStrategy`` + ``fully_shard``) on 2
CPU processes (gloo) gives the single-process result: ``shard_factors``, a streaming pool split
unevenly (with and without ``shard_factors``), the ledger, ``self_influence``, ``keep_top_scores``,
``query_rank``, and a run resumed from its first epoch's checkpoint (FSDP2: Lightning's distributed
checkpoint, a directory). One process group per strategy
(``tests/matrix_script.py``: one callback per option in the same Trainer), the three runs side by side."""

import sys
from pathlib import Path

import pytest
import torch

from tests.matrix_helpers import assert_same_result, launch

SCRIPT = Path(__file__).resolve().parents[1] / "matrix_script.py"
MODES = ("single", "ddp", "fsdp2")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return launch({mode: [sys.executable, str(SCRIPT), "{out}", mode] for mode in MODES},
                  tmp_path_factory.mktemp("matrix"))


OPTIONS = ("plain", "shard_factors", "stream", "stream_sharded", "ledger", "self_influence", "keep_top_scores",
           "query_rank", "resumed_plain")


@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
@pytest.mark.parametrize("option", OPTIONS)
def test_every_option_gives_the_single_process_result(runs, mode, option):
    single = runs["single"][option]
    assert_same_result(single, runs[mode][option])
    assert len(single["train_ids"]) == 33


def test_the_options_compute_what_they_name(runs):
    """The single-process reference holds each option's own output (so the comparison above is not empty)."""
    single = runs["single"]
    assert single["ledger"]["ledger_ids"].tolist() == list(range(96))  # two epochs over the 96 examples
    assert bool(single["ledger"]["ledger_scores"].abs().sum() > 0)
    assert single["self_influence"]["self_scores"].shape == (33,)
    assert single["keep_top_scores"]["kept_top_ids"].shape == (4, 8) and "scores" not in single["keep_top_scores"]
    assert not torch.allclose(single["query_rank"]["scores"], single["plain"]["scores"], rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(single["resumed_plain"]["scores"], single["plain"]["scores"], rtol=1e-4, atol=1e-4)
    assert single["stream_sharded"]["train_ids"].tolist() == list(range(33))


@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
def test_sharded_statistics_hold_half_the_bytes_and_nearly_the_same_scores(runs, mode):
    """``shard_statistics``: each of 2 processes accumulates only the layers it owns, from its own
    batches: at most 0.6x the statistics one process holds (measured 0.53x and 0.47x: the two layers
    are of unequal size), no communication during training, and scores close to the single
    process's, whose layers saw every batch (measured: Pearson 0.99997, Spearman 0.998, largest
    difference 0.5% of the largest score). A resume gives the uninterrupted run's scores (the
    checkpoint gathers every layer's sums; each process takes back its own)."""
    held = runs[mode]["statistics_bytes"]
    one_process = runs["single"]["statistics_bytes"][0]["plain"]
    assert runs["single"]["statistics_bytes"][0]["shard_statistics"] == one_process  # no process group: no effect
    assert [rank["plain"] for rank in held] == [one_process, one_process]
    assert max(rank["shard_statistics"] for rank in held) <= 0.6 * one_process
    sharded, single = runs[mode]["shard_statistics"]["scores"], runs["single"]["plain"]["scores"]
    correlation = torch.corrcoef(torch.stack([sharded.flatten(), single.flatten()]))[0, 1]
    assert correlation > 0.99
    assert torch.equal(runs[mode]["shard_statistics"]["top_ids"][:, 0], runs["single"]["plain"]["top_ids"][:, 0])
    torch.testing.assert_close(runs[mode]["resumed_shard_statistics"]["scores"], sharded, rtol=1e-4, atol=1e-4)
