"""The ready-made callback configurations in ``callbacks/`` build working callbacks.

LightningCLI files go through a real ``LightningCLI`` (``--trainer.callbacks=<file>``, exactly as a
user passes them), Hydra files through ``hydra.utils.instantiate``. Every key must be a real
argument of ``InfluenceCallback`` and carry a comment; the two formats of one configuration must
agree; and one configuration per task kind trains a real model with influence computed.
"""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

pl = pytest.importorskip("pytorch_lightning")
hydra_utils = pytest.importorskip("hydra.utils")
pytest.importorskip("jsonargparse")

from omegaconf import OmegaConf  # noqa: E402
from pytorch_lightning.cli import LightningCLI  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

import lightning_influence as li  # noqa: E402
from tests.tiny_models import TinyTransformer, TokenData, classification_data  # noqa: E402

ROOT = Path(__file__).resolve().parents[1] / "callbacks"
CLI_FILES = sorted((ROOT / "lightning_cli").glob("*.yaml"))
HYDRA_FILES = sorted((ROOT / "hydra").glob("*.yaml"))
EXPECTED = {"classification", "language_model", "monitoring", "ekfac_per_token"}
PARAMETERS = set(inspect.signature(li.InfluenceCallback.__init__).parameters) - {"self"}
GROUPS = ("curvature", "scoring", "report")
TASK_CLASSES = {"classification": li.ClassificationTask, "causal_lm": li.CausalLMTask,
                "regression": li.RegressionTask}


class TinyClassifier(pl.LightningModule):
    """Six features, four classes; a mean cross-entropy loss."""

    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 4))

    def forward(self, x):
        return self.net(x.float())

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self(batch[0]), batch[1])

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", F.cross_entropy(self(batch[0]), batch[1]))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        return DataLoader(classification_data(32), batch_size=8)

    def val_dataloader(self):
        return DataLoader(classification_data(2, seed=1), batch_size=8)


class TinyLM(pl.LightningModule):
    """A one-block causal transformer with a Hugging Face-style loss (mean over labelled tokens)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = TinyTransformer()

    def forward(self, input_ids, attention_mask=None):
        return self.net(input_ids, attention_mask)

    def training_step(self, batch, batch_idx):
        logits = self(batch["input_ids"], batch["attention_mask"])[:, :-1]
        labels = batch["labels"][:, 1:].masked_fill(batch["attention_mask"][:, 1:] == 0, -100)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)

    def validation_step(self, batch, batch_idx):
        pass

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        return DataLoader(TokenData(16), batch_size=4)

    def val_dataloader(self):
        return DataLoader(TokenData(2, seed=1), batch_size=4)


@pytest.fixture(autouse=True)
def _bare_argv(monkeypatch):
    """LightningCLI(args=...) warns when sys.argv holds pytest's own arguments."""
    monkeypatch.setattr("sys.argv", ["train.py"])


def _keys(path: Path) -> dict:
    """The callback's keyword arguments in a file of either format."""
    data = yaml.safe_load(path.read_text())
    return dict(data["init_args"]) if "class_path" in data else {k: v for k, v in data.items() if k != "_target_"}


def _cli_callback(path: Path, model_class=TinyClassifier, extra=()):
    cli = LightningCLI(model_class, args=[f"--trainer.callbacks={path}", "--trainer.logger=false", *extra],
                       run=False, save_config_callback=None)
    found = [cb for cb in cli.trainer.callbacks if isinstance(cb, li.InfluenceCallback)]
    assert len(found) == 1, f"{path.name}: expected one InfluenceCallback, got {cli.trainer.callbacks}"
    return cli, found[0]


def _check_applied(callback, keys: dict, name: str) -> None:
    """Every configured value reached the callback (tasks by their built-in class)."""
    for key, value in keys.items():
        if key == "task":
            assert type(callback.task) is TASK_CLASSES[value], name
            continue
        if key in GROUPS:  # a group as a mapping: each of its fields reached the group's dataclass
            for field, expected in value.items():
                actual = getattr(getattr(callback.config, key), field)
                assert (list(actual) if isinstance(actual, tuple) else actual) == expected, f"{name}: {key}.{field}"
            continue
        actual = getattr(callback.config, key)
        assert (list(actual) if isinstance(actual, tuple) else actual) == value, f"{name}: {key}"


def test_every_common_case_has_both_formats():
    assert {p.stem for p in CLI_FILES} >= EXPECTED
    assert {p.stem for p in CLI_FILES} == {p.stem for p in HYDRA_FILES}


@pytest.mark.parametrize("path", CLI_FILES + HYDRA_FILES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_key_is_a_parameter_and_commented(path):
    keys = _keys(path)
    unknown = set(keys) - PARAMETERS
    assert not unknown, f"{path}: {sorted(unknown)} are not InfluenceCallback arguments"
    lines = path.read_text().splitlines()
    for number, line in enumerate(lines):
        match = re.match(r"\s*([A-Za-z_]+):", line)
        if not match or match.group(1) not in keys:
            continue
        previous = next((lines[i].strip() for i in range(number - 1, -1, -1) if lines[i].strip()), "")
        assert "#" in line or previous.startswith("#"), f"{path}:{number + 1}: `{match.group(1)}` has no comment"


@pytest.mark.parametrize("path", CLI_FILES, ids=lambda p: p.name)
def test_lightning_cli_file_builds_the_callback(path):
    model_class = TinyLM if _keys(path)["task"] == "causal_lm" else TinyClassifier
    _, callback = _cli_callback(path, model_class)
    _check_applied(callback, _keys(path), path.name)


@pytest.mark.parametrize("path", HYDRA_FILES, ids=lambda p: p.name)
def test_hydra_file_builds_the_callback(path):
    callback = hydra_utils.instantiate(OmegaConf.load(path))
    assert isinstance(callback, li.InfluenceCallback)
    _check_applied(callback, _keys(path), path.name)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_both_formats_agree(name):
    assert _keys(ROOT / "lightning_cli" / f"{name}.yaml") == _keys(ROOT / "hydra" / f"{name}.yaml")


def test_a_misspelt_key_is_refused(tmp_path):
    """The checks above can fail: both tools reject an argument the callback does not have."""
    source = (ROOT / "lightning_cli" / "classification.yaml").read_text()
    bad = tmp_path / "bad.yaml"
    bad.write_text(source.replace("  top_k: 10", "  top_kk: 10"))
    with pytest.raises((SystemExit, ValueError)):  # a group's unknown field: at parsing, or naming it when built
        _cli_callback(bad)
    node = OmegaConf.load(ROOT / "hydra" / "classification.yaml")
    node.scoring.top_kk = 10
    with pytest.raises(Exception, match="top_kk"):
        hydra_utils.instantiate(node)


@pytest.mark.parametrize("name, model_class, epochs, overrides", [
    # K-FAC, EMA window, sparse collection, low-rank queries; the pool subset must fit 32 examples
    ("monitoring", TinyClassifier, 5, ["--trainer.callbacks.init_args.scoring.max_train_examples=24"]),
    # true Fisher, float64, whole-pool correction, on_error=raise
    ("ekfac_per_token", TinyLM, 1, []),
])
def test_config_trains_and_computes_influence(tmp_path, name, model_class, epochs, overrides):
    cli, callback = _cli_callback(
        ROOT / "lightning_cli" / f"{name}.yaml", model_class,
        extra=[*overrides, f"--trainer.max_epochs={epochs}", f"--trainer.default_root_dir={tmp_path}",
               "--trainer.enable_checkpointing=false", "--trainer.enable_progress_bar=false",
               "--trainer.enable_model_summary=false"],
    )
    cli.trainer.fit(cli.model)
    results = callback.results
    assert results, f"{name}: no influence result was computed"
    last = results[-1]
    pool = callback.config.scoring.max_train_examples or len(cli.model.train_dataloader().dataset)
    assert last.scores.shape == (2, pool)
    assert torch.isfinite(last.scores).all()
    assert (Path(last.path) / "factors").is_dir()
    if name == "ekfac_per_token":
        assert last.get("top_token_scores") is not None  # per-token scores of the top examples
        assert last.meta["fisher"] == "true"
