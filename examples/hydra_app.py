"""Compose the influence callback with Hydra / OmegaConf.

Everything the run needs is a config node under ``conf/``: data, model, logger and trainer are
built by ``hydra.utils.instantiate`` from their ``_target_``, and so is the callback — either from a
``_target_`` file (``conf/influence/digits.yaml``, the default) or from plain fields checked
against the structured config ``li.InfluenceConfig`` (``conf/influence/typed.yaml``: a typo or a
wrong type fails when the config is composed, before anything is built). Override anything
from the command line:

    python examples/hydra_app.py
    python examples/hydra_app.py influence=typed trainer.max_epochs=3 influence.num_queries=32
    python examples/hydra_app.py --cfg job          # print the composed config
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
import pytorch_lightning as pl
import torch
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

import lightning_influence as li

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # conf/ names classes of digits_flipped_labels

# `defaults: [schema]` in a config of the influence group types it as li.InfluenceConfig.
ConfigStore.instance().store(group="influence", name="schema", node=li.InfluenceConfig)


def build_callback(node: DictConfig) -> li.InfluenceCallback:
    """A node with ``_target_`` is instantiated by Hydra; a plain (typed) node goes through
    ``li.InfluenceCallback.from_config``, which validates every field."""
    if "_target_" in node:
        return hydra.utils.instantiate(node)
    return li.InfluenceCallback.from_config(node)


@hydra.main(version_base=None, config_path=str(HERE / "conf"), config_name="config")
def main(cfg: DictConfig) -> None:
    """Train the flipped-label digits classifier with the composed callback."""
    torch.set_num_threads(cfg.threads)
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    data = hydra.utils.instantiate(cfg.data)
    model = hydra.utils.instantiate(cfg.model)
    influence = build_callback(cfg.influence)
    trainer = hydra.utils.instantiate(cfg.trainer, callbacks=[influence], logger=hydra.utils.instantiate(cfg.logger))
    trainer.fit(model, datamodule=data)
    run_dir = HydraConfig.get().runtime.output_dir
    print(f"\ncomposed config : {Path(run_dir) / '.hydra' / 'config.yaml'}")
    print(f"influence       : {[str(result.path) for result in influence.results]}")
    print(OmegaConf.to_yaml(cfg.influence))


if __name__ == "__main__":
    main()
