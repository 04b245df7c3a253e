"""The layout shows the DAG: flows -> tasks -> cluster -> schemas, never the other way round.

Every import of a project package in every module (top level or inside a function) is read from the source with
`ast`, so a lazy import inside a function cannot hide a cycle either.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("flows", "gateway", "tasks", "cluster", "schemas")
# What each layer may import from the project (itself included). The gateway serves beside the flows: the CLI in
# flows/ starts it; it uses the steps' routing policy and the experts' backends.
ALLOWED = {
    "schemas": {"schemas"},
    "cluster": {"cluster", "schemas"},
    "tasks": {"tasks", "cluster", "schemas"},
    "gateway": {"gateway", "tasks", "cluster", "schemas"},
    "flows": {"flows", "gateway", "tasks", "cluster", "schemas"},
}


def project_imports(path: Path) -> set[tuple[str, int]]:
    """(imported project package, line) for every import statement in a module."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        found |= {(n.split(".")[0], node.lineno) for n in names if n.split(".")[0] in PACKAGES}
    return found


@pytest.mark.parametrize("layer", PACKAGES)
def test_layer_imports_only_what_is_below_it(layer):
    bad = [f"{p.relative_to(ROOT)}:{line} imports {pkg}"
           for p in sorted((ROOT / layer).rglob("*.py"))
           for pkg, line in sorted(project_imports(p)) if pkg not in ALLOWED[layer]]
    assert not bad, "layering broken:\n" + "\n".join(bad)


def test_every_layer_has_modules():
    for layer in PACKAGES:
        assert list((ROOT / layer).glob("*.py")), layer


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    return ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)


def module_imports(path: Path, known: set[str]) -> set[str]:
    """The project modules a module imports (top level or inside a function): `from a.b import c` is a.b.c when
    that is a module, else a.b."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name in known}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module in known:
            found |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in known else node.module
                      for a in node.names}
    return found


def test_no_import_cycle_inside_the_project():
    """Modules import one way: a cycle (even through an import inside a function) means two modules that are one
    thing, or a helper living in the wrong one."""
    paths = {module_name(p): p for layer in PACKAGES for p in (ROOT / layer).rglob("*.py")}
    graph = {m: module_imports(p, set(paths)) - {m} for m, p in paths.items()}
    cycles, state = [], {}

    def visit(m: str, stack: list[str]) -> None:
        state[m] = "open"
        for n in sorted(graph[m]):
            if state.get(n) == "open":
                cycles.append(" -> ".join([*stack[stack.index(n):], n]))
            elif n not in state:
                visit(n, [*stack, n])
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)
