"""mkdocs hook: the documentation pages generated from code, so that no page keeps a copy by hand.

A page holds a marker comment; at build time the hook replaces it with a table built from its one
source: the configuration reference from ``InfluenceConfig`` (its fields, defaults and the ``Args:``
of its docstring), the metrics reference from ``reporting.glossary``. A field without a docstring
entry fails the build.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
from typing import Callable, Dict, List, Tuple

CONFIGURATION_MARKER = "<!-- generated: configuration table -->"
METRICS_MARKER = "<!-- generated: metrics table -->"

_ARG = re.compile(r"^(?P<name>\w+): (?P<text>.*)$")


def docstring_arguments(obj: object) -> Dict[str, str]:
    """The ``Args:`` section of a Google-style docstring: argument name to its text on one line."""
    doc = inspect.getdoc(obj) or ""
    lines = doc.split("Args:", 1)[1].splitlines() if "Args:" in doc else []
    found: Dict[str, List[str]] = {}
    current = None
    for line in lines:
        if line and not line.startswith(" "):
            break  # the next section
        match = _ARG.match(line.strip()) if line.startswith("    ") and not line.startswith("     ") else None
        if match:
            current = match["name"]
            found[current] = [match["text"]]
        elif current is not None and line.strip():
            found[current].append(line.strip())
    return {name: " ".join(parts) for name, parts in found.items()}


def _markdown(text: str) -> str:
    """reST inline markup of a docstring as markdown, safe inside a table cell."""
    text = re.sub(r":\w+:`~?(?:[\w.]+\.)?([\w]+)`", r"`\1`", text)
    return text.replace("``", "`").replace("|", "\\|")


def _default(field: dataclasses.Field) -> str:
    if field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
        return "(required)"
    value = field.default if field.default is not dataclasses.MISSING else field.default_factory()
    return f'`"{value}"`' if isinstance(value, str) else f"`{value!r}`"


def configuration_rows() -> List[Tuple[str, str, str]]:
    """``(argument, default, meaning)`` for every ``InfluenceConfig`` field, in declaration order."""
    from lightning_influence.config import InfluenceConfig

    meanings = docstring_arguments(InfluenceConfig)
    missing = [field.name for field in dataclasses.fields(InfluenceConfig) if field.name not in meanings]
    if missing:
        raise ValueError(f"InfluenceConfig's docstring documents no {missing}: add them to its Args section")
    rows = []
    for field in dataclasses.fields(InfluenceConfig):
        if not dataclasses.is_dataclass(field.default_factory):
            rows.append((f"`{field.name}`", _default(field), _markdown(meanings[field.name])))
            continue
        group = field.default_factory  # a group: one row for it, then one per field, as `<group>.<field>`
        rows.append((f"`{field.name}`", f"`{group.__name__}()`", _markdown(meanings[field.name])))
        inner = docstring_arguments(group)
        missing = [item.name for item in dataclasses.fields(group) if item.name not in inner]
        if missing:
            raise ValueError(f"{group.__name__}'s docstring documents no {missing}: add them to its Args section")
        rows += [(f"`{field.name}.{item.name}`", _default(item), _markdown(inner[item.name]))
                 for item in dataclasses.fields(group)]
    return rows


def configuration_table() -> str:
    return _table(("argument", "default", "meaning"), configuration_rows())


def metrics_table() -> str:
    from lightning_influence.reporting.glossary import DEFINITIONS

    return _table(("name", "meaning"), [(f"`{name}`", _markdown(text)) for name, text in DEFINITIONS.items()])


def _table(header: Tuple[str, ...], rows: List[Tuple[str, ...]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


GENERATED: Dict[str, Callable[[], str]] = {CONFIGURATION_MARKER: configuration_table, METRICS_MARKER: metrics_table}


def on_page_markdown(markdown: str, **_: object) -> str:
    for marker, build in GENERATED.items():
        if marker in markdown:
            markdown = markdown.replace(marker, build())
    return markdown
