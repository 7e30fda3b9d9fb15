"""One batch script per stage, under <log_dir>/reproduce/: `bash` runs it here, `sbatch` on a cluster.

Beside `<job name>.sh` the files of the stage: `.log` (its output, appended across requeues), `.exit`
(the exit status of its last run), `.jobid` (the SLURM job that runs it), `.commit` (the git commit
that ran it).

Signals, preemption and requeue: docs/cluster.md#signals-preemption-and-requeue (the one description).
In short: the batch shell traps SIGTERM (SLURM sends it to the batch shell alone at `--signal=B:TERM@60`,
and to every process of the job when it preempts, requeues or cancels it) and forwards ONE SIGTERM to
the stage; a stage stopped with its state saved exits 143, and the script then requeues its own job
(`scontrol requeue`, harmless when SLURM is requeueing it already); the requeued run resumes with
--resume. A stage stopped during its last step has finished: it exits 0 and is not requeued.

Several processes per job (`--nproc N`, default the GPUs per job): one task whose launcher is the
submitting interpreter, `<python> -m utils.distributed --standalone --nproc_per_node N` (torchrun's
flags, exit 143 on SIGTERM instead of torchrun's traceback), never a `torchrun` found on PATH.
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
    nproc: int = 1               # processes per job (one task; >1: utils.distributed starts them)

    def sbatch_lines(self) -> list[str]:
        lines = ["--open-mode=append", "--requeue", "--signal=B:TERM@60", "--kill-on-invalid-dep=yes",
                 "--nodes=1", "--ntasks=1"]
        for flag, value in (("partition", self.partition), ("account", self.account), ("time", self.time),
                            ("mem", self.mem)):
            if value:
                lines.append(f"--{flag}={value}")
        if self.cpus:
            lines.append(f"--cpus-per-task={self.cpus * self.nproc}")  # one task, its launcher starts the processes
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


def threads_line(resources: Resources | None) -> list[str]:
    """With --slurm_cpus: each process's threads, unless the environment sets them (a job whose node is
    shared would otherwise run torch on every core of the node, as many times as jobs share it)."""
    if resources is None or not resources.cpus:
        return []
    return [f"export OMP_NUM_THREADS=${{OMP_NUM_THREADS:-{resources.cpus}}}  # --slurm_cpus: threads per process"]


def write_script(stage: Stage, log_dir: str, resources: Resources | None, device_flags: list[str]) -> Path:
    """Write `<log_dir>/reproduce/<job name>.sh` (resources: the #SBATCH lines; None: a local run)."""
    q = shlex.quote
    log, exit_file = job_file(log_dir, stage, ".log"), job_file(log_dir, stage, ".exit")
    commit_file = job_file(log_dir, stage, ".commit")
    nproc = resources.nproc if resources is not None else 1
    launcher = ["-m", "utils.distributed", "--standalone", f"--nproc_per_node={nproc}"] if nproc > 1 else []
    command = [sys.executable, *launcher, str(REPO / f"{stage.script}.py"), *stage.argv, *device_flags]
    state = str(stage.state.absolute()) if stage.state is not None else ""
    lines = ["#!/bin/bash", f"#SBATCH --job-name={stage.name}", f"#SBATCH --output={log.absolute()}"]
    if resources is not None:
        lines += [f"#SBATCH {line}" for line in resources.sbatch_lines()]
    lines += [
        f"# Stage {stage.script} written by reproduce.py; run it again with `sbatch {q(str(stage.name))}.sh`"
        f" (from this folder) or `bash` it.",
        "set -u",
        f"cd {q(str(Path.cwd()))}  # where reproduce.py ran: the relative paths below start here",
        f'export PYTHONPATH={q(str(REPO))}${{PYTHONPATH:+:$PYTHONPATH}}  # python -m utils.distributed',
        *threads_line(resources),
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
        '    # still RUNNING: the time limit is near (--signal=B:TERM@60); cancelled, preempted or requeued by',
        '    # SLURM: not ours to requeue (a user\'s scancel stays a cancel)',
        '    job_state=$(squeue -h -j "$SLURM_JOB_ID" -o %T 2>/dev/null)',
        '    if [ "$job_state" = RUNNING ]; then',
        '        echo "[reproduce] state saved in $state; requeueing job $SLURM_JOB_ID"',
        '        scontrol requeue "$SLURM_JOB_ID" 2>/dev/null || true',
        "    else",
        '        echo "[reproduce] state saved in $state; job $SLURM_JOB_ID is ${job_state:-gone}: not requeued here"',
        "    fi",
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
