"""Regenerate the saved references: ``python -m tests.references.make_references [CASE ...]``.

Only when a change is MEANT to change numbers; say which and why in the commit message (see
:mod:`tests.references.cases`). Writes ``<case>.safetensors`` (tensors) and ``<case>.json`` (facts)
next to this file.
"""

from __future__ import annotations

import json
import sys
import time

from safetensors.torch import save_file

from tests.references.cases import CASES, REFERENCE_DIR, json_safe


def write_case(name: str) -> None:
    started = time.perf_counter()
    tensors, facts = CASES[name]()
    save_file({key: value.contiguous() for key, value in tensors.items()}, str(REFERENCE_DIR / f"{name}.safetensors"))
    (REFERENCE_DIR / f"{name}.json").write_text(json.dumps(json_safe(facts), indent=1, sort_keys=True) + "\n")
    size = sum((REFERENCE_DIR / f"{name}.{ext}").stat().st_size for ext in ("safetensors", "json"))
    print(f"{name}: {len(tensors)} tensors, {size / 1024:.1f} KiB, {time.perf_counter() - started:.1f} s")


def main(names=None) -> None:
    for name in names or list(CASES):
        if name not in CASES:
            raise SystemExit(f"unknown case {name!r}; cases: {list(CASES)}")
        write_case(name)


if __name__ == "__main__":
    main(sys.argv[1:])
