"""One result's headline numbers for dashboards, from dense scores or from the sketch kept of a
pool too large for them."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch

from lightning_influence._io import json_ready
from lightning_influence.analysis import sketch as score_sketch
from lightning_influence.analysis.distribution import SPURIOUS_L2_L1, concentration, result_layer_shares, token_distribution
from lightning_influence.analysis.tails import PowerLawFit, fit_query_tails, plausible_fraction

# -- one-call summary ----------------------------------------------------------------------------


@dataclass
class InfluenceSummary:
    """The headline numbers of one influence result, ready for dashboards.

    Attributes:
        scalars: flat names without a namespace (sinks add ``influence/``): ``tail_alpha``,
            ``tail_xmin``, ``tail_ks``, ``tail_n`` (medians over queries of the per-query fits of
            positive scores), ``tail_plausible_fraction`` (the share of fitted queries whose tail is a
            plausible power law: :attr:`PowerLawFit.plausible`), ``tail_alpha_abs``, ``tail_p_value``
            (with bootstrap), ``top1pct_share``, ``top10pct_share``, ``gini``, ``positive_fraction``,
            ``score_abs_mean``, ``score_std``, ``spurious_fraction`` (with token scores),
            ``tail_partial_fraction`` (a result with ``keep_top_scores``: the share of queries
            whose positive scores were not all kept, so that their tail fit may differ from a dense one),
            ``layer_share/<layer>`` (mean over queries, with layer scores). Undefined numbers are
            left out.
        tail_fits: per-query fits of the positive scores (``None`` where impossible).
        layer_shares: ``[Q, L]`` layer shares, if the result has layer scores.
        layer_names: names of the columns of ``layer_shares``.
    """

    scalars: Dict[str, float]
    tail_fits: List[Optional[PowerLawFit]]
    layer_shares: Optional[torch.Tensor]
    layer_names: List[str]

    def to_dict(self) -> Dict[str, Any]:
        """JSON-ready dict (non-finite numbers become ``None``)."""
        return json_ready(
            {
                "scalars": self.scalars,
                "tail_fits": [fit.to_dict() if fit is not None else None for fit in self.tail_fits],
                "layer_shares": self.layer_shares,
                "layer_names": self.layer_names,
            }
        )


def _median(values: Sequence[Optional[float]]) -> float:
    present = [v for v in values if v is not None and math.isfinite(v)]
    return float(np.median(present)) if present else math.nan


def _token_scores_of(result: Any) -> Optional[tuple]:
    """Dense token scores if the result has them, else those kept for the top-k examples."""
    if result.token_scores is not None:
        return result.token_scores, result.token_mask
    top = result.get("top_token_scores")
    if top is not None:
        return top, result.get("top_token_mask")
    return None


def summarize(result: Any, *, bootstrap: int = 0, top_k_layers: Optional[int] = None) -> InfluenceSummary:
    """Headline numbers of an :class:`~lightning_influence.results.InfluenceResult`.

    Never raises on degenerate scores (all zero, too few positives, NaN): the numbers that cannot
    be computed are left out of ``scalars``.

    Args:
        result: the result to summarise.
        bootstrap: bootstrap samples per query for the tail fit's p-value (0: none).
        top_k_layers: compute layer shares over each query's top-k examples only.
    """
    kept = score_sketch.ScoreSketch.of(result) if result.scores is None else None
    if kept is not None:
        fits = score_sketch.tail_fits(kept, "positive", bootstrap=bootstrap)
        abs_fits = score_sketch.tail_fits(kept, "abs", compare_alternatives=False)
    else:
        scores = result.scores.double()
        fits = fit_query_tails(scores, use="positive", bootstrap=bootstrap)
        abs_fits = fit_query_tails(scores, use="abs", compare_alternatives=False)
    plausible = plausible_fraction(fits)
    scalars: Dict[str, float] = {
        "tail_alpha": _median([f.alpha for f in fits if f]),
        "tail_plausible_fraction": math.nan if plausible is None else plausible,  # beside alpha
        "tail_xmin": _median([f.xmin for f in fits if f]),
        "tail_ks": _median([f.ks for f in fits if f]),
        "tail_n": _median([f.n_tail for f in fits if f]),
        "tail_alpha_abs": _median([f.alpha for f in abs_fits if f]),
    }
    if bootstrap > 0:
        scalars["tail_p_value"] = _median([f.p_value for f in fits if f and f.p_value is not None])
    if kept is not None:
        scalars.update(score_sketch.concentration(kept))
        scalars.update(score_sketch.score_spread(kept))
        scalars["tail_partial_fraction"] = float(np.mean(score_sketch.tail_partial(kept)))
    else:
        scalars.update(concentration(scores))
        finite = scores[torch.isfinite(scores)]
        scalars["score_abs_mean"] = float(finite.abs().mean()) if finite.numel() else math.nan
        scalars["score_std"] = float(finite.std()) if finite.numel() > 1 else math.nan
    tokens = _token_scores_of(result)
    if tokens is not None:
        ratio = token_distribution(*tokens)["l2_l1_ratio"]
        defined = ratio[torch.isfinite(ratio)]
        scalars["spurious_fraction"] = float((defined > SPURIOUS_L2_L1).double().mean()) if defined.numel() else math.nan
    staleness = (result.meta.get("curvature") or {}).get("staleness")
    if staleness is not None:  # of the training-time covariances, before any refresh
        scalars["curvature_staleness"] = float(staleness)
    shares = result_layer_shares(result, top_k_layers)
    if shares is not None:
        mean_shares = shares.nanmean(0)
        for name, share in zip(result.layer_names, mean_shares.tolist()):
            scalars[f"layer_share/{name}"] = share
    return InfluenceSummary(
        scalars={key: float(value) for key, value in scalars.items() if math.isfinite(value)},
        tail_fits=fits,
        layer_shares=shares,
        layer_names=list(result.layer_names) if shares is not None else [],
    )

