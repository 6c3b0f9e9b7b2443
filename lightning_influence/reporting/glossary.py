"""One definition of every number the reports show: the HTML report's tooltips and glossary, the
W&B glossary table and the documentation's metrics page all read it from here.

A key may carry a parameter after ``@`` (``topk_churn@10``: the churn of the top-10 lists) and a
namespace or group before the name (``influence/drift/topk_churn@10``, ``layer_share/<layer>``):
:func:`describe` finds the definition of any key the library logs and fills its parameter in.
"""

from __future__ import annotations

import re
from typing import Dict, List, Optional, Tuple

__all__ = ["DEFINITIONS", "describe", "glossary_rows", "split_key"]

_TAIL_FIT = ("median over queries of the power-law fit (Clauset-Shalizi-Newman maximum likelihood) "
             "to the top of each query's positive scores")

# name -> definition; "{k}" stands for the key's parameter (the size of the top-k lists).
DEFINITIONS: Dict[str, str] = {
    "tail_alpha": (f"Tail exponent α: {_TAIL_FIT}. Smaller α means a heavier tail (a few training examples "
                   "hold more of the influence); the paper found 2 to 4.3 on a 52B model. Read it with "
                   "tail_plausible_fraction: where the power law is not plausible, α only describes the "
                   "slope of a heavy tail."),
    "tail_plausible_fraction": ("Share of queries whose tail is a plausible power law: neither a log-normal nor "
                                "an exponential tail fits significantly better (log-likelihood ratio below 0 "
                                "with Vuong p < 0.1) and, when a bootstrap ran, its goodness-of-fit p exceeds "
                                "0.1. Low values: call the tails heavy, not power laws."),
    "tail_xmin": f"Score where the fitted tail starts ({_TAIL_FIT}); chosen to minimise the KS distance.",
    "tail_ks": ("Kolmogorov-Smirnov distance between each query's tail and its fitted power law, median over "
                "queries: 0 is a perfect fit; compare it with about 1/√(tail_n)."),
    "tail_n": "Number of positive scores in each query's fitted tail (at or above xmin), median over queries.",
    "tail_alpha_abs": "As tail_alpha, fitted to the absolute values of all scores (helpful and harmful together).",
    "tail_p_value": ("Bootstrap goodness-of-fit p-value of the power-law fit, median over queries (only when a "
                     "bootstrap ran): above 0.1 the power law is plausible."),
    "tail_partial_fraction": ("Share of queries whose positive scores were not all kept (keep_top_scores), so "
                              "their tail fit uses only the kept top scores."),
    "top1pct_share": ("Share of the positive influence held by the top 1% of training examples, mean over "
                      "queries (12-52% on the paper's 22B model)."),
    "top10pct_share": "Share of the positive influence held by the top 10% of training examples, mean over queries.",
    "gini": ("Gini coefficient of the positive part of the scores, mean over queries: 0 when every example "
             "helps equally, near 1 when one example holds everything."),
    "positive_fraction": "Fraction of scores above zero (training examples that help the query), mean over queries.",
    "score_abs_mean": ("Mean |score| over every query and training example: the scale of the scores, which "
                       "depends on the loss, the model and the damping (compare it within one run only)."),
    "score_std": "Standard deviation of all scores (the scale, like score_abs_mean).",
    "spurious_fraction": ("Share of the top examples whose influence sits on one or two tokens (tokenwise L2/L1 "
                          "ratio above 2/3, the paper's flag for likely spurious matches)."),
    "curvature_staleness": ("How stale the covariances collected during training are at the scored weights, mean "
                            "over layers: the fraction of the curvature (fresh covariances of the correction "
                            "examples) that falls off the diagonal of the training-time eigenbasis, 0 (exact) to 1. "
                            "A few hundred fresh examples alone leave some off the diagonal too (fresh_staleness in the "
                            "result's curvature metadata); layers staler than that get fresh covariances "
                            "(curvature.refresh='auto')."),
    "layer_share/<layer>": ("Share of |score| carried by this layer, |s_layer| / Σ_layers |s_layer|, mean over "
                            "queries: where in depth the influence flows."),
    "epoch": "Training epoch at which the checkpoint's influence was computed.",
    "scores": ("Histogram of every score, each divided by its query's mean |score|, so that no query's scale "
               "hides the others (the report's figure shows one histogram per query instead)."),
    "max_top1_share": ("Over queries, the largest share of one query's positive influence held by a single "
                       "training example (1.0: one example alone supports the query, memorisation)."),
    "spearman_prev": ("Mean over queries of the Spearman rank correlation of the scores with the previous "
                      "checkpoint's (1: the ranking did not change)."),
    "topk_churn": ("1 − the Jaccard overlap of each query's top-{k} training examples with the previous "
                   "checkpoint's, mean over queries (0: the same top-{k}; 1: all new)."),
    "drift/spearman": "spearman_prev, logged at each computation from the second on.",
    "drift/topk_jaccard": ("Jaccard overlap of each query's top-{k} training examples with the previous "
                           "computation's, mean over queries (1 − drift/topk_churn@{k})."),
    "drift/topk_churn": ("1 − the Jaccard overlap of each query's top-{k} training examples with the previous "
                         "computation's, mean over queries (0: the same top-{k}; 1: all new)."),
    "drift/tail_alpha_change": "Change of tail_alpha since the previous computation.",
    "drift/top1pct_share_change": "Change of top1pct_share since the previous computation.",
    "drift/layer_js": ("Jensen-Shannon divergence (bits) between the mean layer shares of this and the previous "
                       "computation: 0 when influence flows through the layers as before, at most 1."),
    "self/max": "Highest self-influence score (an example scored on itself): the strongest mislabel or memorisation candidate.",
    "self/median": "Median self-influence score, the scale against which self/max stands out.",
    "self/top_share": "Share of the positive self-influence held by the top-{k} examples.",
    "self/topk_churn": ("1 − the Jaccard overlap of the top-{k} self-influence examples with the previous "
                        "computation's."),
    "Spearman": "Rank correlation of one query's scores at the two checkpoints (1: same ranking).",
    "Kendall tau-b": "Rank correlation counting concordant pairs of training examples (1: same ranking).",
    "Jaccard": "Overlap of the two top-k lists: shared examples / examples in either list.",
    "RBO (p=0.9)": ("Rank-biased overlap of the two top-k lists: like Jaccard, weighting agreement at the top "
                    "of the lists more (Webber et al. 2010)."),
    "alpha": "Power-law exponent of this query's tail (smaller: heavier).",
    "± s.e.": "Standard error of alpha: (alpha − 1) / √(tail size).",
    "xmin": "Score where this query's fitted tail starts.",
    "KS": "Kolmogorov-Smirnov distance between this query's tail and the fitted power law (0: perfect).",
    "n tail": "Number of positive scores at or above xmin.",
    "tail verdict": ("Whether the power law is plausible: 'heavy tail, power law not supported (lognormal "
                     "favoured)' when a log-normal (or exponential) tail fits significantly better."),
    "lognormal R (p)": ("Log-likelihood ratio of power law against log-normal over the tail (positive favours "
                        "the power law) and Vuong's p-value of its sign."),
    "exponential R (p)": ("Log-likelihood ratio of power law against exponential over the tail (positive "
                          "favours the power law) and Vuong's p-value of its sign."),
    "score": ("Influence of the training example on the query: positive, up-weighting it makes the query's "
              "target more likely (it helps); negative, it hurts. Additive over examples, layers and tokens."),
}

_PARAMETER = re.compile(r"^(?P<name>.*?)@(?P<value>[^/@]+)$")


def split_key(key: str) -> Tuple[str, Optional[str]]:
    """``(name, parameter)`` of a logged key: ``"influence/drift/topk_churn@10"`` gives
    ``("drift/topk_churn", "10")``; the namespace ``influence/`` and a ``trajectory/`` prefix go."""
    for prefix in ("influence/", "trajectory/"):
        key = key[len(prefix):] if key.startswith(prefix) else key
    match = _PARAMETER.match(key)
    return (match["name"], match["value"]) if match else (key, None)


def describe(key: str) -> Optional[str]:
    """The definition of a logged key (its parameter filled in), or ``None`` for an unknown key."""
    name, parameter = split_key(key)
    if name.startswith("layer_share/"):
        name = "layer_share/<layer>"
    text = DEFINITIONS.get(name)
    if text is None:
        return None
    return text.replace("{k}", parameter if parameter is not None else "k")


def glossary_rows(keys: List[str]) -> List[Tuple[str, str]]:
    """``(key, definition)`` for each known key, in the given order, each name once (one row for
    all ``layer_share/<layer>`` keys)."""
    rows, seen = [], set()
    for key in keys:
        name, parameter = split_key(key)
        shown = "layer_share/<layer>" if name.startswith("layer_share/") else \
            name if parameter is None else f"{name}@{parameter}"
        text = describe(key)
        if text is not None and shown not in seen:
            seen.add(shown)
            rows.append((shown, text))
    return rows
