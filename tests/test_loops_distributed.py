"""The other training loops under several processes (2 CPU processes, gloo), each result equal to
the single process's with the weights held fixed (learning rate 0):

- Fabric (``InfluenceMonitor``) under ``strategy="ddp"`` and under Fabric's ``ModelParallelStrategy``
  with ``fully_shard`` (FSDP2): the default, ``shard_factors``, a streaming pool split unevenly (with
  and without ``shard_factors``), ``self_influence``, ``keep_top_scores`` and ``query_rank``
  (``tests/fabric_matrix_script.py``, one loop per option in one process group per strategy);

One process group per strategy, launched as scripts in subprocesses side by side
(:mod:`tests.matrix_helpers`)."""

import sys
from pathlib import Path

import pytest
import torch

from tests.matrix_helpers import assert_same_result, launch

HERE = Path(__file__).parent
FABRIC_OPTIONS = ("plain", "shard_factors", "stream", "stream_sharded", "self_influence", "keep_top_scores",
                  "query_rank")


@pytest.fixture(scope="module")
def fabric_runs(tmp_path_factory):
    script = str(HERE / "fabric_matrix_script.py")
    return launch({mode: [sys.executable, script, "{out}", mode] for mode in ("single", "ddp", "fsdp2")},
                  tmp_path_factory.mktemp("fabric"))


@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
def test_fabric_options_give_the_single_process_result(fabric_runs, mode):
    single = fabric_runs["single"]
    assert sorted(single) == sorted(fabric_runs[mode]) == sorted(FABRIC_OPTIONS)
    for option in FABRIC_OPTIONS:
        assert_same_result(single[option], fabric_runs[mode][option], rtol=1e-4, atol=1e-4)
    # The options compute what they name (so the comparison is not empty).
    assert single["plain"]["train_ids"].tolist() == single["stream"]["train_ids"].tolist() == list(range(33))
    assert single["self_influence"]["self_scores"].shape == (33,)
    assert single["keep_top_scores"]["kept_top_ids"].shape == (4, 8) and "scores" not in single["keep_top_scores"]
    assert not torch.allclose(single["query_rank"]["scores"], single["plain"]["scores"], rtol=1e-3, atol=1e-3)
