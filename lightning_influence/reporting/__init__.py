"""Sinks for influence results: plots, files on disk, W&B and other Lightning loggers.

``ResultPublisher`` is the entry point; ``plots`` and ``render`` are reusable on their own (the
static HTML report uses them too). Nothing here imports wandb, Lightning or TensorBoard until a
logger of that kind is actually used.
"""

from lightning_influence.reporting.publisher import ResultPublisher
from lightning_influence.reporting.render import DefaultRenderer, ExampleRenderer, RenderedExample, highlight_tokens
from lightning_influence.reporting.sinks import Sink, register_sink

__all__ = ["DefaultRenderer", "ExampleRenderer", "RenderedExample", "ResultPublisher", "Sink", "highlight_tokens", "register_sink"]
