"""The promises of the README and the documentation that code can check: the configuration
reference covers the callback's signature, the documentation's pages exist, and CI runs the
README's test command after building the site."""

import importlib.util
import inspect
import re
from pathlib import Path

import yaml

from lightning_influence.loops.callback import InfluenceCallback

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
CI = (ROOT / ".ci" / "run").read_text()


def _docs_hook():
    spec = importlib.util.spec_from_file_location("generated_reference", ROOT / "docs" / "hooks" / "generated_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_configuration_reference_matches_the_callback_signature():
    table = _docs_hook().configuration_table()
    rows = dict(re.findall(r"^\| `(\w+)` \| ([^|]+?) \|", table, flags=re.M))
    for name, parameter in inspect.signature(InfluenceCallback.__init__).parameters.items():
        if name == "self" or parameter.kind is inspect.Parameter.VAR_KEYWORD:  # **deprecated: the old flat names
            continue
        assert name in rows, f"the configuration reference lacks {name}"
        if parameter.default is inspect.Parameter.empty or name in ("curvature", "scoring", "report"):
            continue  # a group: None stands for its dataclass's defaults
        shown = rows[name].strip("` ").replace('"', "'")
        assert shown == repr(parameter.default), (name, shown, parameter.default)


def test_readme_is_short_and_its_documentation_links_resolve():
    assert len(README.splitlines()) <= 300
    for target in re.findall(r"\]\(((?:docs/|CHANGELOG)[^)#]+)", README):
        assert (ROOT / target).is_file(), f"README links to missing {target}"


def test_every_documentation_page_is_in_the_navigation():
    def pages(entries):
        for entry in entries:
            value = next(iter(entry.values())) if isinstance(entry, dict) else entry
            yield from pages(value) if isinstance(value, list) else [value]

    config = yaml.load((ROOT / "mkdocs.yml").read_text(), Loader=yaml.BaseLoader)
    listed = set(pages(config["nav"]))
    on_disk = {str(path.relative_to(ROOT / "docs")) for path in (ROOT / "docs").rglob("*.md")}
    assert listed == on_disk


def test_ci_builds_the_site_strictly_then_runs_the_readme_test_command():
    command = "python3 -m pytest -q"
    assert command in README
    ci_lines = [line.strip() for line in CI.splitlines()]
    assert ci_lines[-1] == command
    assert "mkdocs build --strict" in CI and CI.index("mkdocs build --strict") < CI.index(command)
