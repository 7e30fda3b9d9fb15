"""`pip install -e .` installs what `import cause` and hubconf.py need: every project module they import,
directly or through others, is in pyproject.toml's package list."""
from __future__ import annotations

import tomllib

from tests.test_import_cycles import import_graph, module_name
from tests.test_layering import ROOT, project_files


def reachable(graph: dict[str, set[str]], start: set[str]) -> set[str]:
    seen, todo = set(), list(start)
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo += graph.get(name, set())
    return seen


def test_reachable_follows_imports_through_other_modules() -> None:
    graph = import_graph({"a": "import b.c\n", "b.c": "from d import e\n", "d.e": "", "d": "", "f": "import a\n"})
    assert reachable(graph, {"a"}) == {"a", "b.c", "d", "d.e"}


def test_the_installed_packages_hold_everything_import_cause_needs() -> None:
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    installed = set(setuptools["packages"]) | set(setuptools["py-modules"])
    assert {"cause", "hubconf"} <= installed
    assert all((ROOT / p / "__init__.py").exists() for p in setuptools["packages"])
    sources = {module_name(p): p.read_text() for p in project_files()
               if p.relative_to(ROOT).parts[0] not in ("tests", "benchmarks", "tools")}
    needed = {name.split(".")[0] for name in reachable(import_graph(sources), {"cause", "hubconf"})}
    assert needed - installed == set()
    assert {"stages", "models", "utils"} <= needed  # the walk went past cause.py
