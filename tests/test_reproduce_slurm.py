"""reproduce.py on a real single-node SLURM cluster (tests/slurm_cluster.py): the toy rows end to end, two
calls at once and no duplicate jobs, requeue mid-stage (SLURM's, and the batch script's own after a SIGTERM
to the batch shell) -> the same artifacts, a two-process job requeued -> the same artifacts, a failed or
cancelled stage stops its dependents and `--wait` says so."""
from __future__ import annotations

import contextlib
import csv
import io
import statistics
import json
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from launch.cli import main
from launch.rows import flags_hash
from loader.toy import ensure_toy
from tests.slurm_cluster import slurm_cluster  # noqa: F401  (the session fixture)

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
# tiny stages: 10 steps of 1 epoch at 64 px (enough steps to requeue one mid-run), no per-epoch validation
STAGE_FLAGS = ["--max_steps", "10", "--epoch", "1", "--validate", "false", "--num_workers", "0",
               "--crf_workers", "0", "--save_images", "0", "--train_resolution", "64", "--test_resolution", "64",
               "--save_every", "1", "--kmeans_samples", "2000"]


def where(root: Path, out: str) -> list[str]:
    return ["--dataset", "toy", "--ckpt", str(root / "random_vit_tiny_8.pth"), "--recipe", "default",
            "--data_dir", str(root / "data"), "--output_dir", str(root / out / "CAUSE"),
            "--results_dir", str(root / out / "results"), "--log_dir", str(root / out / "logs"),
            "--num_codebook", "32", "--projection_dim", "32"]


# the rows' folder: K=32, p=32 (not the toy default 256) and the stage flags' hash; seed 0
FOLDER = f"32_p32_{flags_hash(tuple(STAGE_FLAGS))}"
NAME = f"cause-toy-random_vit_tiny_8-{FOLDER}"  # job names of the rows' stages


def reproduce(cluster, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    """reproduce.py in this process (the cluster's SLURM_CONF and PATH set), its exit status and output."""
    out, err = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        for k in ("SLURM_CONF", "PATH"):
            mp.setenv(k, cluster.env[k])
        mp.chdir(REPO)
        code = main(list(args))
    done = subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())
    if check and code != 0:
        raise AssertionError(f"reproduce.py {' '.join(args)} -> {code}\n{done.stdout}\n{done.stderr}")
    return done


def run_argv(root: Path, out: str, *extra: str) -> list[str]:
    return ["run", "--launcher", "slurm", *where(root, out), "--slurm_cpus", "1", "--slurm_gpus", "0", "--slurm_mem",
            "2G", "--slurm_time", "1:00:00", *extra, "--", *STAGE_FLAGS]


def slurm_run(cluster, root: Path, out: str, *extra: str, check: bool = True) -> subprocess.CompletedProcess:
    return reproduce(cluster, *run_argv(root, out, *extra), check=check)


def concurrent_runs(cluster, root: Path, out: str, *extras: list[str]) -> list[subprocess.CompletedProcess]:
    """`python reproduce.py run ...` once per `extras`, all started at once, as from several terminals."""
    procs = [subprocess.Popen([sys.executable, "reproduce.py", *run_argv(root, out, *extra)], cwd=REPO,
                              env=cluster.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for extra in extras]
    done = [subprocess.CompletedProcess(p.args, p.wait(timeout=300), *p.communicate()) for p in procs]
    for d in done:
        assert d.returncode == 0, f"{d.args} -> {d.returncode}\n{d.stdout}\n{d.stderr}"
    return done


def submitted_job(stdout: str, stage: str) -> str:
    return stdout.split(f"{stage}: submitted job ")[1].split()[0]


def squeue(cluster) -> dict[str, str]:
    out = subprocess.run(["squeue", "-h", "-a", "-o", "%i|%T|%j"], env=cluster.env, capture_output=True, text=True)
    return {line.split("|")[0]: line for line in out.stdout.split()}


# job states after which nothing of the job runs again (a requeued job passes through REQUEUED, REQUEUE_HOLD,
# PENDING ...: still active)
ENDED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE")


def wait_idle(cluster, timeout: float = 240.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if all(s.split("|")[1] in ENDED for s in squeue(cluster).values()):
            return
        time.sleep(0.5)
    raise AssertionError(f"jobs still active: {squeue(cluster)}")


def artifacts(root: Path, out: str) -> dict[str, torch.Tensor]:
    """Every tensor of the TR row's segment head and cluster probe."""
    base = root / out / "CAUSE" / "toy" / "random_vit_tiny_8" / FOLDER
    return {f"{name}:{k}": v for name in ("segment_tr.pth", "cluster_tr.pth")
            for k, v in torch.load(base / name, map_location="cpu", weights_only=True).items()}


# the two calls of the fixture, as from two terminals at once: the MLP row, and the TR row with seeds 0 and 1
CALLS = (["--structure", "MLP"], ["--structure", "TR", "--seed", "0,1"])


@pytest.fixture(scope="module")
def toy_on_slurm(slurm_cluster, toy_root, tmp_path_factory):  # noqa: F811
    """The MLP row and the TR row's seeds 0 and 1 submitted at once by two processes (the seed-0 rows share
    stage 1 and the k-means baseline; seed 1 has its own), then both calls made again (nothing duplicated),
    then run to the end."""
    root = tmp_path_factory.mktemp("reproduce_slurm")
    (root / "data").symlink_to(ensure_toy(toy_root / "data").parent)  # the toy set, generated once per session
    together = concurrent_runs(slurm_cluster, root, "a", *CALLS)
    again = [slurm_run(slurm_cluster, root, "a", *extra) for extra in CALLS]
    wait_idle(slurm_cluster, timeout=600)
    return root, together, again


def test_toy_rows_end_to_end(slurm_cluster, toy_on_slurm):  # noqa: F811
    root, together, _ = toy_on_slurm
    first = "".join(d.stdout for d in together)
    # seed 0: one shared mediator and k-means job, three stage jobs per row; seed 1 (TR): five of its own.
    # 13 jobs, named after row and stage
    assert first.count("submitted job") == 13, first
    assert f"{NAME}-TR-train_front_door_tr: submitted job" in first
    assert f"cause-toy-random_vit_tiny_8-4_p32_{flags_hash(tuple(STAGE_FLAGS))}_seed1-test_kmeans: submitted job" \
        in first
    # the two calls at once submitted the shared stages once; the later call waits for the earlier one's jobs
    for shared in ("-train_mediator", "-test_kmeans"):
        lines = [line for line in first.splitlines() if line.split(":")[0].endswith(shared)
                 and "_seed1-" not in line]
        assert sum("submitted job" in line for line in lines) == 1, first
        assert sum(": already" in line or ": done" in line for line in lines) == 1, first
    status = reproduce(slurm_cluster, "status", *where(root, "a"), "--", *STAGE_FLAGS).stdout
    assert status.count(": done") == 2 and "failed" not in status, status
    table = reproduce(slurm_cluster, "table", *where(root, "a"), "--out", str(root / "table.md"), "--",
                      *STAGE_FLAGS).stdout
    for structure in ("MLP", "TR"):
        path = root / "a" / "results" / "toy" / structure / "random_vit_tiny_8" / FOLDER / "metrics.json"
        crf = json.loads(path.read_text())["unsupervised_crf"]["mIoU"]
        assert f"| toy | {structure} | random_vit_tiny_8 | default | 32 | 32 | 8 | 0 | {flags_hash(tuple(STAGE_FLAGS))} |" in table
        row = next(r for r in csv.DictReader(open(root / "table.csv")) if r["structure"] == structure)
        assert float(row["CRF mIoU"]) == crf and row["status"] == "done"
    assert (root / "table.md").read_text().strip() == table.strip()
    assert (root / "table.png").read_bytes()[:4] == b"\x89PNG"


def test_second_run_duplicates_nothing(toy_on_slurm):
    _, _, again = toy_on_slurm
    for call, stages in zip(again, (5, 10)):  # MLP seed 0; TR seeds 0 and 1
        assert "submitted job" not in call.stdout, call.stdout
        # every stage of the first calls is either still queued/running (same job) or already done
        assert call.stdout.count("already") + call.stdout.count(": done") == stages, call.stdout


def test_seeds_give_distinct_artifacts_and_an_aggregate_and_a_k_sweep_submits_only_its_new_stages(
        slurm_cluster, toy_on_slurm):  # noqa: F811
    """The TR row's seeds 0 and 1 (run by the fixture) trained into folders of their own, and the table has a
    line per seed and their mean ± std. `--num_codebook 16,32` beside the done K=32 row submits only the K=16
    stages (the K=32 ones are done; the k-means baseline serves any K), under names of their own; they are
    submitted to start in 10 minutes and cancelled, since running them would show nothing the seeds do not."""
    root, _, _ = toy_on_slurm
    hashed = flags_hash(tuple(STAGE_FLAGS))
    k_sweep = slurm_run(slurm_cluster, root, "a", "--structure", "TR", "--num_codebook", "16,32",
                        "--slurm_extra=--begin=now+600").stdout
    submitted = [line.removeprefix("[reproduce] ") for line in k_sweep.splitlines() if ": submitted job " in line]
    subprocess.run(["scancel", *(line.split(": submitted job ")[1].split()[0] for line in submitted)],
                   env=slurm_cluster.env, check=True)  # first, so that a failed check leaves no job queued
    wait_idle(slurm_cluster)
    k16 = f"cause-toy-random_vit_tiny_8-16_p32_{hashed}"
    assert len(submitted) == 4 and all(line.startswith(f"{k16}-") for line in submitted), k_sweep
    assert f"{k16}-train_mediator: submitted job" in k_sweep and k_sweep.count(": done") == 5, k_sweep
    results = root / "a" / "results" / "toy" / "TR" / "random_vit_tiny_8"
    folders = {0: FOLDER, 1: f"{FOLDER}_seed1"}
    metrics = {seed: json.loads((results / folder / "metrics.json").read_text()) for seed, folder in folders.items()}
    assert [m["flags"]["seed"] for m in metrics.values()] == [0, 1]
    heads = {seed: torch.load(root / "a" / "CAUSE" / "toy" / "random_vit_tiny_8" / folder / "segment_tr.pth",
                              weights_only=True) for seed, folder in folders.items()}
    assert any(not torch.equal(heads[0][k], heads[1][k]) for k in heads[0])  # seeds differ
    codebook = root / "a" / "CAUSE" / "toy" / "modularity" / "random_vit_tiny_8" / f"{FOLDER}_seed1" / "modular.json"
    assert json.loads(codebook.read_text())["flags"]["seed"] == 1
    table = reproduce(slurm_cluster, "table", *where(root, "a"), "--structure", "TR", "--seed", "0,1",
                      "--out", str(root / "sweep.md"), "--", *STAGE_FLAGS).stdout
    lines = [line for line in table.splitlines() if line.startswith("| toy | TR |")]
    assert [line.split(" | ")[4:8] for line in lines] == [["32", "32", "8", "0"], ["32", "32", "8", "1"],
                                                          ["32", "32", "8", "all"]]
    assert lines[0].endswith("| done |") and lines[1].endswith("| done |")
    crf = [metrics[seed]["unsupervised_crf"]["mIoU"] for seed in (0, 1)]
    mean, std = statistics.fmean(crf), statistics.stdev(crf)
    assert f"| {mean:.1f} ± {std:.1f} [{min(crf):.1f}, {max(crf):.1f}] |" in lines[2]
    aggregate = [r for r in csv.DictReader(open(root / "sweep.csv")) if r["seed"] == "all"]
    assert float(aggregate[0]["CRF mIoU"]) == pytest.approx(mean) and aggregate[0]["n"] == "2"


def _copy_stage1(root: Path, out: str) -> None:
    """Stage 1 and the k-means baseline of run `a` (same flags), so that the later tests run stages 2-4 only."""
    for sub in ("CAUSE/toy/modularity", "results/toy/KMEANS"):
        shutil.copytree(root / "a" / sub, root / out / sub)


def test_requeue_mid_stage_gives_the_same_artifacts(slurm_cluster, toy_on_slurm):  # noqa: F811
    """Stage 2 requeued by SLURM (`scontrol requeue`: every process of the job gets SIGTERM); stage 3 sent
    SIGTERM in its batch shell alone, as `--signal=B:TERM@60` does before the time limit: the batch script
    must requeue its own job. Both resume, and the row's artifacts equal those of the unsignalled row."""
    root, _, _ = toy_on_slurm
    _copy_stage1(root, "b")
    submitted = slurm_run(slurm_cluster, root, "b", "--structure", "TR").stdout
    front_door, fine_tuning = (submitted_job(submitted, f"{s}_tr") for s in ("train_front_door", "fine_tuning"))
    # the test stage is cancelled: equal artifacts give equal scores (the test stage is deterministic)
    subprocess.run(["scancel", submitted_job(submitted, "test_tr")], env=slurm_cluster.env, check=True)
    folder = root / "b" / "CAUSE" / "toy" / "random_vit_tiny_8" / FOLDER
    interrupt_mid_stage(slurm_cluster, folder / "state_front_door_tr.pth", "requeue", front_door)
    interrupt_mid_stage(slurm_cluster, folder / "state_fine_tuning_tr.pth", "batch-TERM", fine_tuning)
    wait_idle(slurm_cluster)
    for script, stage in (("train_front_door_tr", "front_door_tr"), ("fine_tuning_tr", "fine_tuning_tr")):
        log = (root / "b" / "logs" / "reproduce" / f"{NAME}-TR-{script}.log").read_text()
        assert log.count("SIGTERM: asking the stage to save its state") == 1, log
        assert f"resumed {stage} from" in log and "restart 1" in log, log
        assert "Traceback" not in log
    assert "requeueing job" in log  # the batch script requeued stage 3 itself
    requeued, uninterrupted = artifacts(root, "b"), artifacts(root, "a")
    assert requeued.keys() == uninterrupted.keys()
    differ = [k for k in requeued if not torch.equal(requeued[k], uninterrupted[k])]
    assert not differ, f"not bit-equal after the requeue: {differ}"
    base = Path("CAUSE") / "toy" / "random_vit_tiny_8" / FOLDER
    for name in ("segment_tr.pth", "cluster_tr.pth"):  # the files too, not only their tensors
        assert (root / "b" / base / name).read_bytes() == (root / "a" / base / name).read_bytes(), name


def interrupt_mid_stage(cluster, state: Path, how: str, job: str) -> None:
    """Once the stage has saved a state (mid-run): requeue its job (`requeue`) or send SIGTERM to its batch shell
    alone (`batch-TERM`); then let the requeued job start at once (a requeued job waits for a BeginTime)."""
    end = time.monotonic() + 180
    while not state.exists():
        assert time.monotonic() < end, f"{state.name}: no state saved"
        time.sleep(0.05)
    if how == "requeue":
        cluster.scontrol("requeue", job)
    else:
        subprocess.run(["scancel", "--batch", "--signal=TERM", job], env=cluster.env, check=True)
    while "PENDING" not in squeue(cluster).get(job, ""):
        assert time.monotonic() < end, f"job {job} was not requeued: {squeue(cluster).get(job)}"
        time.sleep(0.2)
    # slurmd revoked the killed run's credential with a time stamp of one-second resolution: a run started
    # within that second is refused ("Job credential revoked", the job then ends); SLURM's own BeginTime hold
    # avoids it, so wait past it before starting the requeued job at once
    time.sleep(2)
    cluster.scontrol("update", f"jobid={job}", "StartTime=now")


def test_two_process_job_requeued_resumes_bit_for_bit(slurm_cluster, toy_on_slurm):  # noqa: F811
    """`--slurm_gpus 0 --nproc 2`: stage 2 runs as two CPU processes under Gloo in one task, started by this
    Python's `-m utils.distributed`. Requeued mid-run, it resumes, and its head equals, byte for byte, that
    of the same row run unsignalled; world size 2 is recorded, and status warns that stage 1 ran with 1."""
    root, _, _ = toy_on_slurm
    front_door = {}
    for out in ("e", "f"):  # e: requeued, f: not; their later stages are not compared
        _copy_stage1(root, out)
        submitted = slurm_run(slurm_cluster, root, out, "--structure", "TR", "--nproc", "2",
                              "--slurm_mem", "4G").stdout
        front_door[out] = submitted_job(submitted, "train_front_door_tr")
        later = [submitted_job(submitted, f"{s}_tr") for s in ("fine_tuning", "test")]
        subprocess.run(["scancel", *later], env=slurm_cluster.env, check=True)
    script = root / "e" / "logs" / "reproduce" / f"{NAME}-TR-train_front_door_tr.sh"
    assert f"cmd=({sys.executable} -m utils.distributed --standalone --nproc_per_node=2 " in script.read_text()
    folder = Path("CAUSE") / "toy" / "random_vit_tiny_8" / FOLDER
    interrupt_mid_stage(slurm_cluster, root / "e" / folder / "state_front_door_tr.pth", "requeue", front_door["e"])
    wait_idle(slurm_cluster)
    log = (root / "e" / "logs" / "reproduce" / f"{NAME}-TR-train_front_door_tr.log").read_text()
    assert "resumed front_door_tr from" in log and "restart 1" in log and "Traceback" not in log, log
    assert (root / "e" / folder / "segment_tr.pth").read_bytes() == (root / "f" / folder / "segment_tr.pth").read_bytes()
    recorded = json.loads((root / "e" / folder / "segment_tr.json").read_text())["settings"]
    assert recorded["front_door_tr.world_size"] == 2
    status = reproduce(slurm_cluster, "status", *where(root, "e"), "--structure", "TR", "--", *STAGE_FLAGS).stdout
    assert "warning: the stages of this row ran at different world sizes (mediator 1, front_door_tr 2)" in status


def test_wait_names_the_stage_the_user_cancelled(slurm_cluster, toy_on_slurm):  # noqa: F811
    """`run --wait true`; the user cancels stage 2 while it is queued (its start 10 minutes away); SLURM cancels
    the stages after it (--kill-on-invalid-dep): the wait ends with 1, naming stage 2 cancelled and the later
    stages blocked."""
    root, _, _ = toy_on_slurm
    _copy_stage1(root, "w")
    result: list[subprocess.CompletedProcess] = []
    waiting = threading.Thread(target=lambda: result.append(slurm_run(
        slurm_cluster, root, "w", "--structure", "TR", "--wait", "true", "--slurm_extra=--begin=now+600", check=False)))
    waiting.start()
    jobs = root / "w" / "logs" / "reproduce"
    end = time.monotonic() + 60
    while not (jobs / f"{NAME}-TR-test_tr.jobid").exists():  # all three submitted
        assert time.monotonic() < end and waiting.is_alive(), result
        time.sleep(0.05)
    job = (jobs / f"{NAME}-TR-train_front_door_tr.jobid").read_text().strip()
    subprocess.run(["scancel", job], env=slurm_cluster.env, check=True)
    waiting.join(120)
    done = result[0]
    assert done.returncode == 1, done.stdout + done.stderr
    assert f"[reproduce] cancelled: {NAME}-TR-train_front_door_tr: job {job} (SLURM: " \
           f"CANCELLED) ended before it started" in done.stdout, done.stdout
    for stage in ("fine_tuning_tr", "test_tr"):
        assert f"[reproduce] blocked: {NAME}-TR-{stage}: " in done.stdout, done.stdout
    assert "[reproduce] 3 of 5 stage(s) not done" in done.stdout


def test_failed_stage_stops_its_dependents(slurm_cluster, toy_on_slurm):  # noqa: F811
    root, _, _ = toy_on_slurm
    _copy_stage1(root, "c")
    state = root / "c" / "CAUSE" / "toy" / "random_vit_tiny_8" / FOLDER / "state_front_door_tr.pth"
    state.parent.mkdir(parents=True, exist_ok=True)
    state.write_bytes(b"not a training state")  # stage 2 resumes from it and fails
    done = slurm_run(slurm_cluster, root, "c", "--structure", "TR", "--wait", "true", check=False)
    assert done.returncode == 1, done.stdout + done.stderr
    assert f"failed: {NAME}-TR-train_front_door_tr" in done.stdout
    status = reproduce(slurm_cluster, "status", *where(root, "c"), "--structure", "TR", "--", *STAGE_FLAGS).stdout
    lines = {line.split()[0]: line for line in status.splitlines()[1:]}
    assert "failed" in lines["train_front_door_tr"] and "not a readable PyTorch file" in lines["train_front_door_tr"]
    assert f"{NAME}-TR-train_front_door_tr.log" in lines["train_front_door_tr"]
    assert "blocked" in lines["fine_tuning_tr"] and "blocked" in lines["test_tr"], status
    assert not (root / "c" / "results" / "toy" / "TR").exists()


def test_refused_job_submits_nothing(slurm_cluster, tmp_path):  # noqa: F811
    out = slurm_run(slurm_cluster, tmp_path, "d", "--slurm_partition", "nosuchpartition", check=False)
    assert out.returncode == 2
    assert out.stderr.count("\n") == 1 and "sbatch refused" in out.stderr and "partition" in out.stderr.lower()
    assert not any("nosuch" in line for line in squeue(slurm_cluster).values())

