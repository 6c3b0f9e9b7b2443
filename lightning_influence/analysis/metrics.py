"""torchmetrics wrappers of the analyses that must stream over chunks or reduce across processes.

Scores are computed chunk by chunk over the training pool, possibly split across ranks. These
metrics keep only what reduces exactly: sums of absolute layer scores (``dist_reduce_fx="sum"``)
or the scores themselves, concatenated along the training axis (``dist_reduce_fx="cat"``).
"""

from __future__ import annotations

from typing import Dict, Optional

import torch
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from lightning_influence.analysis.distribution import Groups, shares_from_sums, concentration


class LayerShare(Metric):
    """Each layer's share of every query's influence, streamed over chunks of training examples.

    Equals :func:`~lightning_influence.analysis.layer_shares` over all examples seen (without
    ``top_k``, which needs every example's total score first).

    Args:
        groups: depth blocks, as for :func:`~lightning_influence.analysis.layer_shares`.
        num_queries, num_layers: shape of the state; give both under distributed training so that
            every rank holds a state of the same shape even before its first update.
        **kwargs: passed to :class:`torchmetrics.Metric`.

    Example:
        >>> metric = LayerShare()
        >>> for chunk in torch.randn(3, 2, 100).split(25, dim=2):
        ...     metric.update(chunk)
        >>> metric.compute().shape
        torch.Size([2, 3])
    """

    is_differentiable = False
    higher_is_better = None
    full_state_update = False

    def __init__(
        self,
        groups: Optional[Groups] = None,
        num_queries: Optional[int] = None,
        num_layers: Optional[int] = None,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.groups = groups
        if num_queries is not None and num_layers is not None:
            default = torch.zeros(num_queries, num_layers, dtype=torch.float64)
        else:  # takes its shape from the first update
            default = torch.tensor(0.0, dtype=torch.float64)
        self.add_state("abs_sums", default=default, dist_reduce_fx="sum")

    def update(self, layer_scores: torch.Tensor) -> None:
        """Add a chunk ``[L, Q, n]`` of per-layer scores for ``n`` more training examples."""
        if layer_scores.dim() != 3:
            raise ValueError(f"layer_scores must be [L, Q, n], got shape {tuple(layer_scores.shape)}")
        self.abs_sums = self.abs_sums + layer_scores.detach().abs().sum(2).T.to(torch.float64)

    def compute(self) -> torch.Tensor:
        """``[Q, L]`` (or ``[Q, G]``) shares whose rows sum to 1 (NaN rows: no influence)."""
        if self.abs_sums.dim() != 2:
            raise RuntimeError("LayerShare.compute() called before any update()")
        return shares_from_sums(self.abs_sums, self.groups)


class InfluenceConcentration(Metric):
    """Concentration of positive influence (top-1%/10% shares, Gini, positive fraction), streamed.

    Equals :func:`~lightning_influence.analysis.concentration` of all scores seen, concatenated
    along the training axis.

    Example:
        >>> metric = InfluenceConcentration()
        >>> for chunk in torch.randn(4, 1000).split(100, dim=1):
        ...     metric.update(chunk)
        >>> sorted(metric.compute())
        ['gini', 'positive_fraction', 'top10pct_share', 'top1pct_share']
    """

    is_differentiable = False
    higher_is_better = None
    full_state_update = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        # stored as [n, Q] so that the "cat" reduction (along dim 0) joins training examples
        self.add_state("scores", default=[], dist_reduce_fx="cat")

    def update(self, scores: torch.Tensor) -> None:
        """Add the scores ``[Q, n]`` (or ``[n]`` for one query) of ``n`` more training examples."""
        if scores.dim() not in (1, 2):
            raise ValueError(f"scores must be [n] or [Q, n], got shape {tuple(scores.shape)}")
        scores = scores.detach()
        self.scores.append(scores[:, None] if scores.dim() == 1 else scores.T)

    def compute(self) -> Dict[str, float]:
        """The concentration dict (means over queries for several queries)."""
        if isinstance(self.scores, list) and not self.scores:
            raise RuntimeError("InfluenceConcentration.compute() called before any update()")
        return concentration(dim_zero_cat(self.scores).T)
