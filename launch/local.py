"""`--launcher local`: every stage of every row, one after another on this machine, through the same
batch scripts a cluster runs. A done stage is skipped, a partial one resumed; a failed stage stops its
own row's later stages (and those of rows sharing it) and nothing else."""
from __future__ import annotations

import subprocess
import sys

from launch.jobs import job_file, write_script
from launch.rows import Row, Settings, Stage
from launch.status import to_run


def run_local(plan: list[tuple[Row, list[Stage]]], settings: Settings) -> int:
    """Run the plan; 0 when every stage ended done, 1 otherwise (the failed stages are named)."""
    outcome: dict[str, bool] = {}   # stage name -> succeeded (shared stages run once)
    ran: set[str] = set()           # stages run by this call: the stages after them are redone
    failed: list[str] = []
    for row, stages in plan:
        print(f"[reproduce] row {row.dataset} {row.backbone} {row.structure}", flush=True)
        for stage in stages:
            if stage.name not in outcome:
                blocked = [a for a in stage.after if not outcome.get(a, False)]
                if blocked:
                    print(f"[reproduce] {stage.name}: not run, {blocked[0]} failed", flush=True)
                    outcome[stage.name] = False
                    continue
                todo = to_run(stage, upstream_redone=any(a in ran for a in stage.after))
                outcome[stage.name] = todo is None or _run_stage(todo, settings)
                ran.update([stage.name] if todo is not None else [])
                if not outcome[stage.name]:
                    failed.append(stage.name)
    for name in failed:
        print(f"[reproduce] failed: {name}, log {job_file(settings.log_dir, _named(plan, name), '.log')}",
              file=sys.stderr)
    return 1 if failed else 0


def _named(plan: list[tuple[Row, list[Stage]]], name: str) -> Stage:
    return next(s for _, stages in plan for s in stages if s.name == name)


def _run_stage(stage: Stage, settings: Settings) -> bool:
    script = write_script(stage, settings.log_dir, None, [])
    log = job_file(settings.log_dir, stage, ".log")
    print(f"[reproduce] {stage.name}: running (log {log})", flush=True)
    with open(log, "ab") as out:
        proc = subprocess.Popen(["bash", str(script)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        assert proc.stdout is not None
        for chunk in iter(lambda: proc.stdout.read1(65536), b""):
            out.write(chunk)
            out.flush()
            sys.stdout.buffer.write(chunk)
            sys.stdout.flush()
        return proc.wait() == 0
