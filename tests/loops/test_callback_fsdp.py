"""The Lightning callback under sharded training strategies.

ModelParallelStrategy with FSDP2 (``fully_shard`` in ``configure_model``) trains on 2 CPU processes
(gloo) and gives the scores of the same run under DDP. Both strategies re-run ``sys.argv`` for the
other rank (inside pytest that would be pytest), so both runs are launched as
``tests/fsdp_lightning_script.py`` in subprocesses, side by side. ``strategy="fsdp"`` (FSDP1) needs
a GPU in Lightning: its core path is tested on CPU in ``tests/engine/test_fsdp.py``. DeepSpeed is not
installed here: which of its configurations the callback accepts is tested on stand-in strategies.
"""

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from lightning_influence.loops import trainer as _trainer

SCRIPT = Path(__file__).resolve().parents[1] / "fsdp_lightning_script.py"


def test_fully_shard_under_model_parallel_strategy_matches_ddp(tmp_path):
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    runs = {mode: subprocess.Popen([sys.executable, str(SCRIPT), str(tmp_path / mode), mode], env=env,
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for mode in ("fsdp2", "ddp")}
    for mode, run in runs.items():
        output, _ = run.communicate(timeout=300)
        assert run.returncode == 0, f"{mode} run failed:\n{output[-4000:]}"
    fsdp2, ddp = (torch.load(tmp_path / mode / "summary.pt", weights_only=True) for mode in ("fsdp2", "ddp"))
    assert fsdp2["world_size"] == ddp["world_size"] == 2 and fsdp2["step"] == ddp["step"] == 12
    assert fsdp2["layers"] == ddp["layers"] == ["net.0", "net.2"]
    assert torch.equal(fsdp2["train_ids"], ddp["train_ids"]) and len(fsdp2["train_ids"]) == 33
    torch.testing.assert_close(fsdp2["scores"], ddp["scores"], rtol=1e-3, atol=1e-3)
    assert int(fsdp2["top_ids"][0, 0]) == fsdp2["planted"]  # the planted near-copy of query 0 ranks first


class DeepSpeedStrategy:
    """Stand-in with the attribute the callback reads of Lightning's DeepSpeedStrategy."""

    def __init__(self, config):
        self.config = config


def deepspeed_trainer(stage=None, precision="32-true", accumulate=1, fp16_config=False):
    config = {"zero_optimization": {"stage": stage}} if stage is not None else {}
    if fp16_config:
        config["fp16"] = {"enabled": True}
    return SimpleNamespace(strategy=DeepSpeedStrategy(config), precision_plugin=SimpleNamespace(precision=precision),
                           accumulate_grad_batches=accumulate)


@pytest.mark.parametrize("stage", [None, 0, 1, 2])
def test_deepspeed_zero_stages_without_sharded_parameters_run_as_ddp(stage):
    assert _trainer.unsupported(deepspeed_trainer(stage, precision="bf16-mixed"), None) is None


def test_deepspeed_zero_stage_3_is_refused_pointing_to_fsdp():
    message = _trainer.unsupported(deepspeed_trainer(3), None)
    assert "ZeRO stage 3" in message and "strategy='fsdp'" in message and "ModelParallelStrategy" in message


@pytest.mark.parametrize("trainer, reason", [
    (deepspeed_trainer(2, precision="16-mixed"), "fp16"),
    (deepspeed_trainer(1, fp16_config=True), "fp16"),
    (deepspeed_trainer(2, accumulate=4), "accumulate_grad_batches"),
])
def test_deepspeed_loss_rescaling_the_callback_cannot_see_is_refused(trainer, reason):
    assert reason in _trainer.unsupported(trainer, None)


def test_sharded_strategies_are_accepted():
    for name in ("FSDPStrategy", "ModelParallelStrategy"):
        trainer = SimpleNamespace(strategy=type(name, (), {})())
        assert _trainer.unsupported(trainer, None) is None


def test_hugging_face_fsdp_is_refused_pointing_to_the_supported_paths():
    pytest.importorskip("transformers")
    from lightning_influence.loops import hf

    message = hf._unsupported(SimpleNamespace(n_gpu=1, fsdp="full_shard", deepspeed=None))
    assert "ModelParallelStrategy" in message and "InfluenceSession" in message
