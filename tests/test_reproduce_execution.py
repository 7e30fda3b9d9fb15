"""reproduce.py's process side without a cluster: the submission lock under a deterministic race, squeue
errors, the truth of `--wait` and `status` (cancelled, killed, interrupted (requeued), the last attempt's
error line), and the command of a job with several processes. A stand-in SLURM (sbatch, squeue, scancel)
answers the launcher's subprocess calls; tests/test_reproduce_slurm.py runs the real one."""
from __future__ import annotations

import fcntl
import shlex
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from launch import slurm, status
from launch.cli import build_parser, main, make_plan, settings_of
from launch.jobs import Resources, job_file, write_script
from launch.status import format_status, row_status
from tests.conftest import TOY_CKPT

REAL_RUN = subprocess.run


class FakeSlurm:
    """sbatch, squeue and scancel as the launcher calls them; other commands run for real. With `pause`,
    the first sbatch waits for `go` (and sets `in_sbatch`): its caller holds the submission lock meanwhile."""

    def __init__(self, pause: bool = False, squeue_fails: bool = False) -> None:
        self.jobs: dict[str, tuple[str, list[str]]] = {}   # job id -> (job name, sbatch command)
        self.state: dict[str, str] = {}
        self.squeue_calls = 0
        self.pause, self.squeue_fails = pause, squeue_fails
        self.in_sbatch, self.go = threading.Event(), threading.Event()
        self.lock = threading.Lock()

    def run(self, cmd, *args, **kwargs):
        if cmd[0] == "squeue":
            self.squeue_calls += 1
            if self.squeue_fails:
                return subprocess.CompletedProcess(cmd, 1, "", "slurm_load_jobs error: Socket timed out")
            out = "".join(f"{job}|{self.state[job]}\n" for job in self.jobs)
            return subprocess.CompletedProcess(cmd, 0, out, "")
        if cmd[0] == "sbatch":
            if self.pause and not self.in_sbatch.is_set():
                self.in_sbatch.set()
                assert self.go.wait(30)
            name = next(line.split("=", 1)[1] for line in Path(cmd[-1]).read_text().splitlines()
                        if line.startswith("#SBATCH --job-name="))
            with self.lock:
                job = str(1001 + len(self.jobs))
                self.jobs[job], self.state[job] = (name, list(cmd)), "PENDING"
            return subprocess.CompletedProcess(cmd, 0, f"{job}\n", "")
        if cmd[0] == "scancel":
            return subprocess.CompletedProcess(cmd, 0, "", "")
        return REAL_RUN(cmd, *args, **kwargs)

    def submitted(self, name_end: str) -> list[str]:
        return [job for job, (name, _) in self.jobs.items() if name.endswith(name_end)]


@pytest.fixture
def fake_slurm(monkeypatch):
    def install(**kwargs) -> FakeSlurm:
        fake = FakeSlurm(**kwargs)
        monkeypatch.setattr(subprocess, "run", fake.run)
        monkeypatch.setattr(status.shutil, "which", lambda tool, *a, **k: f"/fake/{tool}")
        monkeypatch.setattr(status, "time", SimpleNamespace(sleep=lambda s: None), raising=False)  # no pauses
        return fake
    return install


def selectors(root: Path, *more: str) -> list[str]:
    (root / "data" / "toy").mkdir(parents=True, exist_ok=True)
    return ["--dataset", "toy", "--ckpt", str(root / f"{TOY_CKPT}.pth"), "--recipe", "default",
            "--data_dir", str(root / "data"), "--output_dir", str(root / "CAUSE"), "--results_dir",
            str(root / "results"), "--log_dir", str(root / "logs"), "--num_codebook", "32", *more]


def plan_of(root: Path, *more: str):
    args = build_parser().parse_args(["run", "--launcher", "slurm", *selectors(root, *more)])
    settings = settings_of(args, [])
    return make_plan(args, settings), settings


def test_second_caller_waits_for_the_lock_and_depends_on_the_first_callers_jobs(fake_slurm, tmp_path, monkeypatch):
    """MLP and TR rows submitted at once share stage 1 and the k-means baseline. The first caller holds the lock
    while its sbatch of stage 1 hangs; the second blocks on the lock (it has not even asked squeue), then
    submits only its own stages, after the first caller's stage-1 job."""
    fake = fake_slurm(pause=True)
    flock_calls: list[tuple[str, int]] = []
    real_flock = fcntl.flock

    def flock(file, operation):
        flock_calls.append((threading.current_thread().name, operation))
        return real_flock(file, operation)
    monkeypatch.setattr(fcntl, "flock", flock)
    resources = Resources(gpus=0)
    first, second = plan_of(tmp_path, "--structure", "MLP"), plan_of(tmp_path, "--structure", "TR")
    a = threading.Thread(target=slurm.submit, args=(*first, resources), name="first")
    b = threading.Thread(target=slurm.submit, args=(*second, resources), name="second")
    a.start()
    assert fake.in_sbatch.wait(30)
    squeue_before = fake.squeue_calls
    b.start()
    end = time.monotonic() + 30
    while ("second", fcntl.LOCK_EX) not in flock_calls and b.is_alive() and time.monotonic() < end:
        time.sleep(0.01)
    time.sleep(0.2)  # blocked: no squeue look-up of its own while the first caller submits
    blocked = ("second", fcntl.LOCK_EX) in flock_calls and b.is_alive() and fake.squeue_calls == squeue_before
    fake.go.set()
    a.join(30)
    b.join(30)
    assert blocked, f"the second caller did not wait for the lock: {flock_calls}"
    names = [name for name, _ in fake.jobs.values()]
    assert len(names) == len(set(names)) == 8, names  # 2 shared + 3 per row, each once
    mediator, = fake.submitted("train_mediator")
    front_door_tr = fake.jobs[fake.submitted("TR-train_front_door_tr")[0]][1]
    assert f"--dependency=afterok:{mediator}" in front_door_tr


def test_squeue_errors_are_retried_then_reported_never_read_as_nothing_running(fake_slurm, tmp_path, capsys):
    """Stage 1 was submitted before (its job recorded): with squeue failing, `run` submits nothing (stage 1 may
    be running), `--wait` stops with the error, and `status` says that the job's state is unknown."""
    fake = fake_slurm(squeue_fails=True)
    plan, settings = plan_of(tmp_path, "--structure", "TR")
    jobid = job_file(settings.log_dir, plan[0][1][0], ".jobid")
    jobid.parent.mkdir(parents=True)
    jobid.write_text("1001\n")
    code = main(["run", "--launcher", "slurm", "--slurm_gpus", "0", *selectors(tmp_path, "--structure", "TR")])
    err = capsys.readouterr().err
    assert code == 2 and fake.squeue_calls == 3 and not fake.jobs
    assert err.strip().splitlines() == ["error: squeue failed 3 times (slurm_load_jobs error: Socket timed out): "
                                        "which jobs are queued or running is unknown"]
    with pytest.raises(status.SqueueFailed):
        slurm.wait_for(plan, settings, poll_s=0)
    shown = format_status(plan, settings.log_dir).splitlines()
    assert shown[0].startswith("warning: squeue failed 3 times")
    assert "unknown" in shown[2] and "job 1001: squeue failed" in shown[2]


def attempt(job: str, restart: int, *lines: str) -> str:
    return "\n".join([f"[reproduce] 2026-01-01T00:00:0{restart}Z cause-x: start (job {job}, restart {restart})",
                      *lines]) + "\n"


def test_wait_and_status_name_every_stage_that_is_not_done(fake_slurm, tmp_path, capsys):
    """A stage cancelled while queued, its dependents cancelled by --kill-on-invalid-dep, a job killed at its
    time limit (no .exit), and one stopped with its state saved and queued again: --wait exits 1 and names
    each; the error line of a log is its last attempt's."""
    fake = fake_slurm()
    plan, settings = plan_of(tmp_path, "--structure", "TR")
    stages = {s.script: s for s in plan[0][1]}

    def record(script: str, job: str, state: str, log: str | None = None, exit_code: str | None = None) -> None:
        stage = stages[script]
        folder = job_file(settings.log_dir, stage, "").parent
        folder.mkdir(parents=True, exist_ok=True)
        job_file(settings.log_dir, stage, ".jobid").write_text(job + "\n")
        fake.jobs[job], fake.state[job] = (stage.name, []), state
        if log is not None:
            job_file(settings.log_dir, stage, ".log").write_text(log)
        if exit_code is not None:
            job_file(settings.log_dir, stage, ".exit").write_text(exit_code + "\n")

    record("train_mediator", "1001", "TIMEOUT", attempt("1001", 0, "RuntimeError: an earlier attempt's error"),
           "1")  # then requeued, and hard-killed in its second attempt: no .exit of that attempt
    job_file(settings.log_dir, stages["train_mediator"], ".exit").unlink()
    (job_file(settings.log_dir, stages["train_mediator"], ".log")).write_text(
        attempt("1001", 0, "RuntimeError: an earlier attempt's error") + attempt("1001", 1, "epoch 1/1: 40%"))
    record("test_kmeans", "1002", "CANCELLED")  # cancelled by the user while queued
    record("train_front_door_tr", "1003", "CANCELLED")  # after the mediator: --kill-on-invalid-dep
    record("fine_tuning_tr", "1004", "CANCELLED")
    record("test_tr", "1005", "CANCELLED")
    statuses = {s.stage.script: s for s in row_status(plan[0][1], settings.log_dir, status.squeue_states())}
    assert statuses["train_mediator"].state == "killed"
    assert "job 1001 (SLURM: TIMEOUT) ended while running" in statuses["train_mediator"].detail
    assert statuses["train_mediator"].detail.endswith(": epoch 1/1: 40%")  # not the first attempt's error
    assert statuses["test_kmeans"].state == "cancelled" and "ended before it started" in statuses["test_kmeans"].detail
    assert [statuses[s].state for s in ("train_front_door_tr", "fine_tuning_tr", "test_tr")] == ["blocked"] * 3
    assert slurm.wait_for(plan, settings, poll_s=0) == 1
    out = capsys.readouterr().out
    for word, script in (("killed", "train_mediator"), ("cancelled", "test_kmeans"), ("blocked", "test_tr"),
                         ("blocked", "train_front_door_tr"), ("blocked", "fine_tuning_tr")):
        assert f"[reproduce] {word}: {stages[script].name}: " in out, out
    assert "[reproduce] 5 of 5 stage(s) not done" in out


def test_exit_143_with_a_saved_state_reads_interrupted_requeued(fake_slurm, tmp_path):
    import torch
    fake = fake_slurm()
    plan, settings = plan_of(tmp_path, "--structure", "TR")
    stage = next(s for s in plan[0][1] if s.script == "train_front_door_tr")
    stage.state.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"epoch": 0, "step_in_epoch": 3}, stage.state)
    job_file(settings.log_dir, stage, ".jobid").parent.mkdir(parents=True, exist_ok=True)
    job_file(settings.log_dir, stage, ".jobid").write_text("1001\n")
    job_file(settings.log_dir, stage, ".exit").write_text("143\n")
    fake.jobs["1001"], fake.state["1001"] = (stage.name, []), "PENDING"
    found = status.stage_status(stage, settings.log_dir, status.squeue_states())
    assert (found.state, found.detail) == ("interrupted (requeued)",
                                           f"job 1001 queued again, resumes at epoch 1/{stage.epochs}, 3 step(s) of "
                                           f"it done")
    fake.state["1001"] = "COMPLETED"  # the requeue failed: it waits for the next `run`
    found = status.stage_status(stage, settings.log_dir, status.squeue_states())
    assert found.state == "interrupted" and found.detail.startswith("epoch 1/")


def test_several_processes_start_through_this_python_never_torchrun_from_path(tmp_path):
    from launch.cli import processes_per_job
    plan, settings = plan_of(tmp_path, "--structure", "TR")
    stage = plan[0][1][0]
    script = write_script(stage, settings.log_dir, Resources(cpus=1, gpus=0, nproc=2), ["--device", "cpu"])
    text = script.read_text()
    assert "torchrun" not in text and "#SBATCH --cpus-per-task=2" in text
    line = next(x for x in text.splitlines() if x.startswith("cmd=("))
    assert shlex.split(line[len("cmd=("):-1])[:5] == [sys.executable, "-m", "utils.distributed", "--standalone",
                                                      "--nproc_per_node=2"]
    args = build_parser().parse_args
    assert processes_per_job(args(["run", "--slurm_gpus", "4"])) == 4
    assert processes_per_job(args(["run", "--slurm_gpus", "0"])) == 1
    assert processes_per_job(args(["run", "--slurm_gpus", "0", "--nproc", "2"])) == 2


def test_nproc_beyond_the_gpus_or_on_the_local_launcher_is_one_line(fake_slurm, tmp_path, capsys):
    fake = fake_slurm()
    for argv, said in ((["--launcher", "slurm", "--slurm_gpus", "2", "--nproc", "3"],
                        "error: --nproc 3: more processes than the job's GPUs (--slurm_gpus 2); expected at most "
                        "one process per GPU"),
                       (["--nproc", "2"], "error: --nproc is for --launcher slurm (this call runs --launcher local)")):
        assert main(["run", *argv, *selectors(tmp_path)]) == 2
        assert capsys.readouterr().err.strip().splitlines() == [said]
    assert not fake.jobs and not (tmp_path / "logs").exists() and not (tmp_path / f"{TOY_CKPT}.pth").exists()


def test_status_warns_when_the_stages_of_a_row_ran_at_different_world_sizes(tmp_path):
    import json
    plan, settings = plan_of(tmp_path, "--structure", "TR")
    stages = {s.script: s for s in plan[0][1]}
    for script, settings_recorded in (("train_mediator", {"mediator.world_size": 1, "mediator.lr": 0.001}),
                                      ("train_front_door_tr", {"mediator.world_size": 1,
                                                               "front_door_tr.world_size": 2})):
        artifact = stages[script].artifact
        artifact.parent.mkdir(parents=True, exist_ok=True)
        artifact.write_bytes(b"x")
        artifact.with_suffix(".json").write_text(json.dumps({"settings": settings_recorded}))
    assert format_status(plan, settings.log_dir).splitlines()[1] == (
        "  warning: the stages of this row ran at different world sizes (mediator 1, front_door_tr 2); under the "
        "default recipe the learning rate scales with the world size")
    stages["train_front_door_tr"].artifact.with_suffix(".json").write_text(
        json.dumps({"settings": {"front_door_tr.world_size": 1}}))
    assert "warning" not in format_status(plan, settings.log_dir)


@pytest.mark.parametrize("job_state, requeued", [("RUNNING", True), ("COMPLETING", False)])
def test_batch_script_requeues_only_a_running_job(job_state, requeued, tmp_path, monkeypatch):
    """The batch script after a SIGTERM (forwarded to the stage, which saves and exits 143): at the time limit
    (`--signal=B:TERM@60`, the job still RUNNING) it requeues its own job; after a user's `scancel` (the job
    COMPLETING) it does not, so the cancel stands. The stage, squeue and scontrol are stand-ins."""
    plan, settings = plan_of(tmp_path, "--structure", "TR")
    stage = next(s for s in plan[0][1] if s.script == "train_front_door_tr")
    fake = tmp_path / "bin"
    fake.mkdir()
    for name, text in (("python", "trap 'exit 143' TERM\nmkdir -p \"$(dirname \"$FAKE_STATE\")\"; : > \"$FAKE_STATE\"\n"
                                  "sleep 0.5; kill -TERM $PPID\nwhile :; do sleep 0.05; done\n"),
                       ("squeue", 'echo "$FAKE_JOB_STATE"\n'), ("scontrol", 'echo "$@" >> "$FAKE_CALLS"\n')):
        (fake / name).write_text(f"#!/bin/bash\n{text}")
        (fake / name).chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(fake / "python"))
    script = write_script(stage, settings.log_dir, Resources(gpus=0), [])
    monkeypatch.undo()
    calls = tmp_path / "calls"
    env = {"PATH": f"{fake}:/usr/bin:/bin", "SLURM_JOB_ID": "77", "FAKE_STATE": str(stage.state.absolute()),
           "FAKE_JOB_STATE": job_state, "FAKE_CALLS": str(calls)}
    done = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=30)
    assert done.returncode == 143, done.stdout + done.stderr
    assert job_file(settings.log_dir, stage, ".exit").read_text().strip() == "143"
    if requeued:
        assert calls.read_text() == "requeue 77\n" and "requeueing job 77" in done.stdout
    else:
        assert not calls.exists() and "job 77 is COMPLETING: not requeued here" in done.stdout


@pytest.mark.parametrize("cpus, environment, threads", [(3, None, "3"), (3, "5", "5"), (None, None, "unset")])
def test_each_process_of_a_job_uses_the_cpus_it_asked_for(cpus, environment, threads, tmp_path, monkeypatch):
    """--slurm_cpus N: the stage runs with OMP_NUM_THREADS=N (torch's threads) unless the job's environment
    sets it; without --slurm_cpus the script leaves it alone. The stage is a stand-in that prints it."""
    plan, settings = plan_of(tmp_path, "--structure", "TR")
    stage = next(s for s in plan[0][1] if s.script == "train_front_door_tr")
    fake = tmp_path / "python"
    fake.write_text('#!/bin/bash\necho "threads=${OMP_NUM_THREADS:-unset}"\n')
    fake.chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(fake))
    script = write_script(stage, settings.log_dir, Resources(cpus=cpus, gpus=0), [])
    monkeypatch.undo()
    env = {"PATH": "/usr/bin:/bin", **({"OMP_NUM_THREADS": environment} if environment else {})}
    done = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"threads={threads}\n" in done.stdout
