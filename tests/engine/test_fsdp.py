"""Sharded training (FSDP2 ``fully_shard``, FSDP1 ``FullyShardedDataParallel``) on 2 CPU processes
(gloo): statistics from the training steps, factors and scores equal a single process that saw every
batch. The pool is split unevenly (49 and 48 examples: 4 and 3 batches, for scoring and the
eigenvalue correction), and a pool of one leaves a process without any example: every process
still runs as many forward/backward passes as the others (the model's collectives need them), or
the run would fail or hang. The streaming pool's run refreshes stale layers as one process does: its
correction examples are halved by their place in the stream, whatever the number of processes."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

import lightning_influence as li
from tests import fsdp_helpers


@pytest.fixture(scope="module")
def single_process(tmp_path_factory):
    return fsdp_helpers.run(tmp_path_factory.mktemp("single") / "summary.pt", world=1)


@pytest.mark.parametrize("sharding, shard_factors", [("fully_shard", False), ("FullyShardedDataParallel", False),
                                                     ("fully_shard", True), ("FullyShardedDataParallel", True)])
def test_sharded_training_matches_a_single_process(tmp_path, single_process, sharding, shard_factors):
    """With ``shard_factors`` each process runs the correction passes of its own layers, and a
    streaming pool splits into shares of unknown length: every process must still run the same
    forward/backward passes (the model's collectives pair them up)."""
    sharded = fsdp_helpers.run(tmp_path / "summary.pt", world=2, sharding=sharding, shard_factors=shard_factors)
    assert sharded["world_size"] == 2
    # The same layers under their unwrapped names, the Conv1D included (FSDP2 makes it FSDPConv1D).
    assert sharded["layers"] == single_process["layers"] == ["0", "2", "4"]
    for key, value in single_process["covariances"].items():
        torch.testing.assert_close(sharded["covariances"][key], value, rtol=1e-4, atol=1e-4, msg=key)
    for name, value in single_process["eigenvalues"].items():
        torch.testing.assert_close(sharded["eigenvalues"][name], value, rtol=1e-3, atol=1e-6, msg=name)
    assert torch.equal(sharded["train_ids"], single_process["train_ids"]) and len(sharded["train_ids"]) == 97
    torch.testing.assert_close(sharded["scores"], single_process["scores"], rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(sharded["low_rank"], single_process["low_rank"], rtol=1e-3, atol=1e-3)
    assert sharded["forwards"][0] == sharded["forwards"][1] > 0
    assert torch.equal(sharded["streamed_ids"], single_process["streamed_ids"]) and len(sharded["streamed_ids"]) == 97
    torch.testing.assert_close(sharded["streamed"], single_process["streamed"], rtol=1e-3, atol=1e-3)
    if shard_factors:
        torch.testing.assert_close(sharded["last_layer"], single_process["last_layer"], rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(sharded["layer_abs_sums"], single_process["layer_abs_sums"], rtol=1e-3, atol=1e-3)
    assert torch.equal(sharded["top_ids"], single_process["top_ids"])
    assert int(sharded["top_ids"][0, 0]) == single_process["planted"]
    assert sharded["one_example"].shape == (4, 1)
    torch.testing.assert_close(sharded["one_example"], single_process["one_example"], rtol=1e-3, atol=1e-3)


def test_layers_are_named_as_in_the_unwrapped_model():
    """PyTorch's wrappers (checkpoint_wrapper here, FullyShardedDataParallel likewise) insert a
    module into the path; layers, include patterns and saved factors use the user's own names."""
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 3))
    wrapped = nn.Sequential(checkpoint_wrapper(plain[0]), plain[1], plain[2])
    assert "0._checkpoint_wrapped_module" in dict(wrapped.named_modules())
    assert [layer.name for layer in li.select_layers(wrapped)] == ["0", "2"]
    (first,) = li.select_layers(wrapped, layers=["0"])
    assert first.module is plain[0]


def test_layer_sizes_come_from_the_module_not_its_weight():
    """Under FSDP the weight is a flat shard between forward passes: sizes must not be read from it."""
    layer, = li.select_layers(nn.Sequential(nn.Linear(5, 3)))
    conv, = li.select_layers(nn.Sequential(nn.Conv2d(4, 6, kernel_size=(3, 2), bias=False)))
    layer.module.weight = nn.Parameter(torch.zeros(8))  # what FSDP1 leaves on a rank between forwards
    conv.module.weight = nn.Parameter(torch.zeros(0))
    assert (layer.d_out, layer.d_in) == (3, 6) and (conv.d_out, conv.d_in) == (6, 24)


def test_results_name_the_model_class_inside_wrappers():
    """A run's identity (which results may be compared) is the same with and without FSDP wrappers."""
    from torch.distributed.fsdp import FSDPModule

    plain = nn.Sequential(nn.Linear(2, 3))
    sharded = nn.Sequential(nn.Linear(2, 3))
    sharded.__class__ = type("FSDPSequential", (FSDPModule, nn.Sequential), {})  # what fully_shard does
    wrapped = nn.Module()
    wrapped._checkpoint_wrapped_module = plain
    ids = torch.arange(3)
    identity = li.results.run_identity(plain, li.ClassificationTask(), ids, "run")
    assert li.results.run_identity(sharded, li.ClassificationTask(), ids, "run") == identity
    assert li.results.run_identity(wrapped, li.ClassificationTask(), ids, "run") == identity
