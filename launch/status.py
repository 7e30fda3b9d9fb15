"""Where each stage stands, from the files on disk and `squeue` where present (no SLURM accounting), so it
works from any login node after the submitting shell is gone.

not started | queued | running (epoch k/n from the state file) | interrupted (state saved) |
interrupted (requeued) (stopped with its state saved, its job queued again) | done |
stale (done, but its record does not fit the row: launch/records.py) | failed (non-zero exit) |
cancelled (its job ended before it started: scancel, or --kill-on-invalid-dep after a failed dependency) |
killed (its job ended while it ran without an exit status: time limit, scancel, node failure) |
blocked (a stage it waits for did not finish) | unknown (squeue failed)
"""
from __future__ import annotations

import dataclasses
import re
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from launch.jobs import job_file
from launch.records import record, stale_reason
from launch.rows import Row, Stage
from utils.errors import UserError

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


class SqueueFailed(UserError):
    """squeue answered with an error every time it was asked: what is queued or running is unknown."""


def squeue_states(tries: int = 3, pause_s: float = 2.0) -> dict[str, str]:
    """SLURM job id -> state of every job squeue knows, ended ones included while SLURM keeps them (MinJobAge).

    Empty without squeue on PATH (nothing can be queued then). An squeue error is retried `tries` times,
    then raised as SqueueFailed: it never reads as "nothing is running"."""
    if shutil.which("squeue") is None:
        return {}
    for attempt in range(tries):
        out = subprocess.run(["squeue", "-h", "-a", "--states=all", "-o", "%i|%T"], capture_output=True, text=True)
        if out.returncode == 0:
            return dict(line.split("|", 1) for line in out.stdout.split() if "|" in line)
        if attempt + 1 < tries:
            time.sleep(pause_s)
    message = " ".join(out.stderr.split()) or f"exit status {out.returncode}"
    raise SqueueFailed(f"squeue failed {tries} times ({message}): which jobs are queued or running is unknown")


def known_jobs(stages: list[Stage], log_dir: str, strict: bool = True) -> dict[str, str] | None:
    """squeue's job states, asked only when a stage has a recorded job (else {}: nothing of ours can be queued).
    squeue failing: SqueueFailed when `strict`, else None (the stages with a job then read `unknown`)."""
    if not any(recorded_job(s, log_dir) for s in stages):
        return {}
    try:
        return squeue_states()
    except SqueueFailed:
        if strict:
            raise
        return None


def recorded_job(stage: Stage, log_dir: str) -> str:
    """The SLURM job last submitted for this stage ('' when none was)."""
    path = job_file(log_dir, stage, ".jobid")
    return path.read_text().strip() if path.exists() else ""


def active_job(stage: Stage, log_dir: str, jobs: dict[str, str]) -> str | None:
    """The recorded job of this stage, if SLURM still has it queued or running."""
    job = recorded_job(stage, log_dir)
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


ATTEMPT_START = re.compile(r"^\[reproduce\] \S+ \S+: start \(job (\S+), restart \d+\)$")


def last_attempt(log: Path) -> list[str]:
    """The lines of the log's last attempt: the log is appended across requeues and reruns, and each attempt
    starts with the batch script's `[reproduce] <time> <job name>: start (job <id>, restart <n>)` line."""
    lines = log.read_text(errors="replace").replace("\r", "\n").splitlines()
    starts = [i for i, line in enumerate(lines) if ATTEMPT_START.match(line)]
    return lines[starts[-1]:] if starts else lines


def job_started(log: Path, job: str) -> bool:
    """Whether an attempt of SLURM job `job` started (its batch script ran and marked the log)."""
    return log.exists() and any((m := ATTEMPT_START.match(line)) and m.group(1) == job
                                for line in log.read_text(errors="replace").splitlines())


def last_error(log: Path) -> str:
    """The last error line of the log's last attempt (else its last line)."""
    if not log.exists():
        return "(no log)"
    lines = [line.strip() for line in last_attempt(log) if line.strip() and not line.startswith("[reproduce]")]
    errors = [line for line in lines if ERROR_LINE.search(line)]
    return (errors or lines or ["(empty log)"])[-1]


STOPPED = ("130", "143")  # exit status of a stage stopped by SIGINT / SIGTERM (its state saved)


def stage_status(stage: Stage, log_dir: str, jobs: dict[str, str] | None) -> StageStatus:
    """`jobs`: squeue's job states (None: squeue failed, so a recorded job's fate is unknown)."""
    log = job_file(log_dir, stage, ".log")
    exit_file = job_file(log_dir, stage, ".exit")
    code = exit_file.read_text().strip() if exit_file.exists() else ""
    job = active_job(stage, log_dir, jobs or {})
    if job is not None:
        word = ACTIVE[jobs[job]]
        shown = progress(stage)
        if word == "queued" and code in STOPPED and shown:  # stopped, state saved, queued again: it resumes
            return StageStatus(stage, "interrupted (requeued)", f"job {job} queued again, resumes at {shown}")
        shown = shown if word == "running" else ""
        return StageStatus(stage, word, f"job {job}" + (f", {shown}" if shown else ""))
    if is_done(stage):
        return done_or_stale(stage)
    if code and code != "0":
        shown = progress(stage)
        where = f"log {log}: {last_error(log)}"
        if shown and code in STOPPED:
            return StageStatus(stage, "interrupted", f"{shown}; run again to resume; {where}")
        return StageStatus(stage, "failed", f"exit {code}; {where}")
    ended = _ended_without_exit(stage, log_dir, jobs) if not code else None
    if ended is not None:
        return ended
    shown = progress(stage)
    if shown:
        return StageStatus(stage, "interrupted", f"{shown}; run again to resume")
    return StageStatus(stage, "not started")


def _ended_without_exit(stage: Stage, log_dir: str, jobs: dict[str, str] | None) -> StageStatus | None:
    """A submitted job that is gone from the queue without writing `.exit`: cancelled before it started, or
    killed while it ran (hard-killed at the time limit, scancel, node failure). None: no job was submitted."""
    job = recorded_job(stage, log_dir)
    if not job:
        return None
    if jobs is None:
        return StageStatus(stage, "unknown", f"job {job}: squeue failed, so whether it is queued is unknown")
    log = job_file(log_dir, stage, ".log")
    said = f" (SLURM: {jobs[job]})" if job in jobs else ""
    if job_started(log, job):
        return StageStatus(stage, "killed", f"job {job}{said} ended while running, without an exit status "
                                            f"(time limit, scancel or node failure); log {log}: {last_error(log)}")
    return StageStatus(stage, "cancelled", f"job {job}{said} ended before it started (scancel, or a stage it "
                                           f"waits for failed: --kill-on-invalid-dep)")


def done_or_stale(stage: Stage) -> StageStatus:
    """A stage whose artifact is there: done, or stale with the reason its record gives."""
    reason = stale_reason(stage)
    return StageStatus(stage, "stale", f"{reason}; `run` redoes it") if reason else \
        StageStatus(stage, "done", str(stage.artifact))


UNFINISHED = ("failed", "killed", "cancelled", "blocked", "interrupted")


def row_status(stages: list[Stage], log_dir: str, jobs: dict[str, str] | None) -> list[StageStatus]:
    """Every stage's status; a stage that waits for one that did not finish says so (blocked), and a done
    stage made on top of one that is stale or being made again is stale too."""
    found = [stage_status(s, log_dir, jobs) for s in stages]
    by_name = {f.stage.name: f for f in found}
    for f in found:
        blocked = [a for a in f.stage.after if by_name[a].state in UNFINISHED]
        if f.state in ("not started", "cancelled") and blocked:
            also = f"; {f.detail}" if f.state == "cancelled" else ""
            f.state, f.detail = "blocked", f"{blocked[0]} did not finish{also}"
        under = [a for a in f.stage.after
                 if by_name[a].state in ("stale", "queued", "running", "interrupted", "interrupted (requeued)")]
        if f.state == "done" and under:
            f.state, f.detail = "stale", f"made on {under[0]}, which is {by_name[under[0]].state} now"
    return found


def summary(statuses: list[StageStatus]) -> str:
    """One word for a row: done, failed, running, queued, partial or not started."""
    states = {s.state for s in statuses}
    if states & {"failed", "killed", "cancelled"}:
        return "failed"
    for word in ("unknown", "running", "queued", "stale"):
        if word in states:
            return word
    if "interrupted (requeued)" in states:
        return "queued"
    if states == {"done"}:
        return "done"
    return "partial" if states & {"done", "interrupted"} else "not started"


def world_sizes(stages: list[Stage]) -> dict[str, int]:
    """Training stage -> the processes it ran with, as its done artifacts record it (`<stage>.world_size`
    in the provenance settings; absent under --published_recipe, where a replica does not depend on it)."""
    sizes: dict[str, int] = {}
    for stage in stages:
        if is_done(stage):
            settings = (record(stage) or {}).get("settings", {})
            sizes.update({k.rsplit(".", 1)[0]: v for k, v in settings.items() if k.endswith(".world_size")})
    return sizes


def world_size_warning(stages: list[Stage]) -> str | None:
    """One line when the stages of a row trained with different numbers of processes (None otherwise)."""
    sizes = world_sizes(stages)
    if len(set(sizes.values())) < 2:
        return None
    ran = ", ".join(f"{stage} {n}" for stage, n in sizes.items())
    return (f"warning: the stages of this row ran at different world sizes ({ran}); under the default recipe the "
            f"learning rate scales with the world size")


def format_status(plan: list[tuple[Row, list[Stage]]], log_dir: str) -> str:
    lines = []
    stages = [s for _, row_stages in plan for s in row_stages]
    try:
        jobs: dict[str, str] | None = known_jobs(stages, log_dir)
    except SqueueFailed as e:
        jobs = None
        lines.append(f"warning: {e}")
    for row, stages in plan:
        statuses = row_status(stages, log_dir, jobs)
        lines.append(f"{row.dataset} {row.backbone} {row.structure} {describe(row)}: {summary(statuses)}")
        warning = world_size_warning(stages)
        if warning:
            lines.append(f"  {warning}")
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
