"""lightning-influence: EK-FAC influence functions for PyTorch Lightning training runs.

Public names only; see README.md for a tour and docs/ (mkdocs) for the documentation.
"""

from lightning_influence import analysis
from lightning_influence._io import FormatError
from lightning_influence.analysis.summary import InfluenceSummary, summarize
from lightning_influence.analysis.tails import PowerLawFit, fit_power_law
from lightning_influence.engine.collector import StepStatistics
from lightning_influence.analysis.compare import Comparison, RunAnalysis, compare, trajectory
from lightning_influence.config import CurvatureConfig, InfluenceConfig, ReportConfig, ScoringConfig
from lightning_influence.engine.factors import Factors, load_factors
from lightning_influence.engine.fitting import fit_factors
from lightning_influence.engine.statistics import CovarianceStatistics
from lightning_influence.reporting import DefaultRenderer, RenderedExample, ResultPublisher, Sink, register_sink
from lightning_influence.analysis.aggregate import aggregate
from lightning_influence.results import InfluenceResult, check_same_run, load_results
from lightning_influence.engine.memory_plan import MemoryPlan, plan_memory
from lightning_influence.engine.scoring import compute_influence, compute_self_influence
from lightning_influence.checkpoint.session import InfluenceSession
from lightning_influence.tasks import CausalLMTask, ClassificationTask, RegressionTask, Task
from lightning_influence.engine.tracking import TrackingError, select_layers

__version__ = "0.1.0"

__all__ = [
    "CausalLMTask",
    "ClassificationTask",
    "Comparison",
    "DefaultRenderer",
    "CovarianceStatistics",
    "Factors",
    "FormatError",
    "InfluenceCallback",
    "InfluenceConcentration",
    "InfluenceConfig",
    "CurvatureConfig",
    "ScoringConfig",
    "ReportConfig",
    "InfluenceResult",
    "InfluenceSession",
    "InfluenceSummary",
    "LayerShare",
    "MemoryPlan",
    "PowerLawFit",
    "RegressionTask",
    "RenderedExample",
    "ResultPublisher",
    "RunAnalysis",
    "Sink",
    "StepStatistics",
    "Task",
    "TrackingError",
    "aggregate",
    "analysis",
    "check_same_run",
    "compare",
    "compute_influence",
    "compute_self_influence",
    "fit_factors",
    "fit_power_law",
    "load_factors",
    "load_results",
    "register_sink",
    "metrics",
    "plan_memory",
    "select_layers",
    "summarize",
    "trajectory",
    "write_html_report",
]


_LAZY = {  # heavy imports (Lightning, matplotlib, torchmetrics) only when asked for
    "InfluenceCallback": ("lightning_influence.loops.callback", "InfluenceCallback"),
    "write_html_report": ("lightning_influence.reporting.html", "write_html_report"),
    "metrics": ("lightning_influence.analysis.metrics", None),
    "LayerShare": ("lightning_influence.analysis.metrics", "LayerShare"),
    "InfluenceConcentration": ("lightning_influence.analysis.metrics", "InfluenceConcentration"),
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        module_name, attribute = _LAZY[name]
        module = importlib.import_module(module_name)
        return module if attribute is None else getattr(module, attribute)
    raise AttributeError(f"module 'lightning_influence' has no attribute {name!r}")
