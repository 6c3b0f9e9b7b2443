"""The other training loops under several processes (2 CPU processes, gloo), each result equal to
the single process's with the weights held fixed (learning rate 0):

- Fabric (``InfluenceMonitor``) under ``strategy="ddp"`` and under Fabric's ``ModelParallelStrategy``
  with ``fully_shard`` (FSDP2): the default, ``shard_factors``, a streaming pool split unevenly (with
  and without ``shard_factors``), ``self_influence``, ``keep_top_scores`` and ``query_rank``
  (``tests/fabric_matrix_script.py``, one loop per option in one process group per strategy);
- the Hugging Face Trainer (``InfluenceTrainerCallback``) under DDP launched by ``torch.distributed.run``
  (``use_cpu=True, ddp_backend="gloo"``, gradient accumulation, the GPT-2 loss divided by the step's
  label tokens across processes): the default, ``shard_factors``, ``self_influence``,
  ``keep_top_scores`` and ``query_rank`` (``tests/hf_matrix_script.py``, one callback per option in
  one Trainer);
- Lightning's activation checkpointing under FSDP: ``FSDPStrategy(activation_checkpointing_policy=
  {nn.Linear})`` (FSDP1) and the user's ``checkpoint_wrapper`` before ``fully_shard`` under
  ``ModelParallelStrategy`` (FSDP2), each with and without checkpointing, in one process group
  (``tests/checkpointing_fsdp_script.py``): the recomputed forwards are not counted twice.

Every process group is launched at once, as scripts in subprocesses side by side
(:mod:`tests.matrix_helpers`)."""

import sys
from pathlib import Path

import pytest
import torch

from tests.matrix_helpers import assert_same_result, launch

HERE = Path(__file__).resolve().parents[1]  # the scripts
FABRIC_OPTIONS = ("plain", "shard_factors", "stream", "stream_sharded", "self_influence", "keep_top_scores",
                  "query_rank")


HF_OPTIONS = ("plain", "shard_factors", "self_influence", "keep_top_scores", "query_rank")
CHECKPOINTING_RUNS = ("fsdp2", "fsdp2_checkpointed", "fsdp1", "fsdp1_checkpointed")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    pytest.importorskip("transformers")
    fabric, hf, checkpointing = (str(HERE / f"{name}_script.py")
                                 for name in ("fabric_matrix", "hf_matrix", "checkpointing_fsdp"))
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    return launch({
        **{f"fabric_{mode}": [sys.executable, fabric, "{out}", mode] for mode in ("single", "ddp", "fsdp2")},
        "hf_single": [sys.executable, hf, "{out}", "single"], "hf_ddp": [*torchrun, hf, "{out}", "ddp"],
        **{f"checkpointing_{mode}": [sys.executable, checkpointing, "{out}", mode] for mode in ("single", "fsdp")},
    }, tmp_path_factory.mktemp("loops"))


@pytest.fixture(scope="module")
def fabric_runs(runs):
    return {mode: runs[f"fabric_{mode}"] for mode in ("single", "ddp", "fsdp2")}


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


def test_hf_trainer_under_ddp_gives_the_single_process_result(runs):
    single, ddp = runs["hf_single"], runs["hf_ddp"]
    assert sorted(single) == sorted(ddp) == sorted(HF_OPTIONS)
    for option in HF_OPTIONS:  # scores up to 121; query_rank's differ by up to 5e-4
        assert_same_result(single[option], ddp[option], step=6, rtol=1e-4, atol=1e-3)
    assert single["plain"]["train_ids"].tolist() == list(range(24))  # the Trainer's own training data
    assert single["self_influence"]["self_scores"].shape == (24,)
    assert single["keep_top_scores"]["kept_top_ids"].shape == (4, 8)
    assert not torch.allclose(single["query_rank"]["scores"], single["plain"]["scores"], rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("run", CHECKPOINTING_RUNS)
def test_activation_checkpointing_under_fsdp_gives_the_single_process_result(runs, run):
    """Learning rate 1e-3 (the weights move: checkpointing must not perturb training either); scores
    and self-influence within 1e-4 of the single process's (up to 134; measured 7.6e-5)."""
    single, sharded = runs["checkpointing_single"]["single"], runs["checkpointing_fsdp"][run]
    assert sharded["checkpoint_wrappers"] == (2 if run.endswith("_checkpointed") else 0)  # both linear layers
    assert sharded["layers"] == single["layers"] == ["net.0", "net.2"]  # named without the wrappers
    assert_same_result({key: value for key, value in single.items() if key != "checkpoint_wrappers"},
                       {key: value for key, value in sharded.items() if key != "checkpoint_wrappers"},
                       rtol=1e-4, atol=1e-4)
    assert "self_scores" in single
