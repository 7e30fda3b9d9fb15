"""A single-node SLURM cluster on this machine for the launcher tests: its own munged (key and socket in a
temp dir), `slurmctld -D -f` and `slurmd -D -f` with a slurm.conf passed as SLURM_CONF. No accounting.

The Debian packages slurmctld, slurmd, slurm-client and munge are needed, and root (slurmd runs jobs as
their owner); without them the tests that use the fixture skip with one line naming the packages.
`.ci/run` installs them.
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

PACKAGES = "slurmctld slurmd slurm-client munge"
DAEMONS = ("munged", "mungekey", "slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "scancel")


def missing_requirement() -> str | None:
    """Why a cluster cannot start here (None: it can)."""
    path = os.environ.get("PATH", "") + ":/usr/sbin:/sbin"
    absent = [d for d in DAEMONS if shutil.which(d, path=path) is None]
    if absent:
        return f"SLURM tests need the Debian packages {PACKAGES} (apt-get install -y {PACKAGES}; " \
               f"not found: {', '.join(absent)})"
    if os.geteuid() != 0:
        return f"SLURM tests need root to start slurmd (packages {PACKAGES} are installed)"
    return None


@dataclass
class Cluster:
    root: Path
    env: dict[str, str]        # SLURM_CONF and PATH for the client commands
    pids: list[int]

    def scontrol(self, *args: str) -> str:
        return subprocess.run(["scontrol", *args], env=self.env, check=True, capture_output=True,
                              text=True).stdout


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _conf(root: Path, host: str, cpus: int, mem_mb: int) -> str:
    return "\n".join([
        "ClusterName=causetest", f"SlurmctldHost={host}(127.0.0.1)", "SlurmUser=root", "SlurmdUser=root",
        f"SlurmctldPort={_free_port()}", f"SlurmdPort={_free_port()}",
        "AuthType=auth/munge", "CredType=cred/munge", f"AuthInfo=socket={root}/munge/munge.sock",
        f"StateSaveLocation={root}/state", f"SlurmdSpoolDir={root}/spool",
        f"SlurmctldPidFile={root}/slurmctld.pid", f"SlurmdPidFile={root}/slurmd.pid",
        f"SlurmctldLogFile={root}/slurmctld.log", f"SlurmdLogFile={root}/slurmd.log",
        "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none", "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_Core_Memory", "JobAcctGatherType=jobacct_gather/none",
        "AccountingStorageType=accounting_storage/none", "MpiDefault=none", "ReturnToService=2",
        "SchedulerParameters=sched_interval=1,defer_batch=0", "KillWait=10", "MinJobAge=600",
        "SlurmctldTimeout=30", "SlurmdTimeout=30", "InactiveLimit=0", "Waittime=0",
        f"NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={mem_mb} State=UNKNOWN",
        "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP", ""])


def _wait_for(check, what: str, logs: list[Path], timeout: float = 30.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if check():
            return
        time.sleep(0.2)
    tails = "\n".join(f"--- {p}\n" + (p.read_text()[-2000:] if p.exists() else "(none)") for p in logs)
    raise RuntimeError(f"the test SLURM cluster did not come up ({what}):\n{tails}")


def start_cluster(root: Path) -> Cluster:
    """munged, slurmctld and slurmd under `root`; the caller stops them with `stop_cluster`."""
    host = socket.gethostname().split(".")[0]
    for sub in ("munge", "state", "spool"):
        (root / sub).mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(root, 0o755)
    key = root / "munge" / "munge.key"
    subprocess.run(["mungekey", "--create", "--keyfile", str(key)], check=True, capture_output=True)
    conf = root / "slurm.conf"
    mem_mb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20 - 1024
    conf.write_text(_conf(root, host, os.cpu_count() or 1, mem_mb))
    env = {**os.environ, "SLURM_CONF": str(conf), "PATH": os.environ.get("PATH", "") + ":/usr/sbin:/sbin"}
    pids: list[int] = []
    cluster = Cluster(root, env, pids)
    try:
        munge = root / "munge"
        pids.append(subprocess.Popen(
            ["munged", "--foreground", "--force", f"--socket={munge}/munge.sock", f"--key-file={key}",
             f"--pid-file={munge}/munged.pid", f"--log-file={munge}/munged.log", f"--seed-file={munge}/seed"],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).pid)
        _wait_for(lambda: (munge / "munge.sock").exists(), "munged", [munge / "munged.log"])
        for daemon in ("slurmctld", "slurmd"):
            pids.append(subprocess.Popen([daemon, "-D", "-f", str(conf)], env=env, stdout=subprocess.DEVNULL,
                                         stderr=subprocess.DEVNULL).pid)
        logs = [root / "slurmctld.log", root / "slurmd.log"]

        def node_idle() -> bool:
            out = subprocess.run(["sinfo", "-h", "-o", "%t"], env=env, capture_output=True, text=True)
            return out.returncode == 0 and out.stdout.strip().startswith("idle")
        _wait_for(node_idle, "node idle", logs)
    except BaseException:
        stop_cluster(cluster)
        raise
    return cluster


def stop_cluster(cluster: Cluster) -> None:
    """Cancel what is left, then stop the daemons this fixture started, by pid, newest first."""
    subprocess.run(["scancel", "--full", "--user", "root"], env=cluster.env, capture_output=True)
    for pid in reversed(cluster.pids):
        try:
            os.kill(pid, 15)
        except ProcessLookupError:
            continue
    for pid in reversed(cluster.pids):
        try:
            os.waitpid(pid, 0)
        except ChildProcessError:
            pass


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory: pytest.TempPathFactory):
    reason = missing_requirement()
    if reason:
        pytest.skip(reason)
    cluster = start_cluster(tmp_path_factory.mktemp("slurm"))
    try:
        yield cluster
    finally:
        stop_cluster(cluster)
