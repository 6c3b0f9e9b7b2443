"""Where reports go: the ``Sink`` protocol and how a logger finds its sink.

A sink shows a finished :class:`~lightning_influence.reporting.report.Report` somewhere (a
dashboard, a file, a message). The publisher turns every logger it is given into a sink: an object
that already is a sink is used as it is; otherwise the registered recognisers are asked, newest
first. W&B and TensorBoard loggers are recognised by class name, so neither package is imported
until such a logger is used; anything else with ``log_metrics(metrics, step)`` gets the scalars.
"""

from __future__ import annotations

from typing import Any, Callable, List, Protocol, Tuple, runtime_checkable

from lightning_influence.reporting.report import Report

__all__ = ["Sink", "register_sink", "make_sink"]


@runtime_checkable
class Sink(Protocol):
    """Shows reports. ``name`` appears in warnings when ``publish`` fails (the sink is then skipped
    for the rest of the run: a sink must never stop training)."""

    name: str

    def publish(self, report: Report) -> None:
        """Show one result's report (called on the publishing thread, in step order)."""


SinkFactory = Callable[[Any, bool], Sink]  # (logger, log_artifacts) -> sink
_RECOGNISERS: List[Tuple[Callable[[Any], bool], SinkFactory]] = []


def register_sink(recognises: Callable[[Any], bool], factory: SinkFactory) -> None:
    """Publish to loggers for which ``recognises(logger)`` holds through ``factory(logger,
    log_artifacts)``. Registered recognisers are asked before the built-in ones."""
    _RECOGNISERS.insert(0, (recognises, factory))


def _class_names(logger: Any) -> set:
    return {cls.__name__ for cls in type(logger).__mro__}


def _is_wandb(logger: Any) -> bool:
    from lightning_influence.reporting.wandb_sink import is_wandb_run

    return "WandbLogger" in _class_names(logger) or is_wandb_run(logger)


def _wandb_sink(logger: Any, log_artifacts: bool) -> Sink:
    from lightning_influence.reporting.wandb_sink import WandbSink

    return WandbSink(logger, log_artifacts=log_artifacts)


def _tensorboard_sink(logger: Any, log_artifacts: bool) -> Sink:
    from lightning_influence.reporting.logger_sink import TensorBoardSink

    return TensorBoardSink(logger)


def _scalar_sink(logger: Any, log_artifacts: bool) -> Sink:
    from lightning_influence.reporting.logger_sink import LoggerSink

    return LoggerSink(logger)


_BUILT_IN: List[Tuple[Callable[[Any], bool], SinkFactory]] = [
    (_is_wandb, _wandb_sink),
    (lambda logger: "TensorBoardLogger" in _class_names(logger), _tensorboard_sink),
    (lambda logger: callable(getattr(logger, "log_metrics", None)), _scalar_sink),
]


def make_sink(logger: Any, *, log_artifacts: bool) -> Sink:
    """The sink that shows reports in ``logger`` (``logger`` itself when it is a sink)."""
    if isinstance(logger, Sink):
        return logger
    for recognises, factory in _RECOGNISERS + _BUILT_IN:
        if recognises(logger):
            return factory(logger, log_artifacts)
    raise TypeError(
        f"cannot publish influence results to {type(logger).__name__}: expected a Lightning logger "
        "(anything with log_metrics(metrics, step)), a wandb run, a Sink (name and publish(report)), "
        "or a logger with a sink registered by lightning_influence.register_sink"
    )
