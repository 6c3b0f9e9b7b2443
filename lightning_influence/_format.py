"""The one number formatter of every human-readable output (terminal tables, HTML, figure labels),
so that a statistic reads the same wherever it is shown."""

from __future__ import annotations

import math
from typing import Any


def format_number(value: Any, spec: str = ".4g", missing: str = "-") -> str:
    """``value`` as text: floats with the format ``spec``, integers and strings as they are.

    ``None`` and non-finite floats (NaN, +-inf: an undefined statistic) become ``missing``; a
    one-element tensor or NumPy value is formatted as the Python number it holds.
    """
    value = _python_number(value)
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return missing
    if isinstance(value, float):
        return format(value, spec)
    return str(value)


def _python_number(value: Any) -> Any:
    numel = getattr(value, "numel", None)  # torch tensors; NumPy values have a ``size`` attribute
    size = numel() if callable(numel) else getattr(value, "size", None)
    return value.item() if size == 1 and callable(getattr(value, "item", None)) else value
