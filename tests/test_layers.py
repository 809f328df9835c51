"""The package's layer rule, read from its imports: no cycles, nothing imports upwards.

Layers, top to bottom (ARCHITECTURE.md): cli > report > api > verbs > build > plan > sources
> spec > evaluate > store > provenance > io > methods. ``errors`` and ``faults`` are leaves
anyone may import. Every import counts, also one inside a function: a lazy import that dodges
a cycle is still a cycle.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import networkx as nx
import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "mergebuild"

# Higher rank may import lower rank; equal rank only within the same package folder.
RANKS = {
    "cli": 12, "report": 11, "api": 10, "verbs": 9, "build": 8, "plan": 7, "sources": 6,
    "spec": 5, "evaluate": 4, "store": 3, "provenance": 2, "io": 1, "methods": 0,
}
LEAVES = {"errors", "faults", "__init__"}
TORCH_FREE = ("spec", "plan", "cli")


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _typing_only(tree: ast.AST) -> set[int]:
    """ids of the import nodes under ``if TYPE_CHECKING:`` (annotations only, never run)."""
    guarded: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            guarded |= {id(inner) for stmt in node.body for inner in ast.walk(stmt)}
    return guarded


def _imports(path: Path, *, runtime_only: bool = False) -> list[tuple[str, int]]:
    """Every module ``path`` imports (absolute names), at any depth, with its line; with
    ``runtime_only``, not those under ``if TYPE_CHECKING:``."""
    tree = ast.parse(path.read_text(), filename=str(path))
    here = _module_name(path).split(".")
    package = here if path.name == "__init__.py" else here[:-1]
    skip = _typing_only(tree) if runtime_only else set()
    found: list[tuple[str, int]] = []
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.append((module, node.lineno))
            # `from mergebuild.x import y` may name a submodule y
            found += [(f"{module}.{alias.name}", node.lineno) for alias in node.names]
    return found


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _internal_edges(*, runtime_only: bool = False) -> list[tuple[str, str, int]]:
    modules = _modules()
    edges = []
    for name, path in modules.items():
        for target, line in _imports(path, runtime_only=runtime_only):
            if target in modules and target != name:
                edges.append((name, target, line))
    return edges


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def test_every_module_belongs_to_a_layer():
    unknown = sorted(m for m in _modules() if _layer(m) not in RANKS and _layer(m) not in LEAVES)
    assert not unknown, f"modules outside every layer (add the folder to RANKS): {unknown}"


def test_no_import_cycles():
    # A typing-only import of a sibling (for an annotation) runs nothing: not a cycle.
    graph = nx.DiGraph((a, b) for a, b, _ in _internal_edges(runtime_only=True))
    cycles = list(nx.simple_cycles(graph))
    assert not cycles, "import cycles: " + "; ".join(" → ".join(c + [c[0]]) for c in cycles)


def test_no_layer_imports_a_higher_one():
    upward = []
    for source, target, line in _internal_edges():
        src, dst = _layer(source), _layer(target)
        if dst in LEAVES or src == dst:
            continue
        if src in LEAVES or RANKS[dst] >= RANKS[src]:
            upward.append(f"{source}:{line} imports {target} ({src} may not import {dst})")
    assert not upward, "\n".join(upward)


def test_methods_import_only_torch_numpy_and_themselves():
    allowed_roots = {"torch", "numpy"} | set(sys.stdlib_module_names)
    bad = []
    for name, path in _modules().items():
        if _layer(name) != "methods":
            continue
        for target, line in _imports(path):
            root = target.split(".")[0]
            if root == "mergebuild" and target.startswith("mergebuild.methods"):
                continue
            if root not in allowed_roots:
                bad.append(f"{name}:{line} imports {target}")
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("layer", TORCH_FREE)
def test_torch_free_layers_never_import_torch(layer):
    bad = [f"{name}:{line} imports {target}"
           for name, path in _modules().items() if _layer(name) == layer
           for target, line in _imports(path) if target.split(".")[0] == "torch"]
    assert not bad, "\n".join(bad)


def test_planning_and_help_load_no_torch(tmp_path):
    code = (
        "import sys\n"
        "from mergebuild.api import Project\n"
        "import mergebuild.cli\n"
        f"Project({str(PACKAGE.parent / 'Mergefile.example')!r}, {str(tmp_path)!r}).plan()\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path)


def test_gc_is_given_its_keep_set_and_plans_nothing_itself():
    internal = {target for target, _ in _imports(PACKAGE / "store" / "gc.py")
                if target.startswith("mergebuild.") and target in _modules()}
    assert internal == {"mergebuild.store.objects"}
