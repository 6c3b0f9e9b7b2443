"""A real offline W&B run, read back from disk: scalars, histogram, images, tables, artifacts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("wandb")
pl = pytest.importorskip("pytorch_lightning")

import wandb  # noqa: E402
from tests import wandb_reader  # noqa: E402
from tests.reporting_helpers import LAYERS, PLANTED, decode, make_result, token_dataset  # noqa: E402

from lightning_influence.reporting import DefaultRenderer, ResultPublisher  # noqa: E402


@pytest.fixture(autouse=True)
def _offline(monkeypatch, tmp_path):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("WANDB_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "config"))
    yield
    if wandb.run is not None:
        wandb.finish()


class TinyRegression(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(4, 1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.layer(x), y)
        self.log("train_loss", loss, on_step=True)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


class PublishEachEpoch(pl.Callback):
    """Stands in for the influence callback: a hand-built result per epoch, published on rank 0."""

    def __init__(self, root: Path):
        self.root = root
        self.results, self.summaries = [], []

    def setup(self, trainer, pl_module, stage):
        self.publisher = ResultPublisher(trainer.loggers, renderer=DefaultRenderer(decode=decode), top_k=3, max_queries=2)

    def on_train_epoch_end(self, trainer, pl_module):
        step = trainer.global_step
        result = make_result(step, seed=len(self.results), path=self.root / f"step={step}")
        summary = self.publisher.publish(
            result, step=step, train_dataset=token_dataset(), query_dataset=token_dataset(), history=self.results
        )
        self.results.append(result)
        self.summaries.append(summary)


def _media_file(files_dir: Path, cell: dict) -> Path:
    path = files_dir / cell["path"]
    assert path.is_file(), f"{cell['_type']} not written: {path}"
    return path


def test_offline_wandb_run_holds_scalars_histogram_images_tables_and_artifact(tmp_path):
    pytest.importorskip("lightning_influence.analysis.compare", reason="trajectory plots need compare.trajectory")
    logger = pl.loggers.WandbLogger(offline=True, save_dir=str(tmp_path), project="li-test")
    publish = PublishEachEpoch(tmp_path / "influence")
    data = torch.utils.data.TensorDataset(torch.randn(32, 4), torch.randn(32, 1))
    trainer = pl.Trainer(
        max_epochs=2, logger=logger, callbacks=[publish], log_every_n_steps=1, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
    )
    trainer.fit(TinyRegression(), torch.utils.data.DataLoader(data, batch_size=8))
    files_dir = Path(logger.experiment.dir)
    run_dir = files_dir.parent
    wandb.finish()

    records = wandb_reader.skip_if_unsupported(run_dir)
    rows = wandb_reader.history(records)

    # The step axis: W&B's own step counts calls, the trainer's step never goes backwards.
    assert [r["_step"] for r in rows] == list(range(len(rows)))
    trainer_steps = [r["trainer/global_step"] for r in rows if "trainer/global_step" in r]
    assert trainer_steps == sorted(trainer_steps)
    assert any("train_loss" in r for r in rows), "the trainer's own metrics are logged to the same run"
    metrics = {m.metric.glob_name: m.metric.step_metric for m in records if m.WhichOneof("record_type") == "metric"}
    assert metrics.get("influence/*") == "trainer/global_step"

    influence_rows = [r for r in rows if "influence/tail_alpha" in r]
    assert [r["trainer/global_step"] for r in influence_rows] == [4, 8]
    for row, summary in zip(influence_rows, publish.summaries):
        for name, value in summary.scalars.items():
            assert row[f"influence/{name}"] == pytest.approx(value, rel=1e-9), name
        assert {f"influence/layer_share/{layer}" for layer in LAYERS} <= set(row)
        assert row["influence/scores/_type"] == "histogram"
        assert sum(row["influence/scores/values"]) == 3 * 60  # every score, once
        for figure in ("score_histograms", "layer_shares", "tail/q5", "layer_heatmap/q6"):
            cell = {key.rsplit("/", 1)[1]: row[key] for key in row if key.startswith(f"influence/{figure}/")}
            assert cell["_type"] == "image-file"
            assert _media_file(files_dir, cell).read_bytes().startswith(b"\x89PNG")

    for row, result in zip(influence_rows, publish.results):
        for kind, largest in (("top_examples", True), ("bottom_examples", False)):
            cell = {key.rsplit("/", 1)[1]: row[key] for key in row if key.startswith(f"influence/{kind}/")}
            assert cell["_type"] == "table-file"
            table = json.loads(_media_file(files_dir, cell).read_text())
            columns = table["columns"]
            assert columns == ["query_id", "query", "rank", "train_id", "score", "text", "html", "image"]
            for q, query_id in enumerate(result.query_ids[:2].tolist()):
                shown = [r[3] for r in table["data"] if r[0] == query_id]
                assert shown == result.top_k(3, largest=largest).indices[q].tolist()
        top_table = json.loads(_media_file(files_dir, {"path": row["influence/top_examples/path"]}).read_text())
        assert top_table["data"][0][3] == PLANTED and top_table["data"][0][2] == 1

    # Every logged statistic is defined in the glossary table (logged again when new keys appear).
    glossary_cell = {"path": influence_rows[0]["influence/glossary/path"]}
    glossary = dict(json.loads(_media_file(files_dir, glossary_cell).read_text())["data"])
    for name in publish.summaries[0].scalars:
        assert name in glossary or (name.startswith("layer_share/") and "layer_share/<layer>" in glossary), name
    assert glossary["tail_plausible_fraction"].startswith("Share of queries whose tail is a plausible power law")

    # Trajectory line charts once there is history.
    assert not any(k.startswith("influence/trajectory/") for k in influence_rows[0])
    assert any(k.startswith("influence/trajectory/tail_alpha") for k in influence_rows[1])
    assert not any(k.startswith("influence/trajectory/epoch") for k in influence_rows[1])  # a clock, no panel

    # Media inside tables (the highlighted tokens) live in the tables' own "run_table" artifacts.
    table_artifacts = [a for a in wandb_reader.artifacts(records) if a.type == "run_table" and "examples" in a.name]
    assert len(table_artifacts) == 4  # top and bottom, at two steps
    staged = {e.path: Path(e.local_path) for e in table_artifacts[-1].manifest.contents}
    table_json = next(path for name, path in staged.items() if name.endswith(".table.json"))
    table = json.loads(table_json.read_text())
    html_cell = table["data"][0][table["columns"].index("html")]
    assert html_cell["_type"] == "html-file"
    assert "background-color:rgba(" in staged[html_cell["path"]].read_text()

    logged = [a for a in wandb_reader.artifacts(records) if a.type != "run_table"]
    assert [a.type for a in logged] == ["influence", "influence"]
    assert [set(a.aliases) for a in logged] == [{"step-4", "latest"}, {"step-8", "latest"}]
    paths = {entry.path for entry in logged[-1].manifest.contents}
    assert {"meta.json", "tensors.safetensors", "report/summary.json"} <= paths


def test_raw_wandb_run_gets_the_trainer_step_axis(tmp_path):
    run = wandb.init(mode="offline", dir=str(tmp_path), project="li-test")
    publisher = ResultPublisher([run], log_artifacts=False, max_queries=1)
    run.log({"loss": 1.0})
    run.log({"loss": 0.5})
    publisher.publish(make_result(100, tokens=False), step=100)
    publisher.publish(make_result(50, seed=1, tokens=False), step=200)
    run_dir = Path(run.dir).parent
    wandb.finish()

    records = wandb_reader.skip_if_unsupported(run_dir)
    rows = [r for r in wandb_reader.history(records) if "influence/gini" in r]
    assert [(r["_step"], r["trainer/global_step"]) for r in rows] == [(2, 100), (3, 200)]
    assert not [a for a in wandb_reader.artifacts(records) if a.type == "influence"]
    # Without a train dataset the tables still list the train ids (no example media).
    table_path = Path(run.dir) / rows[0]["influence/top_examples/path"]
    table = json.loads(table_path.read_text())
    assert table["data"][0][3] == PLANTED and table["data"][0][5] == f"train #{PLANTED}"
    assert table["data"][0][6] is None and table["data"][0][7] is None
