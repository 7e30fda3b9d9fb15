"""No two modules of the project import each other, directly or through others (imports at any depth,
the deferred ones inside functions included)."""
from __future__ import annotations

import ast
from pathlib import Path

from tests.test_layering import ROOT, project_files


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")


def import_graph(sources: dict[str, str]) -> dict[str, set[str]]:
    """module -> the modules of `sources` it imports (`from pkg import mod` counts as importing pkg.mod)."""
    graph: dict[str, set[str]] = {}
    for name, source in sources.items():
        found: set[str] = set()
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.add(node.module)
                found.update(f"{node.module}.{alias.name}" for alias in node.names)
        graph[name] = found & sources.keys() - {name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while (w := stack.pop()) != v:
                component.append(w)
            component.append(v)
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_cycles_finds_a_deferred_mutual_import_and_nothing_in_a_chain() -> None:
    sources = {"a.x": "import a.y\n", "a.y": "def f():\n    from a.x import g\n", "a.z": "from a import y\n",
               "b": "import a.z\n"}
    graph = import_graph(sources)
    assert graph == {"a.x": {"a.y"}, "a.y": {"a.x"}, "a.z": {"a.y"}, "b": {"a.z"}}
    assert cycles(graph) == [["a.x", "a.y"]]
    assert cycles({k: v - {"a.x"} for k, v in graph.items()}) == []


def test_the_project_has_no_import_cycle() -> None:
    sources = {module_name(p): p.read_text() for p in project_files()
               if p.relative_to(ROOT).parts[0] not in ("tests", "benchmarks")}
    assert "stages.common" in sources and "stages.cli" in sources  # the files were found
    assert cycles(import_graph(sources)) == []
