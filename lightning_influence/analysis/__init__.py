"""What an influence score distribution looks like, and how it changes between checkpoints.

Pure functions over tensors: no Lightning, no W&B. They reproduce the analyses of Grosse et al.
(2023): power-law tails (:mod:`.tails`), concentration, layer and token distributions
(:mod:`.distribution`), the summary dashboards show (:mod:`.summary`), what is kept of pools too
large for dense scores (:mod:`.sketch`), checkpoint comparison (:mod:`.compare`) and torchmetrics
wrappers (:mod:`.metrics`, imported on demand: it needs torchmetrics).
"""

from lightning_influence.analysis.distribution import (
    SPURIOUS_L2_L1,
    Groups,
    concentration,
    group_layer_names,
    layer_shares,
    result_layer_shares,
    shares_from_sums,
    token_distribution,
)
from lightning_influence.analysis.summary import InfluenceSummary, summarize
from lightning_influence.analysis.tails import PLAUSIBLE_P, PowerLawFit, fit_power_law, fit_query_tails

__all__ = [
    "Groups",
    "InfluenceSummary",
    "PLAUSIBLE_P",
    "PowerLawFit",
    "SPURIOUS_L2_L1",
    "concentration",
    "fit_power_law",
    "fit_query_tails",
    "group_layer_names",
    "layer_shares",
    "result_layer_shares",
    "shares_from_sums",
    "summarize",
    "token_distribution",
]
