"""One batch script per stage, under <log_dir>/reproduce/: `bash` runs it here, `sbatch` on a cluster.

Beside `<job name>.sh` the files of the stage: `.log` (its output, appended across requeues), `.exit`
(the exit status of its last run), `.jobid` (the SLURM job that runs it), `.commit` (the git commit
that ran it).

Signals. SLURM signals every process of a job when it preempts, requeues or cancels it (DataLoader
workers included), and the batch shell alone at `--signal=B:TERM@60` before the time limit. The batch
shell traps SIGTERM and forwards ONE SIGTERM to the stage's main process; the stage finishes the step,
saves its state and exits 143 (stages/trainer.py: its DataLoader workers ignore stop signals, and a
repeated SIGTERM, SLURM's own beside the forwarded one, is ignored). If SLURM is not requeueing the job already (time limit),
the script requeues it; the requeued run finds the state file and continues with --resume.
"""
from __future__ import annotations

import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from launch.rows import Stage

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Resources:
    partition: str | None = None
    account: str | None = None
    time: str | None = None
    cpus: int | None = None      # per task
    gpus: int = 0                # per job; 0 = CPU
    mem: str | None = None
    extra: str = ""              # more sbatch options, as one string

    def sbatch_lines(self) -> list[str]:
        lines = ["--open-mode=append", "--requeue", "--signal=B:TERM@60", "--kill-on-invalid-dep=yes",
                 "--nodes=1", "--ntasks=1"]
        for flag, value in (("partition", self.partition), ("account", self.account), ("time", self.time),
                            ("mem", self.mem)):
            if value:
                lines.append(f"--{flag}={value}")
        if self.cpus:
            lines.append(f"--cpus-per-task={self.cpus * max(1, self.gpus)}")  # torchrun: one task, a process per GPU
        if self.gpus:
            lines.append(f"--gres=gpu:{self.gpus}")
        return lines


def job_dir(log_dir: str) -> Path:
    return Path(log_dir) / "reproduce"


def job_file(log_dir: str, stage: Stage, suffix: str) -> Path:
    return job_dir(log_dir) / f"{stage.name}{suffix}"


def commit() -> str:
    """The repository's commit (with -dirty when tracked files changed), or 'unknown' outside git."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True).stdout.strip()
    head = git("rev-parse", "--short", "HEAD")
    if not head:
        return "unknown"
    return head + ("-dirty" if git("status", "--porcelain", "--untracked-files=no") else "")


def write_script(stage: Stage, log_dir: str, resources: Resources | None, device_flags: list[str]) -> Path:
    """Write `<log_dir>/reproduce/<job name>.sh` (resources: the #SBATCH lines; None: a local run)."""
    q = shlex.quote
    log, exit_file = job_file(log_dir, stage, ".log"), job_file(log_dir, stage, ".exit")
    commit_file = job_file(log_dir, stage, ".commit")
    if resources is not None and resources.gpus > 1:
        command = ["torchrun", "--standalone", f"--nproc_per_node={resources.gpus}", str(REPO / f"{stage.script}.py")]
    else:
        command = [sys.executable, str(REPO / f"{stage.script}.py")]
    command += [*stage.argv, *device_flags]
    state = str(stage.state.absolute()) if stage.state is not None else ""
    lines = ["#!/bin/bash", f"#SBATCH --job-name={stage.name}", f"#SBATCH --output={log.absolute()}"]
    if resources is not None:
        lines += [f"#SBATCH {line}" for line in resources.sbatch_lines()]
    lines += [
        f"# Stage {stage.script} written by reproduce.py; run it again with `sbatch {q(str(stage.name))}.sh`"
        f" (from this folder) or `bash` it.",
        "set -u",
        f"cd {q(str(Path.cwd()))}  # where reproduce.py ran: the relative paths below start here",
        f"state={q(state)}",
        f"artifact={q(str(stage.artifact.absolute()))}",
        f"exit_file={q(str(exit_file.absolute()))}",
        'stamp() { date -u +%Y-%m-%dT%H:%M:%SZ; }',
        f'echo "[reproduce] $(stamp) {stage.name}: start (job ${{SLURM_JOB_ID:-local}},'
        f' restart ${{SLURM_RESTART_COUNT:-0}})"',
        'rm -f "$exit_file"',
        f"echo {q(commit())} > {q(str(commit_file.absolute()))}",
        *([] if "--overwrite" in stage.argv else [  # --overwrite: reproduce.py redoes a stale artifact
            'if [ -e "$artifact" ] && { [ -z "$state" ] || [ ! -e "$state" ]; }; then',
            '    echo "[reproduce] $artifact exists: nothing to do"; echo 0 > "$exit_file"; exit 0',
            "fi"]),
        f"cmd=({' '.join(q(c) for c in command)})",
        'if [ -n "$state" ] && [ -e "$state" ]; then',
        '    cmd+=(--resume)',
        '    echo "[reproduce] $(stamp) resuming from $state (restart ${SLURM_RESTART_COUNT:-0})"',
        "fi",
        "forwarded=",
        "forward() {  # one SIGTERM to the stage's main process: it finishes the step and saves its state",
        '    if [ -z "$forwarded" ]; then forwarded=1; echo "[reproduce] $(stamp) SIGTERM: asking the stage'
        ' to save its state"; kill -TERM "$child" 2>/dev/null; fi',
        "}",
        '"${cmd[@]}" &',
        "child=$!",
        "trap forward TERM",
        "trap : INT  # Ctrl-C of a local run reaches the stage directly; wait for it to save",
        'while :; do wait "$child"; rc=$?; kill -0 "$child" 2>/dev/null || break; done',
        'echo "$rc" > "$exit_file"',
        'echo "[reproduce] $(stamp) exit status $rc"',
        'if [ "$rc" -ne 0 ] && [ -n "$forwarded" ] && [ -n "${SLURM_JOB_ID:-}" ] && [ -n "$state" ] && [ -e "$state" ]; then',
        '    echo "[reproduce] state saved in $state; requeueing job $SLURM_JOB_ID"',
        '    scontrol requeue "$SLURM_JOB_ID" 2>/dev/null || true  # already being requeued: nothing to add',
        "fi",
        'exit "$rc"',
        ""]
    path = job_file(log_dir, stage, ".sh")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".sh.tmp")
    tmp.write_text("\n".join(lines))
    tmp.replace(path)
    path.chmod(0o755)
    return path
