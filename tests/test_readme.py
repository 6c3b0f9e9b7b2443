"""The README's promises that code can check: the configuration table and the test command."""

import inspect
import re
from pathlib import Path

from lightning_influence.callback import InfluenceCallback

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def test_configuration_table_matches_the_callback_signature():
    rows = dict(re.findall(r"^\| `(\w+)` \| ([^|]+?) \|", README, flags=re.M))
    for name, parameter in inspect.signature(InfluenceCallback.__init__).parameters.items():
        if name == "self":
            continue
        assert name in rows, f"README configuration table lacks {name}"
        if parameter.default is inspect.Parameter.empty:
            continue
        shown = rows[name].strip("` ").replace('"', "'")
        assert shown == repr(parameter.default), (name, shown, parameter.default)


def test_ci_runs_the_readme_test_command():
    command = "python3 -m pytest -q"
    assert command in README
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert ci_lines[-1] == command
