"""``ResultPublisher``: the one place a result goes from scores to files on disk and dashboards.

The callback and the command line both call :meth:`ResultPublisher.publish` (on rank 0 only).
Files on disk come first and never depend on a logger: a logger that fails is warned about once
and skipped from then on, so a flaky network or an exhausted quota never stops a training run.

With ``background=True`` the figures are drawn and the report directory written by one worker
thread, so ``publish`` returns once the numbers and tables are ready. The loggers are still called
on the publishing thread (logger objects are not thread-safe), when a report is complete: at the
next ``publish`` / :meth:`~ResultPublisher.deliver_ready` call or at :meth:`~ResultPublisher.flush`,
always in publishing order.
"""

from __future__ import annotations

import json
import warnings
import weakref
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Deque, Iterable, List, Optional, Sequence

from lightning_influence._io import json_ready, write_file_atomic
from lightning_influence.analysis.compare import Analysis, RunAnalysis
from lightning_influence.reporting.render import DefaultRenderer, ExampleRenderer, RenderedExample, render_example
from lightning_influence.reporting.report import Report, build_report
from lightning_influence.reporting.sinks import make_sink

__all__ = ["ResultPublisher", "REPORT_DIR", "SUMMARY_FILE"]

REPORT_DIR = "report"
SUMMARY_FILE = "summary.json"
DELIVERED_FILE = "delivered.json"  # written once every logger was given the report: a resumed run owes the rest


WORKER_NAME = "lightning-influence-report"


@dataclass
class _PendingReport:
    """A report whose figures and files the worker is completing, to log once they are done."""

    report: Report
    done: Future


def figure_file_name(name: str) -> str:
    """File name of figure ``name`` inside the report directory (``tail/q3`` -> ``tail_q3.png``)."""
    return name.replace("/", "_") + ".png"


class ResultPublisher:
    """Writes an influence result's report to disk and to every logger, failure-isolated.

    Args:
        loggers: Lightning loggers (e.g. ``trainer.loggers``), raw ``wandb`` runs and/or
            :class:`~lightning_influence.reporting.sinks.Sink` objects.
        renderer: ``render(example, token_scores=None, token_mask=None) -> RenderedExample | str``
            used to show training examples and queries in tables; default: :class:`DefaultRenderer`.
        top_k: rows per query in the top-k and bottom-k example tables.
        log_artifacts: log each result directory as a W&B artifact of type ``influence``.
        namespace: prefix of every logged key.
        write_files: write ``<result.path>/report/`` (figures and ``summary.json``).
        max_queries: the first ``max_queries`` queries get tables and per-query figures (all
            queries count in the scalars).
        heatmap_examples: columns (most influential examples) of the layer heatmap.
        background: draw the figures and write the report directory on a worker thread; the
            loggers get each report when it is complete (see the module docstring). Call
            :meth:`flush` when done publishing (e.g. at the end of training).
        max_pending: reports published but not yet logged, at most (background only): a
            ``publish`` beyond it waits for the oldest, so a slow worker holds back the caller
            instead of piling up reports in memory.
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
        background: bool = False,
        max_pending: int = 2,
    ) -> None:
        if top_k < 1 or max_queries < 1 or heatmap_examples < 1 or max_pending < 1:
            raise ValueError(
                f"top_k, max_queries, heatmap_examples and max_pending must be positive, got {top_k}, "
                f"{max_queries}, {heatmap_examples}, {max_pending}"
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
        self._run = RunAnalysis(k=top_k)
        self._analysed: List[Any] = []  # identities of the results in self._run, oldest first
        self.background = background
        self.max_pending = max_pending
        self._worker: Optional[ThreadPoolExecutor] = None  # started at the first background publish
        self._pending: Deque[_PendingReport] = deque()  # oldest first

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
            The ``analysis.InfluenceSummary`` of ``result``. In the background, the report of
            ``result`` is logged later (loggers get earlier reports here, as they complete).

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
            draw=False,
        )
        directory = Path(result.path) / REPORT_DIR if self.write_files and result.path is not None else None
        if not self.background:
            self._complete(report, summary, directory)
            self._log(report)
            return summary
        while len(self._pending) >= self.max_pending:
            self._deliver_oldest()  # waits for the worker: memory stays bounded
        if self._worker is None:
            self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix=WORKER_NAME)
        self._pending.append(_PendingReport(report, self._worker.submit(self._complete, report, summary, directory)))
        self.deliver_ready()
        return summary

    def deliver_ready(self) -> None:
        """Log the reports the worker has completed, oldest first, stopping at the first still in
        progress (so loggers always see the steps in order). Never waits."""
        while self._pending and self._pending[0].done.done():
            self._deliver_oldest()

    def flush(self) -> None:
        """Wait for every pending report, log them in order and end the worker thread (a later
        ``publish`` starts a new one). Call at the end of training, also after an exception."""
        try:
            while self._pending:
                self._deliver_oldest()
        finally:
            if self._worker is not None:
                self._worker.shutdown(wait=True)
                self._worker = None

    @property
    def pending(self) -> int:
        """Reports published but not yet logged."""
        return len(self._pending)

    def _deliver_oldest(self) -> None:
        """Wait for the oldest pending report and log it; a report the worker could not complete
        is warned about and logged without its figures."""
        pending = self._pending.popleft()
        error = pending.done.exception()
        if error is not None:
            where = f"; the result is saved under {pending.report.result_path}" if pending.report.result_path else ""
            warnings.warn(
                f"lightning-influence: completing the influence report of step {pending.report.step} in the "
                f"background failed ({type(error).__name__}: {error}){where}. Loggers get its numbers and "
                "tables without figures; training continues.",
                RuntimeWarning,
                stacklevel=3,
            )
        self._log(pending.report)

    def _complete(self, report: Report, summary: Any, directory: Optional[Path]) -> None:
        """The slow part of publishing: draw the figures, write the report directory."""
        report.draw_figures()
        if directory is not None:
            self._write_files(directory, report, summary)

    @staticmethod
    def delivered(result: Any) -> bool:
        """Whether the report of the saved ``result`` was completed and given to the loggers (a
        process killed before that owes it: see ``LoopInfluence.publish_owed_reports``)."""
        return result.path is not None and (Path(result.path) / REPORT_DIR / DELIVERED_FILE).is_file()

    def _log(self, report: Report) -> None:
        self._log_to_sinks(report)
        if self.write_files and report.result_path is not None:
            directory = Path(report.result_path) / REPORT_DIR
            directory.mkdir(exist_ok=True)
            write_file_atomic(directory / DELIVERED_FILE, json.dumps(
                {"step": report.step, "loggers": self.active_loggers}).encode("utf-8"))

    def _log_to_sinks(self, report: Report) -> None:
        for index, sink in enumerate(self._sinks):
            if index in self._failed:
                continue
            try:
                sink.publish(report)
            except Exception as err:  # noqa: BLE001 - a logger must never stop training
                self._failed.add(index)
                where = f"; the report is saved under {report.result_path}" if report.result_path is not None else ""
                warnings.warn(
                    f"lightning-influence: logging influence results to {sink.name} failed "
                    f"({type(err).__name__}: {err}){where}. This logger is skipped from now on.",
                    RuntimeWarning,
                    stacklevel=3,
                )

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
            self._run, self._analysed = RunAnalysis(k=self.top_k), []
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
