"""The repository's scripts and their flag parsers, read from the code (for docs/flags.md and the docs checks).

A stage script calls `cli("<stage>", ...)` (stages/cli.py): its parser is `utils.config.build_parser(stage)`.
Another script with its own parser has a module-level `build_parser()` (download.py, crop_dataset.py) or
calls `main` of a module that has one (reproduce.py: launch/cli.py)."""
from __future__ import annotations

import argparse
import ast
import importlib
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Script:
    name: str                  # file name, e.g. "train_mediator.py"
    stage: str | None          # the stage of a stage script, else None
    parser_module: str | None  # the module whose build_parser() parses a non-stage script's flags

    def parser(self) -> argparse.ArgumentParser:
        if self.stage is not None:
            from loader.datasets_table import DATASETS
            from utils.config import build_parser
            return build_parser(self.stage, DATASETS)
        return importlib.import_module(self.parser_module).build_parser()


def _script_of(path: Path) -> Script | None:
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "cli" and node.args \
                and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
            return Script(path.name, node.args[0].value, None)
    if any(isinstance(n, ast.FunctionDef) and n.name == "build_parser" for n in tree.body):
        return Script(path.name, None, path.stem)
    for node in tree.body:  # `from launch.cli import main`: the parser lives beside that main
        if isinstance(node, ast.ImportFrom) and node.module and any(a.name == "main" for a in node.names):
            return Script(path.name, None, node.module)
    return None


def scripts(root: Path = ROOT) -> dict[str, Script]:
    """Every script at the repository root that parses flags, by file name: the stage scripts in pipeline order,
    then the others."""
    from utils.config import STAGES
    order = {stage: i for i, stage in enumerate(STAGES)}
    found = [s for p in sorted(root.glob("*.py")) if (s := _script_of(p)) is not None]
    return {s.name: s for s in sorted(found, key=lambda s: (order.get(s.stage, len(order)), s.name))}


def subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """The subcommands of `parser` (download.py backbone, reproduce.py run, ...), empty when it has none."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def option_strings(parser: argparse.ArgumentParser) -> set[str]:
    """Every --flag `parser` itself accepts (not those of its subcommands)."""
    return {o for a in parser._actions for o in a.option_strings}
