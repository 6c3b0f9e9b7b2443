"""The layering the design promises, checked on the source: the core imports neither Lightning nor
W&B nor the reporting sinks, and no two modules of the package import each other in a circle."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, List, Set

PACKAGE = Path(__file__).resolve().parent.parent / "lightning_influence"
CORE = ("tracking", "tasks", "passes", "factors", "scoring", "results", "analysis", "compare", "session",
        "collector", "config", "distributed", "oracle", "_io", "_format", "sketch", "run_dir")
FOREIGN = ("pytorch_lightning", "lightning", "wandb", "lightning_influence.reporting")


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_module(name: str) -> bool:
    path = PACKAGE.parent.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def _imports(path: Path, lazy: bool) -> List[str]:
    """Modules imported by ``path``: at module level only, or also inside functions (``lazy``)."""
    tree = ast.parse(path.read_text())
    nodes = ast.walk(tree) if lazy else tree.body
    found = []
    for node in nodes:
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            submodules = [f"{node.module}.{alias.name}" for alias in node.names if _is_module(f"{node.module}.{alias.name}")]
            # "from package import submodule" imports the submodule, not what the package's __init__ imports
            found += submodules if submodules else [node.module]
    return found


def test_the_core_imports_neither_lightning_nor_wandb_nor_reporting():
    for name in CORE:
        imported = _imports(PACKAGE / f"{name}.py", lazy=True)
        offending = [m for m in imported if any(m == f or m.startswith(f + ".") for f in FOREIGN)]
        assert not offending, f"lightning_influence.{name} imports {offending}"


def test_no_import_cycles_between_modules():
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: Dict[str, Set[str]] = {
        name: {m for m in _imports(path, lazy=False) if m in modules and m != name}
        for name, path in modules.items()
    }
    for start in graph:  # depth-first search for a path leading back to the start
        stack, seen = [(start, [start])], set()
        while stack:
            node, trail = stack.pop()
            for nxt in graph[node]:
                assert nxt != start, f"import cycle: {' -> '.join(trail + [nxt])}"
                if nxt not in seen:
                    seen.add(nxt)
                    stack.append((nxt, trail + [nxt]))
