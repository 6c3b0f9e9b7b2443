"""Run every benchmark and write its tables to ``benchmarks/results/<name>.md`` and its numbers to
``benchmarks/results/<name>.json``, plus all tables together in ``benchmarks/results/tables.md``.
The documentation's benchmarks page (``docs/benchmarks.md``) includes the ``<name>.md`` files as
they are, so it shows these tables once the site is rebuilt.

    python benchmarks/make_tables.py [--quick] [--only accuracy lds speed memory_plan lm_scale real_text]

``lm_scale`` (a GPT, ~40 minutes on one CPU thread with kronfluence) and ``real_text`` (a GPT trained
from scratch on Shakespeare, ~40 minutes without its LDS) run only when named in ``--only``.
"""

from __future__ import annotations

import argparse
import importlib
from typing import Optional, Sequence

import benchlib

SCRIPTS = ("accuracy", "lds", "speed", "training_overhead", "memory_plan", "lm_scale", "real_text")
DEFAULT = ("accuracy", "lds", "speed", "training_overhead", "memory_plan")


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke sizes (the tables are then meaningless)")
    parser.add_argument("--only", nargs="+", choices=SCRIPTS, default=list(DEFAULT))
    args = parser.parse_args(argv)
    out = benchlib.RESULTS_DIR
    for name in args.only:
        flags = ["--json", str(out / f"{name}.json"), "--markdown", str(out / f"{name}.md")]
        importlib.import_module(name).main(flags + (["--quick"] if args.quick else []))
    parts = [(out / f"{name}.md").read_text() for name in SCRIPTS if (out / f"{name}.md").exists()]
    (out / "tables.md").write_text("\n".join(parts))


if __name__ == "__main__":
    main()
