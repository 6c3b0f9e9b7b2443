"""Behaviour unchanged: today's scores, statistics and saved results, recomputed and compared.

The references under ``tests/references/`` were produced from ``main`` at commit 32d3f44, before the
renovation (modules moved into subpackages, settings regrouped, curvature approximations turned into
classes, loops unified), by ``python -m tests.references.make_references``. This test recomputes
every case with the same functions (:mod:`tests.references.cases`) and demands the same numbers.

Regenerate the references only when a change is MEANT to change numbers, and say so in the commit
(which case, which numbers, why). When settings move, edit the ``*_SETTINGS`` dicts in ``cases.py``;
when a public name moves, keep ``lightning_influence``'s re-export — never the references.

Tolerances: ids, masks and every non-float fact must be equal; float tensors must keep their dtype,
shape and values within ``rtol=RTOL`` plus ``ATOL`` times the tensor's largest magnitude (so that
tensors of tiny scale, e.g. covariance sums or eigenvalues near 1e-6, are still compared
relatively); float facts (staleness, damping, monitors) within the same ``RTOL``. On one machine the
cases are bitwise reproducible (checked by running the test three times); the slack is for summation
order, which a refactoring may legitimately change.
"""

from __future__ import annotations

import json
import math
from typing import Any, List

import pytest
import torch
from safetensors.torch import load_file

from tests.references.cases import CASES, REFERENCE_DIR, json_safe

RTOL = 1e-5
ATOL = 1e-6  # times the reference tensor's largest magnitude


def _compare_facts(actual: Any, expected: Any, where: str, problems: List[str]) -> None:
    if isinstance(expected, dict) and isinstance(actual, dict):
        if set(actual) != set(expected):
            problems.append(f"{where}: keys {sorted(actual)} != {sorted(expected)}")
        for key in sorted(set(actual) & set(expected)):
            _compare_facts(actual[key], expected[key], f"{where}.{key}", problems)
    elif isinstance(expected, list) and isinstance(actual, list):
        if len(actual) != len(expected):
            problems.append(f"{where}: {actual!r} != {expected!r}")
        for index, (a, e) in enumerate(zip(actual, expected)):
            _compare_facts(a, e, f"{where}[{index}]", problems)
    elif isinstance(expected, float) and isinstance(actual, float):
        if not (actual == expected or (math.isnan(actual) and math.isnan(expected))
                or math.isclose(actual, expected, rel_tol=RTOL, abs_tol=0.0)):
            problems.append(f"{where}: {actual!r} != {expected!r}")
    elif type(actual) is not type(expected) or actual != expected:
        problems.append(f"{where}: {actual!r} != {expected!r}")


def _compare_tensors(actual: dict, expected: dict, case: str) -> None:
    missing, extra = sorted(set(expected) - set(actual)), sorted(set(actual) - set(expected))
    assert not missing and not extra, f"{case}: missing tensors {missing}, unexpected tensors {extra}"
    for key in sorted(expected):
        got, want = actual[key].detach().cpu(), expected[key]
        assert got.dtype == want.dtype and got.shape == want.shape, \
            f"{case}/{key}: {got.dtype} {tuple(got.shape)} != {want.dtype} {tuple(want.shape)}"
        if want.is_floating_point():
            scale = float(want.abs().nan_to_num(posinf=0.0, neginf=0.0).max()) if want.numel() else 0.0
            torch.testing.assert_close(got, want, rtol=RTOL, atol=ATOL * scale, equal_nan=True,
                                       msg=lambda m, key=key: f"{case}/{key}: {m}")
        else:
            assert torch.equal(got, want), f"{case}/{key}: {got} != {want}"


@pytest.mark.parametrize("case", list(CASES))
def test_reference(case):
    expected_tensors = load_file(str(REFERENCE_DIR / f"{case}.safetensors"))
    expected_facts = json.loads((REFERENCE_DIR / f"{case}.json").read_text())
    tensors, facts = CASES[case]()
    _compare_tensors(tensors, expected_tensors, case)
    problems: List[str] = []
    _compare_facts(json.loads(json.dumps(json_safe(facts))), expected_facts, case, problems)
    assert not problems, f"{case}: facts differ from the reference:\n" + "\n".join(problems[:20])
