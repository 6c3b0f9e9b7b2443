"""Weights & Biases sink: scalars, histogram, figures, example tables, trajectories, artifacts.

Step convention (the same as Lightning's ``WandbLogger``): W&B's own step counts ``log`` calls
and must never go backwards, so it is never passed; the trainer's step is logged as the metric
``trainer/global_step`` and declared the x axis of every ``<namespace>/*`` key with
``define_metric``. Influence results then line up with the training curves, whatever else the
run logs in between.
"""

from __future__ import annotations

import inspect
import re
import sys
from typing import Any, Dict, List

from lightning_influence.reporting.glossary import glossary_rows
from lightning_influence.reporting.plots import NOT_PLOTTED
from lightning_influence.reporting.report import ExampleRow, Report

__all__ = ["STEP_METRIC", "WandbSink", "is_wandb_run"]

STEP_METRIC = "trainer/global_step"
# Media get their own typed columns: W&B serialises media in a table only in a column of one type.
TABLE_COLUMNS = ["query_id", "query", "rank", "train_id", "score", "text", "html", "image"]


def is_wandb_run(obj: Any) -> bool:
    """Whether ``obj`` is a raw ``wandb`` run (checked without importing wandb)."""
    wandb = sys.modules.get("wandb")
    run_class = getattr(wandb, "Run", None) or getattr(getattr(getattr(wandb, "sdk", None), "wandb_run", None), "Run", None)
    return run_class is not None and isinstance(obj, run_class)


def _html(wandb: Any, markup: str) -> Any:
    # wandb >= 0.19 reads a str as a file path unless told otherwise; older versions lack the flag.
    if "data_is_not_path" in inspect.signature(wandb.Html.__init__).parameters:
        return wandb.Html(markup, data_is_not_path=True)
    return wandb.Html(markup)


class WandbSink:
    """Logs a :class:`Report` to a Lightning ``WandbLogger`` or a raw ``wandb`` run.

    Args:
        target: the logger or run.
        log_artifacts: log the result directory as an artifact of type ``influence`` aliased
            ``step-<N>`` and ``latest``.
    """

    def __init__(self, target: Any, *, log_artifacts: bool = True) -> None:
        self.target = target
        self.log_artifacts = log_artifacts
        self.name = type(target).__name__
        self._axis_defined_for = None
        self._explained: set = set()  # keys the logged glossary already defines

    def _run(self) -> Any:
        return self.target if is_wandb_run(self.target) else self.target.experiment

    def publish(self, report: Report) -> None:
        import wandb

        run = self._run()
        if self._axis_defined_for != report.namespace:
            run.define_metric(STEP_METRIC)
            run.define_metric(report.key("*"), step_metric=STEP_METRIC)
            self._axis_defined_for = report.namespace
        payload: Dict[str, Any] = {report.key(name): value for name, value in report.scalars.items()}
        if report.scores.size:
            payload[report.key("scores")] = wandb.Histogram(report.scores)
        for name in report.pngs:
            payload[report.key(name)] = wandb.Image(report.image(name), caption=f"{name} at step {report.step}")
        for name, values in report.histograms.items():
            if values.size:
                payload[report.key(name)] = wandb.Histogram(values)
        for name, rows in (("top_examples", report.top_rows), ("bottom_examples", report.bottom_rows),
                           *report.tables.items()):
            if rows:
                payload[report.key(name)] = self._table(wandb, rows)
        if report.trajectory:
            payload.update(self._trajectory_charts(wandb, report))
        glossary = self._glossary(wandb, report, payload)
        if glossary is not None:
            payload[report.key("glossary")] = glossary
        payload[STEP_METRIC] = report.step
        run.log(payload)
        if self.log_artifacts and report.result_path is not None:
            self._log_artifact(wandb, run, report)

    def _glossary(self, wandb: Any, report: Report, payload: Dict[str, Any]) -> Any:
        """A ``metric | meaning`` table of every logged key, whenever new keys appear (W&B panels
        take no description from the API, so the definitions travel as a table beside them)."""
        keys = [key for key in payload if key.startswith(report.key(""))]
        rows = glossary_rows(keys)
        if {name for name, _ in rows} <= self._explained:
            return None
        self._explained.update(name for name, _ in rows)
        return wandb.Table(columns=["metric", "meaning"], data=[list(row) for row in rows])

    @staticmethod
    def _table(wandb: Any, rows: List[ExampleRow]) -> Any:
        data = [
            [
                row.query_id,
                row.query.text,
                row.rank,
                row.train_id,
                row.score,
                row.example.text,
                _html(wandb, row.example.html) if row.example.html is not None else None,
                wandb.Image(row.example.image) if row.example.image is not None else None,
            ]
            for row in rows
        ]
        return wandb.Table(columns=TABLE_COLUMNS, data=data)

    @staticmethod
    def _trajectory_charts(wandb: Any, report: Report) -> Dict[str, Any]:
        """One line chart per statistic over the checkpoints so far (one shared table)."""
        trajectory = report.trajectory
        stats = [key for key in trajectory if key not in NOT_PLOTTED]
        data = [list(row) for row in zip(trajectory["step"], *(trajectory[key] for key in stats))]
        table = wandb.Table(columns=["step", *stats], data=data, allow_mixed_types=True)
        return {
            report.key(f"trajectory/{stat}"): wandb.plot.line(table, "step", stat, title=f"{stat} over training")
            for stat in stats
        }

    @staticmethod
    def _log_artifact(wandb: Any, run: Any, report: Report) -> None:
        name = re.sub(r"[^A-Za-z0-9_.-]", "-", f"{report.namespace or 'influence'}-{run.id}")
        artifact = wandb.Artifact(name, type="influence", metadata={"step": report.step, "epoch": report.epoch})
        artifact.add_dir(str(report.result_path))
        run.log_artifact(artifact, aliases=[f"step-{report.step}", "latest"])
