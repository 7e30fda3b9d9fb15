"""Where each stage stands, from the files on disk and `squeue` where present (no SLURM accounting), so it
works from any login node after the submitting shell is gone.

not started | queued | running (epoch k/n from the state file) | interrupted (state saved) | done | failed |
stale (done, but its record does not fit the row: launch/records.py) | blocked
"""
from __future__ import annotations

import dataclasses
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from launch.jobs import job_file
from launch.records import stale_reason
from launch.rows import Row, Stage

ACTIVE = {"PENDING": "queued", "REQUEUED": "queued", "REQUEUE_HOLD": "queued", "REQUEUE_FED": "queued",
          "CONFIGURING": "running", "RUNNING": "running", "COMPLETING": "running", "SUSPENDED": "running",
          "RESIZING": "running", "SIGNALING": "running", "STAGE_OUT": "running"}
ERROR_LINE = re.compile(r"^(error|Error)\b|^\w*(Error|Exception)\b:|Traceback|Killed|CANCELLED|oom-kill")


@dataclass
class StageStatus:
    stage: Stage
    state: str            # one of the words above
    detail: str = ""      # epoch, job id, log and its last error line


def is_done(stage: Stage) -> bool:
    return stage.artifact.exists() and (stage.state is None or not stage.state.exists())


def squeue_states() -> dict[str, str]:
    """SLURM job id -> state of every job squeue knows (empty without squeue or a reachable controller)."""
    if shutil.which("squeue") is None:
        return {}
    out = subprocess.run(["squeue", "-h", "-a", "-o", "%i|%T"], capture_output=True, text=True)
    if out.returncode != 0:
        return {}
    return dict(line.split("|", 1) for line in out.stdout.split() if "|" in line)


def active_job(stage: Stage, log_dir: str, jobs: dict[str, str]) -> str | None:
    """The recorded job of this stage, if SLURM still has it queued or running."""
    path = job_file(log_dir, stage, ".jobid")
    job = path.read_text().strip() if path.exists() else ""
    return job if job and jobs.get(job) in ACTIVE else None


def progress(stage: Stage) -> str:
    """`epoch k/n, s step(s) of it done` from the stage's state file ('' when there is none)."""
    if stage.state is None or not stage.state.exists():
        return ""
    import torch
    try:
        state = torch.load(stage.state, map_location="cpu", weights_only=False, mmap=True)
        epoch, steps = state["epoch"], state["step_in_epoch"]
    except Exception:  # being replaced right now, or unreadable: say so rather than fail
        return f"state file {stage.state} unreadable"
    return f"epoch {min(epoch + 1, stage.epochs)}/{stage.epochs}, {steps} step(s) of it done"


def last_error(log: Path) -> str:
    """The log's last error line (else its last line)."""
    if not log.exists():
        return "(no log)"
    lines = [line.strip() for line in log.read_text(errors="replace").replace("\r", "\n").splitlines()
             if line.strip() and not line.startswith("[reproduce]")]
    errors = [line for line in lines if ERROR_LINE.search(line)]
    return (errors or lines or ["(empty log)"])[-1]


def stage_status(stage: Stage, log_dir: str, jobs: dict[str, str]) -> StageStatus:
    job = active_job(stage, log_dir, jobs)
    if job is not None:
        word = ACTIVE[jobs[job]]
        shown = progress(stage) if word == "running" else ""
        return StageStatus(stage, word, f"job {job}" + (f", {shown}" if shown else ""))
    if is_done(stage):
        return done_or_stale(stage)
    log = job_file(log_dir, stage, ".log")
    exit_file = job_file(log_dir, stage, ".exit")
    code = exit_file.read_text().strip() if exit_file.exists() else ""
    if code and code != "0":
        shown = progress(stage)
        where = f"log {log}: {last_error(log)}"
        if shown and code == "130":
            return StageStatus(stage, "interrupted", f"{shown}; run again to resume; {where}")
        return StageStatus(stage, "failed", f"exit {code}; {where}")
    shown = progress(stage)
    if shown:
        return StageStatus(stage, "interrupted", f"{shown}; run again to resume")
    return StageStatus(stage, "not started")


def done_or_stale(stage: Stage) -> StageStatus:
    """A stage whose artifact is there: done, or stale with the reason its record gives."""
    reason = stale_reason(stage)
    return StageStatus(stage, "stale", f"{reason}; `run` redoes it") if reason else \
        StageStatus(stage, "done", str(stage.artifact))


def row_status(stages: list[Stage], log_dir: str, jobs: dict[str, str]) -> list[StageStatus]:
    """Every stage's status; a stage that waits for a failed one says so, and a done stage made on top of
    one that is stale or being made again is stale too."""
    found = [stage_status(s, log_dir, jobs) for s in stages]
    by_name = {f.stage.name: f for f in found}
    for f in found:
        blocked = [a for a in f.stage.after if by_name[a].state in ("failed", "blocked")]
        if f.state == "not started" and blocked:
            f.state, f.detail = "blocked", f"{blocked[0]} did not finish"
        under = [a for a in f.stage.after if by_name[a].state in ("stale", "queued", "running", "interrupted")]
        if f.state == "done" and under:
            f.state, f.detail = "stale", f"made on {under[0]}, which is {by_name[under[0]].state} now"
    return found


def summary(statuses: list[StageStatus]) -> str:
    """One word for a row: done, failed, running, queued, partial or not started."""
    states = {s.state for s in statuses}
    for word in ("failed", "running", "queued", "stale"):
        if word in states:
            return word
    if states == {"done"}:
        return "done"
    return "partial" if states & {"done", "interrupted"} else "not started"


def format_status(plan: list[tuple[Row, list[Stage]]], log_dir: str) -> str:
    jobs = squeue_states()
    lines = []
    for row, stages in plan:
        statuses = row_status(stages, log_dir, jobs)
        lines.append(f"{row.dataset} {row.backbone} {row.structure} {describe(row)}: {summary(statuses)}")
        for s in statuses:
            lines.append(f"  {s.stage.script:<22} {s.state:<12} {s.detail}".rstrip())
    return "\n".join(lines)


def to_run(stage: Stage, upstream_redone: bool) -> Stage | None:
    """What `run` does with a stage not queued or running: None when it is done (said so), the stage itself
    when it has no artifact, and the stage with --overwrite when it is stale or a stage before it is being
    redone (said so, with the reason)."""
    if not is_done(stage):
        return stage
    reason = "a stage before it is being redone" if upstream_redone else stale_reason(stage)
    if not reason:
        print(f"[reproduce] {stage.name}: done ({stage.artifact})", flush=True)
        return None
    print(f"[reproduce] {stage.name}: stale, {reason}: redoing it", flush=True)
    return stage if "--overwrite" in stage.argv else dataclasses.replace(stage, argv=(*stage.argv, "--overwrite"))


def describe(row: Row) -> str:
    """`K=32 p=32 batch=8 seed=1`: the parts of a row beyond dataset, backbone and structure."""
    sizes = row.sizes
    return f"K={sizes['num_codebook']} p={sizes['projection_dim']} batch={sizes['batch_size']} seed={row.seed}"
