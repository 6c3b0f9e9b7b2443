"""``meta`` has a declared schema (``results.META_FIELDS``): what the package writes stays inside it,
and the reference page lists exactly its keys."""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch.utils.data import TensorDataset

import lightning_influence as li
from lightning_influence.results import META_FIELDS

PAGE = Path(__file__).resolve().parent.parent / "docs" / "reference" / "result-meta.md"


def test_the_reference_page_lists_exactly_the_declared_keys():
    rows = [line for line in PAGE.read_text().splitlines() if line.startswith("| `")]
    listed = {key for row in rows for key in re.findall(r"`([a-z_]+)`", row.split("|")[1])}
    assert listed == set(META_FIELDS)


def test_scoring_and_aggregation_write_declared_keys_only():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    data = TensorDataset(torch.randn(12, 3), torch.randint(0, 2, (12,)))
    task = li.ClassificationTask()
    factors = li.fit_factors(model, task, data, strategy="ekfac")
    result = li.compute_influence(model, task, data, data, factors=factors, query_rank=2)
    combined = li.aggregate([result, result], weighting="none")
    for meta in (result.meta, combined.meta):
        assert set(meta) <= set(META_FIELDS), sorted(set(meta) - set(META_FIELDS))
    assert {"strategy", "damping", "n_train", "timings"} <= set(result.meta)
    assert {"aggregated_steps", "weighting"} <= set(combined.meta)
