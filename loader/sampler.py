"""Deterministic, resumable, rank-sharded sampling and the data loader built on it."""
from __future__ import annotations

import math
from typing import Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from loader.workers import worker_loader


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


def make_loader(dataset: Dataset, batch_size: int, num_workers: int, device: torch.device, *, seed: int = 0,
                epoch: int = 0, rank: int = 0, world_size: int = 1, shuffle: bool = True,
                skip_batches: int = 0, pad: bool = True, torch_order: bool = False) -> DataLoader:
    """Loader for one epoch; workers prefetch and pin memory when feeding a GPU."""
    sampler = EpochSampler(len(dataset), seed, epoch, rank, world_size, shuffle, skip_batches * batch_size, pad,
                           torch_order)
    return worker_loader(dataset, num_workers, batch_size=batch_size, sampler=sampler,
                         pin_memory=device.type == "cuda", drop_last=False,
                         prefetch_factor=4 if num_workers > 0 else None, generator=torch.Generator().manual_seed(seed))
