"""Hand-built influence results and datasets for the reporting tests (the engine is not needed)."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import torch

from lightning_influence.results import InfluenceResult

LAYERS = ["encoder.0", "encoder.1", "head"]
SEQ_LEN = 6
NUM_TRAIN = 60
TRAIN_ID_OFFSET = 1000  # train ids are not column positions: catches mix-ups
PLANTED = TRAIN_ID_OFFSET + 17  # the most helpful example of every query


def make_result(
    step: int, *, seed: int = 0, num_queries: int = 3, path: Optional[Path] = None, tokens: bool = True
) -> InfluenceResult:
    """A result with heavy-tailed scores, exact layer decomposition and top/bottom token scores.

    Example ``PLANTED`` is planted as every query's top example; scores sum over layers exactly.
    """
    g = torch.Generator().manual_seed(seed)
    # Pareto-like magnitudes with random signs: a heavy tail for the power-law fit.
    magnitudes = torch.rand(num_queries, NUM_TRAIN, generator=g).pow(-1 / 1.5)
    signs = torch.where(torch.rand(num_queries, NUM_TRAIN, generator=g) < 0.7, 1.0, -1.0)
    scores = magnitudes * signs
    scores[:, 17] = scores.abs().max() * 2
    split = torch.softmax(torch.randn(len(LAYERS), num_queries, NUM_TRAIN, generator=g), dim=0)
    layer_scores = split * scores
    train_ids = torch.arange(NUM_TRAIN) + TRAIN_ID_OFFSET
    extra = {}
    if tokens:
        k = 5
        top = torch.topk(scores, k, dim=1)
        bottom = torch.topk(scores, k, dim=1, largest=False)
        for name, found in (("top", top), ("bottom", bottom)):
            token_scores = torch.randn(num_queries, k, SEQ_LEN, generator=g)
            extra[f"{name}_ids"] = train_ids[found.indices]
            extra[f"{name}_token_scores"] = token_scores
            extra[f"{name}_token_mask"] = torch.ones(num_queries, k, SEQ_LEN, dtype=torch.bool)
    result = InfluenceResult(
        scores=scores,
        train_ids=train_ids,
        query_ids=torch.arange(num_queries) + 5,
        layer_names=LAYERS,
        layer_scores=layer_scores,
        step=step,
        epoch=0,
        meta={"strategy": "ekfac"},
        **extra,
    )
    if path is not None:
        result.save(path)
    return result


def token_dataset(size: int = TRAIN_ID_OFFSET + NUM_TRAIN) -> List[dict]:
    """Sequences whose token ids encode the example index, so rendered rows can be checked."""
    return [{"input_ids": torch.tensor([i % 97] + [1] * (SEQ_LEN - 1))} for i in range(size)]


def decode(ids: List[int]) -> List[str]:
    return [f"t{i} " for i in ids]
