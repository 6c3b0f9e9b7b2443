"""Per-query score sketches: what the analyses need from a pool too large for dense ``[Q, N]`` scores.

A :class:`ScoreSketch` is filled batch by batch and never holds more than ``O(Q·(M + B + bins))``:

- per query the ``M`` largest and ``M`` smallest finite scores with their example ids (merged per
  batch with ``torch.topk`` on the concatenation). The power-law tail fit of the positive scores
  reads only values at or above its ``xmin`` (and the top ``M`` of ``|s|`` lie in the union of
  the two lists), but searches ``xmin`` among all values: from a sketch it searches the kept
  ones, which gives the dense fit whenever every positive score was kept, and in practice once the
  kept scores hold the dense fit's whole tail;
- exact running moments: counts of finite and of positive scores, ``Σs``, ``Σ|s|``, ``Σs²`` and
  ``Σ max(s, 0)`` (positive fraction, mean magnitude, standard deviation, total positive influence);
- a fixed histogram of ``log2 |s|`` per sign (counts and exact sums per bin) for what depends on
  the whole distribution — the Gini coefficient and top-share of the examples that were not kept,
  each bin standing in for its values by their mean (bins are a quarter octave wide).

Non-finite scores (examples or queries with non-finite gradients, NaN) are left out everywhere,
as the dense analyses leave them out. Plain PyTorch: no Lightning, W&B or reporting import.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from lightning_influence.analysis.tails import fit_power_law

# log2 |s| histogram: quarter-octave bins over [2^-64, 2^64); values beyond land in the end bins.
BINS_PER_OCTAVE = 4
LOWEST_OCTAVE = -64
HIGHEST_OCTAVE = 64
NUM_BINS = (HIGHEST_OCTAVE - LOWEST_OCTAVE) * BINS_PER_OCTAVE

# Columns of ``moments [Q, 6]`` (float64).
MOMENTS = ("count", "positive_count", "sum", "abs_sum", "square_sum", "positive_sum")

# The result fields a sketch is stored as (see ``results._TENSOR_FIELDS``).
SKETCH_FIELDS = ("kept_top_scores", "kept_top_ids", "kept_bottom_scores", "kept_bottom_ids", "score_moments",
                 "score_histogram_counts", "score_histogram_sums")


def _bins(magnitudes: Tensor) -> Tensor:
    """Histogram bin of each positive magnitude."""
    octaves = torch.log2(magnitudes.double()) - LOWEST_OCTAVE
    return (octaves * BINS_PER_OCTAVE).floor().clamp(0, NUM_BINS - 1).long()


class ScoreSketch:
    """Per query, the ``keep`` most positive and most negative scores with their ids, exact moments
    and a log-magnitude histogram (see the module docstring). Ids are whatever :meth:`update` is
    given: positions in a pass, or dataset ids once :meth:`relabel` has mapped them."""

    def __init__(self, num_queries: int, keep: int) -> None:
        if keep < 1:
            raise ValueError(f"keep_top_scores must be a positive number of scores per query, got {keep}")
        self.keep = keep
        self.top_values = torch.empty(num_queries, 0)
        self.top_ids = torch.empty(num_queries, 0, dtype=torch.long)
        self.bottom_values = torch.empty(num_queries, 0)
        self.bottom_ids = torch.empty(num_queries, 0, dtype=torch.long)
        self.moments = torch.zeros(num_queries, len(MOMENTS), dtype=torch.float64)
        self.histogram_counts = torch.zeros(num_queries, 2, NUM_BINS, dtype=torch.float64)
        self.histogram_sums = torch.zeros(num_queries, 2, NUM_BINS, dtype=torch.float64)

    @property
    def num_queries(self) -> int:
        return self.moments.shape[0]

    # -- filling -------------------------------------------------------------------------------------
    def update(self, scores: Tensor, ids: Tensor) -> None:
        """Add a batch: ``scores [Q, B]`` (NaN where not finite) of the examples ``ids [B]``."""
        scores = scores.detach().float().cpu()
        ids = torch.as_tensor(ids).long().cpu()
        finite = torch.isfinite(scores)
        values = scores.double().masked_fill(~finite, 0.0)
        self.moments += torch.stack([finite.double().sum(1), (values > 0).double().sum(1), values.sum(1),
                                     values.abs().sum(1), values.square().sum(1), values.clamp_min(0).sum(1)], 1)
        nonzero = values != 0
        slot = (values < 0).long() * NUM_BINS + _bins(values.abs().clamp_min(1e-300))
        self.histogram_counts.view(self.num_queries, -1).scatter_add_(1, slot, nonzero.double())
        self.histogram_sums.view(self.num_queries, -1).scatter_add_(1, slot, values.abs())
        expanded = ids.expand_as(scores)
        self.top_values, self.top_ids = self._kept(self.top_values, self.top_ids, scores, expanded, finite, True)
        self.bottom_values, self.bottom_ids = self._kept(self.bottom_values, self.bottom_ids, scores, expanded,
                                                         finite, False)

    def _kept(self, values: Tensor, ids: Tensor, new_values: Tensor, new_ids: Tensor, finite: Tensor,
              largest: bool) -> tuple:
        """The ``keep`` extreme finite scores of the kept ones and a batch; padding is ``∓inf`` / id -1."""
        fill = -math.inf if largest else math.inf
        candidates = torch.cat([values, new_values.masked_fill(~finite, fill)], 1)
        candidate_ids = torch.cat([ids, new_ids.masked_fill(~finite, -1)], 1)
        found = torch.topk(candidates, min(self.keep, candidates.shape[1]), dim=1, largest=largest)
        return found.values, candidate_ids.gather(1, found.indices)

    def relabel(self, ids: Tensor) -> None:
        """Replace position ids ``0..N-1`` by ``ids[position]`` (padding stays -1)."""
        ids = torch.as_tensor(ids).long()
        for name in ("top_ids", "bottom_ids"):
            kept = getattr(self, name)
            setattr(self, name, torch.where(kept >= 0, ids[kept.clamp_min(0)], -1))

    @classmethod
    def merge(cls, sketches: Sequence["ScoreSketch"]) -> "ScoreSketch":
        """One sketch of the union of disjoint sets of examples (e.g. every process's share)."""
        merged = cls(sketches[0].num_queries, sketches[0].keep)
        for part in sketches:
            merged.moments += part.moments
            merged.histogram_counts += part.histogram_counts
            merged.histogram_sums += part.histogram_sums
            for largest, side in ((True, "top"), (False, "bottom")):
                values, ids = getattr(part, f"{side}_values"), getattr(part, f"{side}_ids")
                kept = merged._kept(getattr(merged, f"{side}_values"), getattr(merged, f"{side}_ids"),
                                    values, ids, ids >= 0, largest)
                setattr(merged, f"{side}_values", kept[0])
                setattr(merged, f"{side}_ids", kept[1])
        return merged

    # -- storage -------------------------------------------------------------------------------------
    def fields(self) -> Dict[str, Tensor]:
        """The result fields this sketch is stored as (:data:`SKETCH_FIELDS`)."""
        return dict(zip(SKETCH_FIELDS, (self.top_values, self.top_ids, self.bottom_values, self.bottom_ids,
                                        self.moments, self.histogram_counts, self.histogram_sums)))

    @classmethod
    def from_fields(cls, fields: Dict[str, Tensor]) -> "ScoreSketch":
        sketch = cls(fields["score_moments"].shape[0], max(1, fields["kept_top_scores"].shape[1]))
        (sketch.top_values, sketch.top_ids, sketch.bottom_values, sketch.bottom_ids, sketch.moments,
         sketch.histogram_counts, sketch.histogram_sums) = (fields[name] for name in SKETCH_FIELDS)
        return sketch

    @classmethod
    def of(cls, result) -> Optional["ScoreSketch"]:
        """The sketch a result holds instead of dense scores, or ``None``."""
        if result.get("score_moments") is None:
            return None
        return cls.from_fields({name: result.get(name) for name in SKETCH_FIELDS})

    def rows(self, queries: Tensor) -> "ScoreSketch":
        """The sketch of some queries only (positions)."""
        part = ScoreSketch(len(queries), self.keep)
        for name in ("top_values", "top_ids", "bottom_values", "bottom_ids", "moments", "histogram_counts",
                     "histogram_sums"):
            setattr(part, name, getattr(self, name)[queries])
        return part

    # -- what the analyses read ----------------------------------------------------------------------
    def moment(self, name: str) -> Tensor:
        return self.moments[:, MOMENTS.index(name)]

    def kept_positive(self, query: int) -> Tensor:
        """The kept positive scores of one query (at most ``keep``), float64."""
        values = self.top_values[query].double()
        return values[torch.isfinite(values) & (values > 0)]

    def kept_magnitudes(self, query: int) -> Tensor:
        """The ``keep`` largest ``|s|`` of one query, from the union of both kept lists (by id)."""
        values = torch.cat([self.top_values[query], self.bottom_values[query]]).double()
        ids = torch.cat([self.top_ids[query], self.bottom_ids[query]])
        present = ids >= 0
        values, ids = values[present], ids[present]
        _, first = np.unique(ids.numpy(), return_index=True)
        magnitudes = values[torch.as_tensor(first)].abs()
        return magnitudes.topk(min(self.keep, len(magnitudes))).values

    def all_positives_kept(self, query: int) -> bool:
        return len(self.kept_positive(query)) >= int(self.moment("positive_count")[query])

    def positive_profile(self, query: int) -> tuple:
        """One query's positive scores in ascending order as ``(values, multiplicities)``: the
        examples that were not kept as one value per histogram bin (the bin's mean), then the kept
        positive scores exactly. Exact when every positive score was kept."""
        kept = self.kept_positive(query)
        counts = self.histogram_counts[query, 0].clone()
        sums = self.histogram_sums[query, 0].clone()
        if len(kept):
            slot = _bins(kept)
            counts.scatter_add_(0, slot, -torch.ones_like(kept))
            sums.scatter_add_(0, slot, -kept)
        counts = counts.round().clamp_min(0)
        rest = counts > 0
        means = sums[rest].clamp_min(0) / counts[rest]
        values = torch.cat([means, kept.flip(0)])
        multiplicities = torch.cat([counts[rest], torch.ones_like(kept)])
        return values.numpy(), multiplicities.numpy()


# -- analyses ------------------------------------------------------------------------------------------


def tail_fits(sketch: ScoreSketch, use: str = "positive", **kwargs) -> List:
    """Per-query power-law fits (as :func:`~lightning_influence.analysis.fit_query_tails`) from the
    kept scores; ``n`` is the exact number of positive (``use="positive"``) or non-zero scores. A fit
    equals the dense one when every positive score was kept, and in practice once the kept scores
    hold the dense fit's whole tail (see :func:`tail_partial`)."""
    if use not in ("positive", "abs"):
        raise ValueError(f"use must be 'positive' or 'abs', got {use!r}")
    fits = []
    for query in range(sketch.num_queries):
        values = sketch.kept_positive(query) if use == "positive" else sketch.kept_magnitudes(query)
        try:
            fit = fit_power_law(values, **kwargs)
        except ValueError:
            fits.append(None)
            continue
        if use == "positive":
            total = int(sketch.moment("positive_count")[query])
        else:
            total = int(sketch.histogram_counts[query].sum().round())
        fits.append(dataclasses.replace(fit, n=max(total, fit.n)))
    return fits


def tail_partial(sketch: ScoreSketch) -> List[bool]:
    """Per query: not every positive score was kept, so its tail fit searched ``xmin`` among the
    kept scores only and may differ from the dense fit (which can choose a lower ``xmin``; measured
    on digits, a fit equals the dense one once the kept scores hold its whole tail)."""
    return [not sketch.all_positives_kept(query) for query in range(sketch.num_queries)]


def concentration(sketch: ScoreSketch) -> Dict[str, float]:
    """:func:`~lightning_influence.analysis.concentration` from a sketch (mean over queries): the
    positive fraction exactly; the top shares exactly when the top 1% / 10% were kept; the Gini
    coefficient exactly when every positive score was kept, else from the histogram."""
    rows = [_concentration_of(sketch, query) for query in range(sketch.num_queries)]
    found = {}
    for key in ("top1pct_share", "top10pct_share", "gini", "positive_fraction"):
        column = np.array([row[key] for row in rows], dtype=np.float64)
        column = column[np.isfinite(column)]
        found[key] = float(column.mean()) if len(column) else math.nan
    return found


def _concentration_of(sketch: ScoreSketch, query: int) -> Dict[str, float]:
    n = int(sketch.moment("count")[query])
    if n == 0:
        return {"top1pct_share": math.nan, "top10pct_share": math.nan, "gini": math.nan, "positive_fraction": math.nan}
    total = float(sketch.moment("positive_sum")[query])
    found = {"positive_fraction": float(sketch.moment("positive_count")[query]) / n}
    values, multiplicities = sketch.positive_profile(query)
    descending_values, descending_counts = values[::-1], multiplicities[::-1]
    for percent in (1, 10):
        k = max(1, n * percent // 100)
        taken = np.minimum(descending_counts, np.maximum(k - (np.cumsum(descending_counts) - descending_counts), 0))
        found[f"top{percent}pct_share"] = float((taken * descending_values).sum() / total) if total > 0 else math.nan
    # Σ_i (2i - n - 1) x_(i) over ascending positions i, zeros first: a block of c equal values from
    # position p contributes x·c·(2p + c - n - 2).
    starts = n - multiplicities.sum() + 1 + np.concatenate([[0.0], np.cumsum(multiplicities)[:-1]])
    weighted = (values * multiplicities * (2 * starts + multiplicities - n - 2)).sum()
    found["gini"] = float(weighted / (n * total)) if total > 0 else math.nan
    return found


def score_spread(sketch: ScoreSketch) -> Dict[str, float]:
    """Mean ``|s|`` and standard deviation (unbiased) of all finite scores, from the exact moments."""
    count = float(sketch.moment("count").sum())
    if count == 0:
        return {"score_abs_mean": math.nan, "score_std": math.nan}
    total, squares = float(sketch.moment("sum").sum()), float(sketch.moment("square_sum").sum())
    variance = (squares - total * total / count) / (count - 1) if count > 1 else math.nan
    return {"score_abs_mean": float(sketch.moment("abs_sum").sum()) / count,
            "score_std": math.sqrt(max(variance, 0.0)) if count > 1 else math.nan}
