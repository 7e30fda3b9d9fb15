"""Deterministic, resumable, rank-sharded sampling and the data loader built on it."""
from __future__ import annotations

import atexit
import functools
import math
import multiprocessing
import signal
from typing import Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from utils.errors import STOP_SIGNALS


class EpochSampler(Sampler[int]):
    """Shuffled (or ordered) indices for one rank and one epoch, optionally skipping the first batches.

    The permutation depends only on (seed, epoch), so every rank agrees on it and a resumed run sees
    exactly the batches the interrupted run had not seen. Like DistributedSampler, the index list is
    padded by wrapping around so every rank gets the same number of samples (training); evaluation
    passes pad=False so every image is counted once. ``torch_order`` seeds the permutation with
    seed + epoch, as torch's DistributedSampler after set_epoch(epoch) does (the published runs' order).
    """

    def __init__(self, length: int, seed: int, epoch: int, rank: int = 0, world_size: int = 1,
                 shuffle: bool = True, skip: int = 0, pad: bool = True, torch_order: bool = False):
        self.length, self.seed, self.epoch, self.torch_order = length, seed, epoch, torch_order
        self.rank, self.world_size, self.shuffle, self.skip, self.pad = rank, world_size, shuffle, skip, pad
        self.per_rank = math.ceil(length / world_size) if pad else len(range(rank, length, world_size))

    def indices(self) -> list[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch if self.torch_order
                                              else self.seed * 100_003 + self.epoch)
            order = torch.randperm(self.length, generator=g).tolist()
        else:
            order = list(range(self.length))
        if not self.pad:
            return order[self.rank::self.world_size][self.skip:]
        total = self.per_rank * self.world_size
        order = (order * math.ceil(total / max(1, self.length)))[:total]
        return order[self.rank:total:self.world_size][self.skip:]

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices())

    def __len__(self) -> int:
        return max(0, self.per_rank - self.skip)


def ignore_stop_signals(worker_id: int) -> None:
    """DataLoader workers ignore SIGINT and SIGTERM: a scheduler (or Ctrl-C) signals every process of the
    job, and the main process, which stops after the step in progress, still needs its batches; the
    workers end with the main process (the DataLoader shuts them down, or they see it gone)."""
    for s in STOP_SIGNALS:
        signal.signal(s, signal.SIG_IGN)


def _kill_workers_left() -> None:
    """At exit, multiprocessing ends the daemonic children still alive (workers of a loader that was never
    shut down, e.g. one an exception's traceback keeps) with SIGTERM and then waits for them: workers that
    ignore SIGTERM would make that wait last forever. Kill them first (atexit runs this before it)."""
    for child in multiprocessing.active_children():
        if child.daemon:
            child.kill()


@functools.cache
def _kill_workers_at_exit() -> None:
    atexit.register(_kill_workers_left)


def make_loader(dataset: Dataset, batch_size: int, num_workers: int, device: torch.device, *, seed: int = 0,
                epoch: int = 0, rank: int = 0, world_size: int = 1, shuffle: bool = True,
                skip_batches: int = 0, pad: bool = True, torch_order: bool = False) -> DataLoader:
    """Loader for one epoch; workers prefetch and pin memory when feeding a GPU."""
    sampler = EpochSampler(len(dataset), seed, epoch, rank, world_size, shuffle, skip_batches * batch_size, pad,
                           torch_order)
    if num_workers > 0:
        _kill_workers_at_exit()
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                      pin_memory=device.type == "cuda", drop_last=False,
                      persistent_workers=False, prefetch_factor=4 if num_workers > 0 else None,
                      worker_init_fn=ignore_stop_signals, generator=torch.Generator().manual_seed(seed))
