"""lightning-influence: EK-FAC influence functions for PyTorch Lightning training runs.

Public names only; see README.md for a tour.
"""

from lightning_influence._io import FormatError
from lightning_influence.factors import CovarianceStatistics, Factors, fit_factors, load_factors
from lightning_influence.results import InfluenceResult, aggregate, load_results
from lightning_influence.scoring import compute_influence, compute_self_influence
from lightning_influence.tasks import CausalLMTask, ClassificationTask, RegressionTask, Task
from lightning_influence.tracking import TrackingError, select_layers

__version__ = "0.1.0"

__all__ = [
    "CausalLMTask",
    "ClassificationTask",
    "CovarianceStatistics",
    "Factors",
    "FormatError",
    "InfluenceResult",
    "RegressionTask",
    "Task",
    "TrackingError",
    "aggregate",
    "compute_influence",
    "compute_self_influence",
    "fit_factors",
    "load_factors",
    "load_results",
    "select_layers",
]
