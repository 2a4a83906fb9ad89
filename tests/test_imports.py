"""The package's import graph: no cycle, and no module importing a layer above its own.

Layers, lowest first (a module may import its own layer and those below):
  0 core      imsm, atomic, distributed, default_model, models (ChatGLM3), templates, data, run_folder (storage:
              knows no method)
  1 method    imsm.method.* (the gate, the siamese model, the adapters by name, LoRAMoE, PiSSA/CorDA)
  2 assembly  imsm.loader (build/load/save), imsm.args (the command line)
  3 uses      imsm.training.*, imsm.evaluation.*, imsm.export.*
  4 plans     imsm.paper.*
Every import counts, including those inside functions (a late import still ties two modules together).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "imsm"
LAYERS = [
    ("imsm.paper", 4),
    ("imsm.training", 3), ("imsm.evaluation", 3), ("imsm.export", 3),
    ("imsm.loader", 2), ("imsm.args", 2),
    ("imsm.method", 1),
    ("imsm", 0),
]


def layer(module: str) -> int:
    for prefix, level in LAYERS:
        if module == prefix or module.startswith(prefix + "."):
            return level
    raise AssertionError(f"{module} is in no layer: add it to LAYERS (and the docstring)")


def modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def imports(path: Path, known: set[str]) -> set[str]:
    """The imsm modules ``path`` imports anywhere in it (``from a import b`` counts ``a.b`` when that is a module)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {alias.name for alias in node.names if alias.name.split(".")[0] == "imsm"}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "imsm":
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                out.add(sub if sub in known else node.module)
    return {m for m in out if m in known}


def graph() -> dict[str, set[str]]:
    found = modules()
    return {name: imports(path, set(found)) - {name} for name, path in found.items()}


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(edges):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def test_the_import_graph_has_no_cycle():
    cycle = find_cycle(graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_no_module_imports_a_layer_above_its_own():
    climbs = [f"{a} (layer {layer(a)}) imports {b} (layer {layer(b)})"
              for a, targets in graph().items() for b in sorted(targets) if layer(b) > layer(a)]
    assert not climbs, "\n".join(climbs)


def test_the_run_folder_imports_no_method():
    """The run folder stores a method's settings as data; it must not need the methods to read a folder."""
    assert not {m for m in graph()["imsm.run_folder"] if m.startswith("imsm.method")}


@pytest.mark.parametrize("edges,expected", [
    ({"a": {"b"}, "b": {"c"}, "c": {"a"}}, ["a", "b", "c", "a"]),
    ({"a": {"b"}, "b": set(), "c": {"a", "b"}}, None),
])
def test_the_cycle_finder_finds_a_cycle_and_only_a_cycle(edges, expected):
    assert find_cycle(edges) == expected


def test_late_imports_count(tmp_path):
    source = tmp_path / "m.py"
    source.write_text("def f():\n    from imsm.loader import load_run\n    import imsm.run_folder\n")
    assert imports(source, {"imsm.loader", "imsm.run_folder"}) == {"imsm.loader", "imsm.run_folder"}
