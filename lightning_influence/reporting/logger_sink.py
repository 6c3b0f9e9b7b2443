"""Sinks for Lightning loggers other than W&B: scalars everywhere, more where TensorBoard allows."""

from __future__ import annotations

from typing import Any, List

from lightning_influence._format import format_number
from lightning_influence.reporting.report import ExampleRow, Report

__all__ = ["LoggerSink", "TensorBoardSink"]


class LoggerSink:
    """Any Lightning logger (CSV, MLflow, Neptune, ...): the scalars via ``log_metrics``."""

    def __init__(self, logger: Any) -> None:
        self.logger = logger
        self.name = type(logger).__name__

    def publish(self, report: Report) -> None:
        self.logger.log_metrics({report.key(name): value for name, value in report.scalars.items()}, step=report.step)
        # Loggers such as CSVLogger buffer rows; flush so the numbers are on disk now, not at teardown.
        save = getattr(self.logger, "save", None)
        if callable(save):
            save()


def _markdown_table(rows: List[ExampleRow]) -> str:
    lines = ["| query | rank | train id | score | example |", "|---|---|---|---|---|"]
    for row in rows:
        cells = [row.query.text, str(row.rank), str(row.train_id), format_number(row.score), row.example.text]
        lines.append("| " + " | ".join(cell.replace("|", "\\|").replace("\n", " ") for cell in cells) + " |")
    return "\n".join(lines)


class TensorBoardSink(LoggerSink):
    """Lightning's ``TensorBoardLogger``: scalars, a score histogram, figures and example tables."""

    def publish(self, report: Report) -> None:
        super().publish(report)
        writer = self.logger.experiment
        if report.scores.size:  # empty for a result with keep_top_scores
            writer.add_histogram(report.key("scores"), report.scores, global_step=report.step)
        for name in report.pngs:
            writer.add_image(report.key(name), report.image(name), global_step=report.step, dataformats="HWC")
        for name, values in report.histograms.items():
            if values.size:
                writer.add_histogram(report.key(name), values, global_step=report.step)
        for name, rows in (("top_examples", report.top_rows), ("bottom_examples", report.bottom_rows),
                           *report.tables.items()):
            if rows:
                writer.add_text(report.key(name), _markdown_table(rows), global_step=report.step)
        writer.flush()
