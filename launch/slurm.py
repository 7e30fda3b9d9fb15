"""`--launcher slurm`: one sbatch job per stage and row, chained with afterok; shared stages once.

A stage already done is not submitted; one whose recorded job is still queued or running is not
submitted again (its job id is the dependency of the stages after it); a partial one is submitted and
resumes from its state file. If sbatch refuses a job, the jobs this call submitted are cancelled.
"""
from __future__ import annotations

import shlex
import shutil
import subprocess
import time

from launch.jobs import Resources, job_file, write_script
from launch.rows import Row, Settings, Stage
from launch.status import ACTIVE, active_job, row_status, squeue_states, to_run
from utils.errors import UserError


def check_sbatch() -> None:
    for tool in ("sbatch", "squeue", "scancel"):
        if shutil.which(tool) is None:
            raise UserError(f"--launcher slurm: {tool} not found on PATH (run on a SLURM login node, or use "
                            f"--launcher local)")


def submit(plan: list[tuple[Row, list[Stage]]], settings: Settings, resources: Resources) -> list[str]:
    """Submit what is missing; the job ids submitted now."""
    jobs = squeue_states()
    device = ["--device", "cpu"] if resources.gpus == 0 else []
    job_of: dict[str, str | None] = {}     # stage name -> job id to wait for (None: done)
    submitted: list[str] = []
    try:
        for row, stages in plan:
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
    """Block until no stage of the plan is queued or running; 1 if a stage failed (it is named), else 0."""
    while True:
        jobs = squeue_states()
        if not any(active_job(s, settings.log_dir, jobs) for _, stages in plan for s in stages):
            break
        time.sleep(poll_s)
    failed = [s for _, stages in plan for s in row_status(stages, settings.log_dir, {}) if s.state == "failed"]
    for s in {f.stage.name: f for f in failed}.values():
        print(f"[reproduce] failed: {s.stage.name}: {s.detail}")
    return 1 if failed else 0
