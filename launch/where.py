"""Which folders `status` and `table` read, and where else the rows are when those hold nothing of them:
under the other recipe's folders (`bash run` writes the default recipe's), or under other settings of the
same backbone (a call without the sizes, seeds or stage flags `run` had)."""
from __future__ import annotations

import dataclasses

from launch.jobs import job_file
from launch.rows import RECIPE_DIRS, Row, Settings, Stage, flags_hash, row_stages


def lines(settings: Settings, plan: list[tuple[Row, list[Stage]]]) -> list[str]:
    """The lines `status` and `table` print first (on stderr)."""
    found = [reading_line(settings), other_recipe_line(settings, plan), other_settings_line(plan, settings.log_dir)]
    return [line for line in found if line]


def reading_line(settings: Settings) -> str:
    """Which recipe and folders `status` and `table` read, and the hash of the stage flags after `--`."""
    hashed = flags_hash(settings.passthrough)
    flags = f"; the stage flags after -- are {hashed} in the folder names" if hashed else ""
    return (f"reading recipe {settings.recipe}: artifacts {settings.output_dir}/, results {settings.results_dir}/, "
            f"jobs {settings.log_dir}/reproduce/{flags}")


def other_recipe_line(settings: Settings, plan: list[tuple[Row, list[Stage]]]) -> str:
    """One line when nothing of the rows is in the folders read but some is under the other recipe's
    (only where the folders are the recipe's own); '' otherwise."""
    if (settings.output_dir, settings.results_dir, settings.log_dir) != RECIPE_DIRS[settings.recipe]:
        return ""
    if any(_has_files(stages, settings.log_dir) for _, stages in plan):
        return ""
    other = next(r for r in RECIPE_DIRS if r != settings.recipe)
    out, results, logs = RECIPE_DIRS[other]
    there = dataclasses.replace(settings, recipe=other, output_dir=out, results_dir=results, log_dir=logs)
    if not any(_has_files(row_stages(row, there), logs) for row, _ in plan):
        return ""
    return (f"nothing of these rows under {settings.output_dir}/ or {settings.results_dir}/ (recipe "
            f"{settings.recipe}), but they have files under {out}/ and {results}/: add --recipe {other}")


def other_settings_line(plan: list[tuple[Row, list[Stage]]], log_dir: str) -> str:
    """One line when nothing of the rows is in their own folders but their backbone's folders hold other
    settings (e.g. `status` without the flags after `--` that `run` had); '' otherwise."""
    if any(_has_files(stages, log_dir) for _, stages in plan):
        return ""
    parents = dict.fromkeys(s.artifact.parent.parent for _, stages in plan for s in stages
                            if s.script in ("train_mediator", "train_front_door_mlp", "train_front_door_tr"))
    found = sorted({child.name for parent in parents if parent.is_dir() for child in parent.iterdir()
                    if child.is_dir()})
    if not found:
        return ""
    mine = sorted({s.artifact.parent.name for _, stages in plan for s in stages if s.script == "train_mediator"})
    return (f"nothing in these rows' folders ({', '.join(mine)}), but their backbone's folders hold other settings "
            f"({', '.join(found)}): pass the sizes, --seed and stage flags after -- that `run` had")


def _has_files(stages: list[Stage], log_dir: str) -> bool:
    return any(s.artifact.exists() or (s.state is not None and s.state.exists())
               or job_file(log_dir, s, ".jobid").exists() for s in stages)
