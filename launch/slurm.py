"""`--launcher slurm`: one sbatch job per stage and row, chained with afterok; shared stages once.

A stage already done is not submitted; one whose recorded job is still queued or running is not
submitted again (its job id is the dependency of the stages after it); a partial one is submitted and
resumes from its state file. If sbatch refuses a job, the jobs this call submitted are cancelled.

Two calls at once (two terminals, two login nodes sharing the file system) take turns: each holds an
exclusive lock on `<log_dir>/reproduce/.submit.lock` (fcntl.flock) from its squeue look-up to its last
sbatch, so the second sees the jobs of the first (recorded in `<job name>.jobid`) and waits for them.
"""
from __future__ import annotations

import contextlib
import fcntl
import shlex
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

from launch.jobs import Resources, job_dir, job_file, write_script
from launch.rows import Row, Settings, Stage
from launch.status import ACTIVE, active_job, known_jobs, row_status, to_run
from utils.errors import UserError


def check_sbatch() -> None:
    for tool in ("sbatch", "squeue", "scancel"):
        if shutil.which(tool) is None:
            raise UserError(f"--launcher slurm: {tool} not found on PATH (run on a SLURM login node, or use "
                            f"--launcher local)")


@contextlib.contextmanager
def submission_lock(folder: Path) -> Iterator[None]:
    """Hold the exclusive lock of `folder/.submit.lock` (waiting, and saying so, while another call holds it).

    flock locks work across the processes of one machine, and across machines when the file system
    supports them (NFSv4, Lustre and GPFS do; some NFSv3 mounts do not: see docs/cluster.md)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / ".submit.lock"
    with open(path, "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"[reproduce] another reproduce.py call is submitting ({path} is locked); waiting for it",
                  flush=True)
            fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def submit(plan: list[tuple[Row, list[Stage]]], settings: Settings, resources: Resources) -> list[str]:
    """Submit what is missing; the job ids submitted now."""
    with submission_lock(job_dir(settings.log_dir)):
        jobs = known_jobs([s for _, stages in plan for s in stages], settings.log_dir)
        device = ["--device", "cpu"] if resources.gpus == 0 else []
        job_of: dict[str, str | None] = {}     # stage name -> job id to wait for (None: done)
        submitted: list[str] = []
        try:
            for _, stages in plan:
                for stage in stages:
                    if stage.name in job_of:
                        continue
                    job_of[stage.name] = _submit_stage(stage, settings, resources, device, jobs, job_of, submitted)
        except UserError:
            if submitted:
                subprocess.run(["scancel", *submitted], capture_output=True)
            raise
    return submitted


def _submit_stage(stage: Stage, settings: Settings, resources: Resources, device: list[str],
                  jobs: dict[str, str], job_of: dict[str, str | None], submitted: list[str]) -> str | None:
    running = active_job(stage, settings.log_dir, jobs)
    if running is not None:
        print(f"[reproduce] {stage.name}: already {ACTIVE[jobs[running]]} as job {running}")
        return running
    stage = to_run(stage, upstream_redone=any(job_of.get(a) for a in stage.after))
    if stage is None:
        return None
    script = write_script(stage, settings.log_dir, resources, device)
    after = [job_of[a] for a in stage.after if job_of.get(a)]
    cmd = ["sbatch", "--parsable"] + ([f"--dependency=afterok:{':'.join(after)}"] if after else [])
    cmd += shlex.split(resources.extra) + [str(script)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        message = " ".join(out.stderr.split()) or f"exit status {out.returncode}"
        raise UserError(f"sbatch refused {stage.name}: {message}; cancelled the {len(submitted)} job(s) this "
                        f"call submitted")
    job = out.stdout.strip().split(";")[0]
    job_file(settings.log_dir, stage, ".jobid").write_text(job + "\n")
    job_file(settings.log_dir, stage, ".exit").unlink(missing_ok=True)
    submitted.append(job)
    print(f"[reproduce] {stage.name}: submitted job {job}" + (f" (after {', '.join(after)})" if after else ""))
    return job


def wait_for(plan: list[tuple[Row, list[Stage]]], settings: Settings, poll_s: float = 2.0) -> int:
    """Block until no stage of the plan is queued or running; 0 when every stage is done, else 1, with each
    stage that is not done named with its state (failed, cancelled, killed, interrupted, blocked ...).
    squeue failing (after its retries) stops the wait with an error: it never reads as "nothing running"."""
    stages = list({s.name: s for _, row_stages in plan for s in row_stages}.values())
    while True:
        jobs = known_jobs(stages, settings.log_dir)
        if not any(active_job(s, settings.log_dir, jobs) for s in stages):
            break
        time.sleep(poll_s)
    statuses = {s.stage.name: s for _, row_stages in plan for s in row_status(row_stages, settings.log_dir, jobs)}
    unfinished = [s for s in statuses.values() if s.state != "done"]
    for s in unfinished:
        print(f"[reproduce] {s.state}: {s.stage.name}: {s.detail}".rstrip(": "))
    if unfinished:
        print(f"[reproduce] {len(unfinished)} of {len(statuses)} stage(s) not done", flush=True)
    return 1 if unfinished else 0
