"""Lightning's activation checkpointing under FSDP, with and without it, in one process group of 2
CPU processes (gloo): ``python tests/checkpointing_fsdp_script.py OUT_DIR``.

- FSDP1: Lightning's ``FSDPStrategy(activation_checkpointing_policy={nn.Linear})``, which wraps each
  linear layer in ``checkpoint_wrapper`` before sharding. Lightning refuses ``FSDPStrategy`` on a CPU
  accelerator (its connector checks the exact class); FSDP itself runs on CPU with gloo, so a
  subclass that is the same strategy skips that check.
- FSDP2: ``ModelParallelStrategy`` with the user's ``checkpoint_wrapper`` on each linear layer
  in ``configure_model``, then ``fully_shard``.

The checkpointed layers' forwards run again during the backward pass (the hooks fire twice per
step); the callback's result must equal the run without checkpointing. Process 0 writes
``OUT_DIR/summary.pt``: per run the result's tensors and the callback's tracked layer names.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pytorch_lightning as pl  # noqa: E402
import torch  # noqa: E402
from pytorch_lightning.strategies import FSDPStrategy, ModelParallelStrategy  # noqa: E402
from torch import nn  # noqa: E402
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper, checkpoint_wrapper  # noqa: E402

import lightning_influence as li  # noqa: E402
from lightning_influence.loops.callback import InfluenceCallback  # noqa: E402
from tests.callback_models import make_module_class, planted_data  # noqa: E402
from tests.ddp_script import UnshuffledData  # noqa: E402
from tests.fsdp_helpers import leave_process_group  # noqa: E402
from tests.matrix_helpers import summary  # noqa: E402

LEARNING_RATE = 1e-3


class CPUFSDPStrategy(FSDPStrategy):
    """Lightning's ``FSDPStrategy`` on the CPU: a subclass, so that the accelerator connector's GPU
    check (``type(strategy) is FSDPStrategy``) lets it run there, whose ``_setup_model`` is
    Lightning's with ``device_id=cpu`` (Lightning passes the device's index, ``None`` on the CPU,
    which FSDP refuses). The activation checkpointing is Lightning's own set-up."""

    def _setup_model(self, model: nn.Module) -> nn.Module:
        from lightning.fabric.strategies.fsdp import _setup_activation_checkpointing
        from torch.distributed.fsdp import FullyShardedDataParallel

        model = FullyShardedDataParallel(module=model, cpu_offload=self.cpu_offload,
                                         mixed_precision=self.mixed_precision_config,
                                         sharding_strategy=self.sharding_strategy, device_id=torch.device("cpu"),
                                         **self.kwargs)
        _setup_activation_checkpointing(model, self._activation_checkpointing_kwargs)
        return model


class Classifier(make_module_class(pl)):
    """The planted classifier; under FSDP2 with the user's own checkpointing and sharding."""

    def __init__(self, fsdp2: bool = False, checkpointing: bool = False) -> None:
        super().__init__(lr=LEARNING_RATE)
        self.fsdp2, self.checkpointing = fsdp2, checkpointing

    def configure_model(self):
        if not self.fsdp2:
            return
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]
        for index, layer in enumerate(self.net):
            if isinstance(layer, nn.Linear):
                self.net[index] = layer = checkpoint_wrapper(layer) if self.checkpointing else layer
                fully_shard(layer, mesh=mesh)
        fully_shard(self.net, mesh=mesh)

    def configure_optimizers(self):  # FSDP1's optimizer must see the sharded parameters
        return torch.optim.SGD(self.trainer.model.parameters(), lr=self.lr, momentum=0.5)


def fit(out: Path, sharding: str, checkpointing: bool):
    pl.seed_everything(0, verbose=False)  # every run starts from the same weights
    train, val, _ = planted_data()
    single = sharding == "single"
    if single:
        strategy = "auto"
    elif sharding == "fsdp2":
        strategy = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)
    else:
        strategy = CPUFSDPStrategy(activation_checkpointing_policy={nn.Linear} if checkpointing else None,
                                   auto_wrap_policy={nn.Linear}, use_orig_params=True)
    callback = InfluenceCallback(li.ClassificationTask(), num_queries=4, every_n_epochs=None,
                                 output_dir=str(out / "influence"), on_checkpoint=False, on_error="raise",
                                 curvature=dict(collect_every_n_steps=1),
                                 scoring=dict(max_train_examples=33, batch_size=16, top_k=3, self_influence=True),
                                 report=dict(mode="off", show_progress=False))
    trainer = pl.Trainer(max_epochs=2, accelerator="cpu", devices=1 if single else 2, strategy=strategy, callbacks=[callback],
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0, default_root_dir=str(out),
                         use_distributed_sampler=False)
    model = Classifier(fsdp2=sharding == "fsdp2", checkpointing=checkpointing)
    trainer.fit(model, UnshuffledData(train, val, batch_size=16 if single else 8))
    wrapped = sum(isinstance(module, CheckpointWrapper) for module in trainer.strategy.model.modules())
    if not trainer.is_global_zero:
        return None
    (result,) = callback.results
    return {**summary(result), "layers": result.layer_names, "checkpoint_wrappers": wrapped}


def main(out: Path, mode: str) -> None:
    if mode == "single":  # the reference: one process, no sharding, no checkpointing
        torch.save({"single": fit(out / "single", "single", False)}, out / "summary.pt")
        return
    saved = {f"{sharding}{'_checkpointed' if checkpointing else ''}": fit(out / f"{sharding}-{checkpointing}",
                                                                            sharding, checkpointing)
             for sharding in ("fsdp2", "fsdp1") for checkpointing in (False, True)}
    if torch.distributed.get_rank() == 0:
        torch.save(saved, out / "summary.pt")
    leave_process_group()  # FSDP1 on gloo: no interpreter finalization (it can abort, or linger, at exit)


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
