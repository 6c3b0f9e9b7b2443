"""``ResultPublisher``: the one place a result goes from scores to files on disk and dashboards.

The callback and the command line both call :meth:`ResultPublisher.publish` (on rank 0 only).
Files on disk come first and never depend on a logger: a logger that fails is warned about once
and skipped from then on, so a flaky network or an exhausted quota never stops a training run.
"""

from __future__ import annotations

import json
import warnings
import weakref
from pathlib import Path
from typing import Any, Iterable, List, Optional, Sequence

from lightning_influence._io import json_ready, write_file_atomic
from lightning_influence.compare import Analysis, RunAnalysis
from lightning_influence.reporting.render import DefaultRenderer, ExampleRenderer, RenderedExample, render_example
from lightning_influence.reporting.report import Report, build_report

__all__ = ["ResultPublisher", "REPORT_DIR", "SUMMARY_FILE"]

REPORT_DIR = "report"
SUMMARY_FILE = "summary.json"


def figure_file_name(name: str) -> str:
    """File name of figure ``name`` inside the report directory (``tail/q3`` -> ``tail_q3.png``)."""
    return name.replace("/", "_") + ".png"


def make_sink(logger: Any, *, log_artifacts: bool):
    """The sink that knows how to show a report in ``logger``.

    Recognises Lightning's ``WandbLogger`` and ``TensorBoardLogger`` (from ``lightning.pytorch``
    or ``pytorch_lightning``) and raw ``wandb`` runs by class name, so neither package is imported
    here; any other object with ``log_metrics(metrics, step)`` gets the scalars.
    """
    from lightning_influence.reporting.logger_sink import LoggerSink, TensorBoardSink
    from lightning_influence.reporting.wandb_sink import WandbSink, is_wandb_run

    class_names = {cls.__name__ for cls in type(logger).__mro__}
    if "WandbLogger" in class_names or is_wandb_run(logger):
        return WandbSink(logger, log_artifacts=log_artifacts)
    if "TensorBoardLogger" in class_names:
        return TensorBoardSink(logger)
    if callable(getattr(logger, "log_metrics", None)):
        return LoggerSink(logger)
    raise TypeError(
        f"cannot publish influence results to {type(logger).__name__}: expected a Lightning logger "
        "(anything with log_metrics(metrics, step)) or a wandb run"
    )


class ResultPublisher:
    """Writes an influence result's report to disk and to every logger, failure-isolated.

    Args:
        loggers: Lightning loggers (e.g. ``trainer.loggers``) and/or raw ``wandb`` runs.
        renderer: ``render(example, token_scores=None, token_mask=None) -> RenderedExample | str``
            used to show training examples and queries in tables; default: :class:`DefaultRenderer`.
        top_k: rows per query in the top-k and bottom-k example tables.
        log_artifacts: log each result directory as a W&B artifact of type ``influence``.
        namespace: prefix of every logged key.
        write_files: write ``<result.path>/report/`` (figures and ``summary.json``).
        max_queries: the first ``max_queries`` queries get tables and per-query figures (all
            queries count in the scalars).
        heatmap_examples: columns (most influential examples) of the layer heatmap.
    """

    def __init__(
        self,
        loggers: Iterable[Any] = (),
        *,
        renderer: Optional[ExampleRenderer] = None,
        top_k: int = 5,
        log_artifacts: bool = True,
        namespace: str = "influence",
        write_files: bool = True,
        max_queries: int = 4,
        heatmap_examples: int = 20,
    ) -> None:
        if top_k < 1 or max_queries < 1 or heatmap_examples < 1:
            raise ValueError(
                f"top_k, max_queries and heatmap_examples must be positive, got {top_k}, {max_queries}, "
                f"{heatmap_examples}"
            )
        self.renderer = renderer if renderer is not None else DefaultRenderer()
        self.top_k = top_k
        self.namespace = namespace.strip("/")
        self.write_files = write_files
        self.max_queries = max_queries
        self.heatmap_examples = heatmap_examples
        self._sinks = [make_sink(logger, log_artifacts=log_artifacts) for logger in loggers]
        self._failed: set = set()  # indices of sinks that raised once and are skipped since
        self._render_warned = False
        self._run = RunAnalysis()
        self._analysed: List[Any] = []  # identities of the results in self._run, oldest first

    def publish(
        self,
        result: Any,
        *,
        step: int,
        train_dataset: Any = None,
        query_dataset: Any = None,
        history: Sequence[Any] = (),
    ) -> Any:
        """Analyse ``result``, write its report next to it, and log it to every working logger.

        Args:
            result: an ``InfluenceResult``; with ``result.path`` set (saved), the report is written
                to ``result.path / "report"`` before any logger is called, so it is complete
                whatever the loggers do, and the W&B artifact includes it.
            step: the trainer's global step; all loggers use it as their x axis.
            train_dataset: indexable by ``result.train_ids``, to show the examples themselves.
            query_dataset: indexable by ``result.query_ids``.
            history: the run's results so far, oldest first, for trajectory plots; it may end with
                ``result`` itself. Only results this publisher has not analysed yet are analysed.

        Returns:
            The ``analysis.InfluenceSummary`` of ``result``.

        Raises:
            ValueError: if ``history`` and ``result`` come from different training runs.
        """
        analysis = self._analyse(history, result)
        summary = analysis.summary

        def render(kind: str, index: int, token_scores, token_mask) -> RenderedExample:
            dataset = train_dataset if kind == "train" else query_dataset
            return self._render(dataset, kind, index, token_scores, token_mask)

        report = build_report(
            analysis,
            step=step,
            namespace=self.namespace,
            render=render,
            top_k=self.top_k,
            max_queries=self.max_queries,
            heatmap_examples=self.heatmap_examples,
        )
        if self.write_files and result.path is not None:
            self._write_files(Path(result.path) / REPORT_DIR, report, summary)
        for index, sink in enumerate(self._sinks):
            if index in self._failed:
                continue
            try:
                sink.publish(report)
            except Exception as err:  # noqa: BLE001 - a logger must never stop training
                self._failed.add(index)
                where = f"; the report is saved under {result.path}" if result.path is not None else ""
                warnings.warn(
                    f"lightning-influence: logging influence results to {sink.name} failed "
                    f"({type(err).__name__}: {err}){where}. This logger is skipped from now on.",
                    RuntimeWarning,
                    stacklevel=2,
                )
        return summary

    def _analyse(self, history: Sequence[Any], result: Any) -> Analysis:
        """The analysis of ``history`` then ``result``, analysing only results not seen before.

        The callback passes a growing history: each call adds one result to the kept analysis. A
        history that does not extend the analysed one (another run, or a publisher reused without
        history) starts over.
        """
        if history and _identity(history[-1]) == _identity(result):
            history = history[:-1]  # the history already ends with the result (a loaded copy of it)
        run = [*history, result]
        identities = [_identity(member) for member in run]
        if identities[: len(self._analysed)] != self._analysed:
            self._run, self._analysed = RunAnalysis(), []
        for member, identity in zip(run[len(self._analysed) :], identities[len(self._analysed) :]):
            self._run.add(member)
            self._analysed.append(identity)
        return self._run.latest

    def _render(self, dataset: Any, kind: str, index: int, token_scores, token_mask) -> RenderedExample:
        """Render one example; a failing dataset or renderer degrades to the id, with one warning."""
        label = f"{kind} #{index}"
        if dataset is None:
            return RenderedExample(text=label)
        try:
            rendered = render_example(self.renderer, dataset[index], token_scores, token_mask)
        except Exception as err:  # noqa: BLE001 - a bad renderer must not lose the report
            if not self._render_warned:
                self._render_warned = True
                warnings.warn(
                    f"lightning-influence: rendering {label} failed ({type(err).__name__}: {err}); "
                    "tables show example ids instead.",
                    RuntimeWarning,
                    stacklevel=3,
                )
            return RenderedExample(text=label)
        rendered.text = f"{label}: {rendered.text}"
        return rendered

    def _write_files(self, directory: Path, report: Report, summary: Any) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        figure_files = {}
        for name, png in report.pngs.items():
            figure_files[name] = figure_file_name(name)
            write_file_atomic(directory / figure_files[name], png)
        payload = {
            "step": report.step,
            "epoch": report.epoch,
            "namespace": report.namespace,
            **summary.to_dict(),
            "scalars": report.scalars,  # what every logger got, monitors included
            "figures": figure_files,
            "top_examples": [row.to_dict() for row in report.top_rows],
            "bottom_examples": [row.to_dict() for row in report.bottom_rows],
            **{f"{name}_examples": [row.to_dict() for row in rows] for name, rows in report.tables.items()},
            "trajectory": report.trajectory,
        }
        text = json.dumps(json_ready(payload), indent=2, sort_keys=True, allow_nan=False)
        write_file_atomic(directory / SUMMARY_FILE, text.encode("utf-8"))

    @property
    def active_loggers(self) -> List[str]:
        """Names of the loggers that have not failed."""
        return [sink.name for i, sink in enumerate(self._sinks) if i not in self._failed]


def _identity(result: Any) -> Any:
    """What makes two result objects the same result: the directory of a saved one, else the
    object itself (a weak reference, so forgotten results are not kept in memory)."""
    return str(Path(result.path).resolve()) if result.path is not None else weakref.ref(result)
