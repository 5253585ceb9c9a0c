"""The package's shape: no import circles (function-local imports included), no module over 500 lines,
no section banners, and every module imports only its own layer or the layers below (docs/architecture.md)."""
from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx
import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "recipec"
MAX_LINES = 500
# Low to high; a module may import its own layer and those before it. docs/architecture.md explains each.
LAYERS = [
    {"recipec", "recipec.errors", "recipec.core"},
    {"recipec.onnx", "recipec.source", "recipec.runtime"},
    {"recipec.passes", "recipec.profile"},
    {"recipec.recipe"},
    {"recipec.plan"},
    {"recipec.build", "recipec.deploy"},
    {"recipec.serve"},
    {"recipec.workflow", "recipec.search"},
    {"recipec.cli"},
]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports_of(name: str) -> set[str]:
    """recipec modules `name` imports anywhere in its body, resolved to the module (not the package) imported."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base)
    return {m for m in found if m in MODULES and m != name}


def import_graph() -> nx.DiGraph:
    graph = nx.DiGraph()
    for name in MODULES:
        graph.add_node(name)
        graph.add_edges_from((name, target) for target in imports_of(name))
    return graph


def layer(name: str) -> int:
    for depth in range(name.count(".") + 1, 0, -1):
        prefix = ".".join(name.split(".")[:depth])
        for i, members in enumerate(LAYERS):
            if prefix in members:
                return i
    raise AssertionError(f"{name} is in no layer: add its subpackage to LAYERS and docs/architecture.md")


def test_no_import_circles():
    graph = import_graph()
    # A package's __init__ that only re-exports from its own modules is not a circle a reader trips on,
    # but one that its own modules import back is: count every edge.
    cycles = sorted(sorted(c) for c in nx.simple_cycles(graph))
    assert not cycles, "import circles:\n" + "\n".join(" -> ".join(c) for c in cycles[:20])


def test_imports_follow_the_layers():
    upward = [f"{a} ({layer(a)}) imports {b} ({layer(b)})" for a, b in import_graph().edges if layer(b) > layer(a)]
    assert not upward, "imports against the layers:\n" + "\n".join(upward)


@pytest.mark.parametrize("name", sorted(MODULES))
def test_module_size_and_sections(name):
    lines = MODULES[name].read_text().splitlines()
    assert len(lines) <= MAX_LINES, f"{name} has {len(lines)} lines (at most {MAX_LINES}): split it"
    banners = [i + 1 for i, line in enumerate(lines) if line.startswith("# ---")]
    assert not banners, f"{name} has section banners at lines {banners}: a file with sections is several modules"


def test_the_checks_can_fail(tmp_path):
    """The circle finder sees a function-local import (what hides a circle) and the layer rule an upward one."""
    graph = nx.DiGraph([("recipec.a", "recipec.b"), ("recipec.b", "recipec.a")])
    assert list(nx.simple_cycles(graph))
    assert "recipec.serve.app" in imports_of("recipec.cli.serve") or "recipec.serve.service" in imports_of("recipec.cli.serve")
    assert layer("recipec.cli.serve") > layer("recipec.serve.app") > layer("recipec.core.console")
