"""The layout the design promises, checked on the source: parts named as subpackages, a small package
root, short modules, a core that imports neither Lightning nor W&B nor the reporting sinks, parts that
import only the parts below them, and no two modules importing each other in a circle (imports
inside functions included)."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, List, Set

PACKAGE = Path(__file__).resolve().parent.parent / "lightning_influence"
PARTS = ("engine", "checkpoint", "loops", "analysis", "reporting")
# The plain-PyTorch core: every module of these parts and root modules.
CORE_PARTS = ("engine", "checkpoint", "analysis")
CORE_ROOT = ("results", "config", "tasks", "_io", "_format")
FOREIGN = ("pytorch_lightning", "lightning", "wandb", "lightning_influence.reporting")
# What each part may import of the others: the engine computes, analysis reads results, the checkpoint
# procedure runs the engine, the loops drive the procedure and publish through reporting.
MAY_IMPORT = {
    "engine": {"analysis"},
    "analysis": set(),
    "checkpoint": {"engine", "analysis"},
    "reporting": {"analysis"},
    "loops": {"engine", "checkpoint", "analysis", "reporting"},
}
MAX_ROOT_MODULES = 12
MAX_LINES = 600


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_module(name: str) -> bool:
    path = PACKAGE.parent.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def _imports(path: Path) -> List[str]:
    """Modules imported by ``path``, at module level and inside functions alike."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            submodules = [f"{node.module}.{alias.name}" for alias in node.names if _is_module(f"{node.module}.{alias.name}")]
            # "from package import submodule" imports the submodule, not what the package's __init__ imports
            found += submodules if submodules else [node.module]
    return found


def _modules() -> Dict[str, Path]:
    return {_module_name(path): path for path in PACKAGE.rglob("*.py")}


def _part(module: str) -> str:
    return module.split(".")[1] if "." in module else ""


def test_the_core_imports_neither_lightning_nor_wandb_nor_reporting():
    core = [name for name in _modules() if _part(name) in CORE_PARTS or _part(name) in CORE_ROOT]
    assert len(core) > 20
    for name in core:
        offending = [m for m in _imports(_modules()[name]) if any(m == f or m.startswith(f + ".") for f in FOREIGN)]
        assert not offending, f"{name} imports {offending}"


def test_each_part_imports_only_the_parts_below_it():
    for name, path in _modules().items():
        part = _part(name)
        if part not in MAY_IMPORT:
            continue
        for imported in _imports(path):
            other = _part(imported) if imported.startswith("lightning_influence.") else ""
            if other in PARTS and other != part:
                assert other in MAY_IMPORT[part], f"{name} ({part}) imports {imported} ({other})"


def test_no_import_cycles_between_modules():
    modules = _modules()
    graph: Dict[str, Set[str]] = {
        name: {m for m in _imports(path) if m in modules and m != name} for name, path in modules.items()
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


def test_the_package_root_is_small_and_the_parts_are_subpackages():
    root_modules = sorted(path.name for path in PACKAGE.glob("*.py"))
    assert len(root_modules) <= MAX_ROOT_MODULES, root_modules
    for part in PARTS:
        assert (PACKAGE / part / "__init__.py").is_file(), part


def test_no_module_is_longer_than_it_can_be_read():
    long = {str(path.relative_to(PACKAGE)): n for path in PACKAGE.rglob("*.py")
            if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: {long}"
