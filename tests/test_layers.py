"""The package's layers: a module never imports one of a higher layer (not even lazily)."""

from __future__ import annotations

import ast
from pathlib import Path

import mergebuild

# Highest first; cli.py and report.py (terminal output) share the top.
LAYERS = ["cli", "api", "verbs", "build", "plan", "sources", "spec", "store", "provenance",
          "io", "methods"]
RANK = {name: i for i, name in enumerate(LAYERS)} | {"report": 0}


def _layer(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "mergebuild" else None


def _imports(path: Path) -> set[str]:
    """Every module ``path`` imports, at its top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return found


def _upward_imports() -> list[str]:
    root = Path(mergebuild.__file__).parent
    found = []
    for path in sorted(root.rglob("*.py")):
        module = ".".join(("mergebuild", *path.relative_to(root).with_suffix("").parts))
        mine = _layer(module)
        if mine not in RANK:
            continue
        for imported in sorted(_imports(path)):
            other = _layer(imported)
            if other in RANK and RANK[other] < RANK[mine]:
                found.append(f"{module} imports {imported}")
    return found


def test_no_module_imports_a_higher_layer():
    assert _upward_imports() == []


def test_gc_is_given_its_keep_set_and_plans_nothing_itself():
    gc = Path(mergebuild.__file__).parent / "store" / "gc.py"
    assert {m for m in _imports(gc) if m.startswith("mergebuild.")} == {"mergebuild.store.objects"}
