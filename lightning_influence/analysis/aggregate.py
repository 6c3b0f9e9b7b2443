"""Trajectory influence: several checkpoints' results combined into one, as TracIn sums over the
checkpoints of a run."""

from __future__ import annotations

from collections.abc import Mapping
from typing import List, Optional, Sequence, Union

import torch

from lightning_influence.results import InfluenceResult, check_same_run, result_run_id


def aggregate(results: Sequence[InfluenceResult], weighting: Union[str, Sequence[float]] = "mean_abs",
              allow_different_runs: bool = False) -> InfluenceResult:
    """Trajectory influence: combine several checkpoints' results into one.

    Args:
        results: results over the same queries and training examples (matched on their ids).
        weighting: ``"mean_abs"`` (default) divides each checkpoint's scores by their mean absolute
            value before averaging, so that every checkpoint counts equally whatever its scale;
            ``"none"`` averages raw scores; ``"lr"`` weights raw scores by the sum of the learning
            rates over the optimizer steps each checkpoint's window covered (TracIn's weighting;
            the callback records it as ``meta["window"]["lr_sum"]``); ``"recency"`` normalises as
            ``"mean_abs"`` and doubles the weight from one checkpoint to the next (the latest counts
            as much as all earlier ones together); a sequence of floats gives explicit
            per-checkpoint weights applied to raw scores.
        allow_different_runs: combine results whose ``meta["run"]`` identities differ (refused by
            default: see :func:`check_same_run`).
    """
    if not results:
        raise ValueError("aggregate() needs at least one result")
    for result in results:
        result.require_scores("aggregate() (trajectory influence)")
    check_same_run(results, allow_different_runs)
    first = results[0]
    for other in results[1:]:
        if not (torch.equal(other.train_ids, first.train_ids) and torch.equal(other.query_ids, first.query_ids)):
            raise ValueError(
                "aggregate() needs results over the same training examples and queries "
                f"(step {first.step} and step {other.step} differ): pass the results of one run, whose "
                "checkpoints all score the same pool and queries (li.compare can still relate the two)"
            )
    if isinstance(weighting, str):
        weights = _trajectory_weights(results, weighting)
    else:
        weights = [float(w) for w in weighting]
        if len(weights) != len(results):
            raise ValueError(f"got {len(weights)} weights for {len(results)} results")

    def combine(field: str) -> Optional[torch.Tensor]:
        tensors = [r.get(field) for r in results]
        if any(t is None for t in tensors):
            return None
        return sum(w * t.double() for w, t in zip(weights, tensors)).div(len(results)).float()

    same_layers = all(r.layer_names == first.layer_names for r in results)
    run = first.meta.get("run")
    same_run = {"run": run} if run is not None and len({result_run_id(r) for r in results}) == 1 else {}
    return InfluenceResult(
        scores=combine("scores"),
        train_ids=first.train_ids,
        query_ids=first.query_ids,
        layer_names=first.layer_names if same_layers else [],
        layer_scores=combine("layer_scores") if same_layers else None,
        step=max((r.step for r in results if r.step is not None), default=None),
        epoch=max((r.epoch for r in results if r.epoch is not None), default=None),
        meta={
            "aggregated_steps": [r.step for r in results],
            "aggregated_paths": [str(r.path) if r.path else None for r in results],
            "weighting": weighting if isinstance(weighting, str) else weights,
            **same_run,  # an aggregate of one run still identifies it
        },
    )


WEIGHTINGS = ("mean_abs", "none", "lr", "recency")


def _trajectory_weights(results: Sequence[InfluenceResult], weighting: str) -> List[float]:
    """Per-checkpoint weights of a named weighting (see :func:`aggregate`)."""
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {list(WEIGHTINGS)} or a list of floats, got {weighting!r}")
    if weighting == "none":
        return [1.0] * len(results)
    if weighting == "lr":
        missing = [r.step for r in results if not isinstance(w := r.meta.get("window"), Mapping) or "lr_sum" not in w]
        if missing:
            raise ValueError(f"weighting='lr' needs each result's meta['window']['lr_sum'] (recorded by the "
                             f"callback); the results at steps {missing} lack it: pass the learning-rate sums "
                             "as a list of weights instead")
        return [float(r.meta["window"]["lr_sum"]) for r in results]
    normalised = [1.0 / max(r.scores.abs().mean().item(), 1e-30) for r in results]
    if weighting == "recency":
        return [w * 2.0 ** position for position, w in enumerate(normalised)]
    return normalised
