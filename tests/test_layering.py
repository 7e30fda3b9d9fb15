"""utils/ is the bottom layer: none of its modules imports the packages built on top of it."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
UPPER_PACKAGES = {"loader", "stages", "models", "modules"}


def imported_packages(source: str, deferred: bool = True) -> set[str]:
    """Top-level package names a module's source imports (absolute imports, at any depth in the file);
    deferred=False leaves out the imports inside functions (those that do not run when the module is imported)."""
    found: set[str] = set()
    todo = list(ast.parse(source).body)
    while todo:
        node = todo.pop()
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
        elif deferred or not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            todo.extend(ast.iter_child_nodes(node))
    return found


def test_imported_packages_sees_every_import_form() -> None:
    source = "import loader.x\nfrom stages.common import Run\ndef f():\n    import models as m\nimport os, modules.bank\n"
    assert imported_packages(source) == {"loader", "stages", "models", "os", "modules"}
    assert imported_packages(source, deferred=False) == {"loader", "stages", "os", "modules"}


def test_utils_imports_nothing_above_it() -> None:
    offenders = {path.name: sorted(imported_packages(path.read_text()) & UPPER_PACKAGES)
                 for path in sorted((ROOT / "utils").glob("*.py"))}
    assert {name: pkgs for name, pkgs in offenders.items() if pkgs} == {}
    assert "config.py" in offenders  # the glob found the package


NETWORK_AND_ARCHIVE_MODULES = {"urllib", "gdown", "tarfile", "zipfile", "requests"}


def project_files() -> list[Path]:
    """The project's Python files: not those of a virtual environment inside the checkout (CI's .ci-venv,
    a user's venv/) or of hidden folders."""
    def ours(path: Path) -> bool:
        parts = path.relative_to(ROOT).parts
        return not any(p.startswith(".") for p in parts) and not (ROOT / parts[0] / "pyvenv.cfg").exists()
    return sorted(p for p in ROOT.rglob("*.py") if ours(p))


def test_the_download_feature_lives_in_one_package() -> None:
    """Transfers, Drive and archives are in downloads/ (download.py is its thin script); no other module
    of the project opens a connection or an archive."""
    outside = {str(path.relative_to(ROOT)): sorted(imported_packages(path.read_text()) & NETWORK_AND_ARCHIVE_MODULES)
               for path in project_files()
               if path.relative_to(ROOT).parts[0] not in ("downloads", "tests", "benchmarks")}
    assert {name: pkgs for name, pkgs in outside.items() if pkgs} == {}
    assert {"sources.py", "transfer.py", "drive.py", "archives.py", "fetch.py"} <= \
        {p.name for p in (ROOT / "downloads").glob("*.py")}
