"""Process-group set-up for CPU, one GPU, many GPUs (spawned from --gpu) and torchrun.

Gradients are averaged explicitly with one flat all-reduce (`average_gradients`), so the
stage code can call heads piecewise (teacher, student, probe) without a DDP wrapper.
"""
from __future__ import annotations

import contextlib
import datetime
import os
import signal
import sys
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from utils.errors import STOP_SIGNALS, UserError, raise_terminated, stop_signal


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def parse_gpu_list(gpu: str | None) -> list[int]:
    if gpu is None or gpu.strip() == "":
        return []
    try:
        return [int(g) for g in gpu.split(",") if g.strip() != ""]
    except ValueError:
        raise UserError(f"--gpu {gpu!r}: expected comma-separated GPU indices such as 0,1,2,3") from None


def resolve_device(device: str, gpu: str | None) -> str:
    """'auto' -> 'cuda' when CUDA is present, else 'cpu'; asking for CUDA without it is an error."""
    cuda = torch.cuda.is_available()
    if device not in ("auto", "cuda", "cpu"):
        raise UserError(f"--device {device!r}: expected auto, cuda or cpu")
    gpus = parse_gpu_list(gpu)
    if device == "cpu":
        if gpus:
            raise UserError(f"--gpu {gpu} was given with --device cpu: drop --gpu or use --device cuda")
        return "cpu"
    if not cuda:
        if device == "cuda" or gpus:
            what = "--device cuda" if device == "cuda" else f"--gpu {gpu}"
            raise UserError(f"{what} asked for a GPU but CUDA is not available on this machine; "
                            "use --device cpu (or leave --device auto and drop --gpu)")
        return "cpu"
    if gpus and max(gpus) >= torch.cuda.device_count():
        raise UserError(f"--gpu {gpu}: this machine has {torch.cuda.device_count()} GPU(s)")
    return "cuda"


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and "LOCAL_RANK" in os.environ


_spawned_rank = False  # set in the processes spawned from --gpu


def in_launched_worker() -> bool:
    """This process is one rank started by torchrun or spawned from --gpu: its launcher forwards the
    stop signals it gets (SIGINT, SIGTERM), so a rank may see the same stop twice."""
    return _spawned_rank or launched_by_torchrun()


def launch(worker: Callable[[DistInfo], None], device: str, gpu: str | None, distributed: bool | None,
           port: str, timeout_s: float) -> None:
    """Run `worker` once per process: spawned from --gpu, under torchrun, or in this process."""
    device = resolve_device(device, gpu)
    gpus = parse_gpu_list(gpu)
    if launched_by_torchrun():
        _run_in_group(worker, _init_from_env(device, timeout_s))
        return
    spawn = device == "cuda" and len(gpus) > 1 and distributed is not False
    if not spawn:
        index = gpus[0] if gpus else 0
        dev = torch.device("cuda", index) if device == "cuda" else torch.device("cpu")
        if device == "cuda":
            torch.cuda.set_device(dev)
        worker(DistInfo(rank=0, world_size=1, local_rank=0, device=dev))
        return
    os.environ.setdefault("MASTER_ADDR", "localhost")
    os.environ["MASTER_PORT"] = str(port)
    context = mp.spawn(_spawned, args=(worker, gpus, timeout_s), nprocs=len(gpus), join=False)
    with _forwarding_stop_signals([p.pid for p in context.processes]):
        while not context.join():
            pass


@contextlib.contextmanager
def _forwarding_stop_signals(pids: Sequence[int]):
    """While inside: SIGINT and SIGTERM to this (launcher) process go to the ranks instead, which save
    and exit with 128 + the signal; Ctrl-C in a terminal reaches them directly too, and they ignore a repeat."""
    def forward(signum: int, frame: object) -> None:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

    previous = {s: signal.signal(s, forward) for s in STOP_SIGNALS}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _spawned(local_rank: int, worker: Callable[[DistInfo], None], gpus: Sequence[int], timeout_s: float) -> None:
    global _spawned_rank
    _spawned_rank = True
    signal.signal(signal.SIGTERM, raise_terminated)
    try:
        _start_rank(local_rank, worker, gpus, timeout_s)
    except KeyboardInterrupt as e:  # torch's spawn wrapper would exit 0 on it
        sys.exit(128 + stop_signal(e))


def _start_rank(local_rank: int, worker: Callable[[DistInfo], None], gpus: Sequence[int], timeout_s: float) -> None:
    dev = torch.device("cuda", gpus[local_rank])
    torch.cuda.set_device(dev)
    dist.init_process_group("nccl", rank=local_rank, world_size=len(gpus),
                            timeout=datetime.timedelta(seconds=timeout_s), device_id=dev)
    _run_in_group(worker, DistInfo(rank=local_rank, world_size=len(gpus), local_rank=local_rank, device=dev))


def _run_in_group(worker: Callable[[DistInfo], None], info: DistInfo) -> None:
    """Run `worker`, then wait for every rank before leaving the group.

    A rank that leaves while a peer still talks to it makes the peer abort; a rank that fails
    leaves at once, so its peers' next collective fails instead of waiting for --dist_timeout.
    """
    try:
        worker(info)
        barrier()
    finally:
        finish()


def _init_from_env(device: str, timeout_s: float) -> DistInfo:
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ["LOCAL_RANK"])
    if device == "cuda":
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
        backend = "nccl"
    else:
        dev, backend = torch.device("cpu"), "gloo"
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend, rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=timeout_s))
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, device=dev)


def finish() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def is_enabled() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def average_gradients(params: Sequence[torch.nn.Parameter]) -> None:
    """Average .grad over ranks with one flat all-reduce (no-op on a single process)."""
    if not is_enabled():
        return
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def broadcast_from_main(modules: Sequence[torch.nn.Module]) -> None:
    """Copy rank 0's parameters and buffers to every rank, as DDP does at start (no-op on one process)."""
    if not is_enabled():
        return
    for module in modules:
        for t in module.state_dict().values():
            dist.broadcast(t, src=0)


def all_gather_cat(x: torch.Tensor) -> torch.Tensor:
    """Concatenate equally-shaped tensors of every rank along dim 0 (identity on one process)."""
    if not is_enabled():
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)


def any_rank(flag: bool, device: torch.device) -> bool:
    """True when `flag` is True on at least one rank."""
    if not is_enabled():
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def barrier() -> None:
    if is_enabled():
        dist.barrier()


def torchrun(argv: list[str] | None = None) -> int:
    """`python -m utils.distributed FLAGS SCRIPT ARGS`: torchrun with the same flags, stopped cleanly.

    Plain torchrun answers SIGINT/SIGTERM with its own SignalException traceback and exit 1 after its
    ranks saved the state. Here the stop exits 128 + the signal (130 Ctrl-C, 143 SIGTERM) without a
    traceback, also when only the ranks were signalled; rank 0's line names this command to resume."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun_main
    stopped = {128 + signal.SIGINT, 128 + signal.SIGTERM}
    try:
        torchrun_main(argv)
    except SignalException as e:
        return 128 + int(e.sigval)
    except ChildFailedError as e:
        codes = {f.exitcode for f in e.failures.values()}
        if codes <= stopped:
            return max(codes)
        raise
    return 0


if __name__ == "__main__":
    sys.exit(torchrun())
