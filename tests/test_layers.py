"""Imports point one way: core <- analysis <- pruning <- ui (<- pages, bench), and no package imports
streamlit below ui. Walks every module's imports with `ast`, function-local ones included."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LAYERS = ("core", "analysis", "pruning", "ui")  # each may import only those before it (and itself)


def imports(source: str, package: str) -> set[str]:
    """Top-level package names a module of `package` imports, at any depth of its code (a relative
    import counts as its own package)."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            found.add(package if node.level else (node.module or "").split(".")[0])
    return found


def module_edges() -> dict[str, set[str]]:
    """Dotted module name -> the project modules it imports (for the cycle check)."""
    edges: dict[str, set[str]] = {}
    for layer in LAYERS:
        for path in (ROOT / layer).rglob("*.py"):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
            targets = set()
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.ImportFrom) and node.module and not node.level:
                    targets.add(node.module)
                    targets |= {f"{node.module}.{a.name}" for a in node.names}
                elif isinstance(node, ast.Import):
                    targets |= {a.name for a in node.names}
            edges[name] = targets
    # `from pkg import sub` of a submodule is an edge to the submodule (the package's own code is just
    # its __init__, reached by every submodule import anyway); `from mod import name` is an edge to mod
    resolved = {}
    for name, targets in edges.items():
        subs = {t for t in targets if t in edges and t.rpartition(".")[0] in targets}
        resolved[name] = {t for t in targets if t in edges and t != name} - {t.rpartition(".")[0] for t in subs}
    return resolved


def test_no_import_points_up_a_layer():
    wrong = []
    for rank, layer in enumerate(LAYERS):
        allowed = set(LAYERS[: rank + 1])
        for path in sorted((ROOT / layer).rglob("*.py")):
            found = imports(path.read_text(), layer)
            for target in found & set(LAYERS) - allowed:
                wrong.append(f"{path.relative_to(ROOT)} imports {target}")
            if layer != "ui" and "streamlit" in found:
                wrong.append(f"{path.relative_to(ROOT)} imports streamlit")
    assert not wrong, "\n".join(wrong)


def test_no_import_cycle_between_modules():
    edges = module_edges()
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for target in sorted(edges[node]):
            if state.get(target) == 1:
                cycles.append(" -> ".join(path[path.index(target):] + [target]))
            elif target not in state:
                visit(target, [*path, target])
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    assert not cycles, "\n".join(cycles)


def test_the_walker_sees_function_local_and_relative_imports():
    source = "import os\n\ndef f():\n    from pruning.export import load_pruned\n    from . import x\n"
    assert imports(source, "core") == {"os", "pruning", "core"}
