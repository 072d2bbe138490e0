"""A shuffling sampler that sends the epoch along with every index, the one owner of the training epoch."""

from __future__ import annotations

import math
from typing import Iterator

import torch
import torch.distributed as dist
from torch.utils.data import DistributedSampler


class EpochSampler(DistributedSampler):
    """Yields ``(epoch, index)`` pairs, shuffled as DistributedSampler (seed ``seed + epoch``) and sharded by rank."""

    def __init__(self, dataset_size: int, *, seed: int = 0, shuffle: bool = True, samples_per_epoch: int | None = None,
                 num_replicas: int | None = None, rank: int | None = None) -> None:
        if not (isinstance(dataset_size, int) and dataset_size >= 1):
            raise ValueError(f"dataset_size={dataset_size!r}: expected an int >= 1")
        if samples_per_epoch is not None and not (isinstance(samples_per_epoch, int) and samples_per_epoch >= 1):
            raise ValueError(f"samples_per_epoch={samples_per_epoch!r}: expected None or an int >= 1")
        if num_replicas is None:
            num_replicas = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        if rank is None:
            rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        self.dataset_size = dataset_size
        self.samples_per_epoch = min(samples_per_epoch or dataset_size, dataset_size)
        super().__init__(range(dataset_size), num_replicas=num_replicas, rank=rank, shuffle=shuffle,
                         seed=seed, drop_last=False)
        self.num_samples = math.ceil(self.samples_per_epoch / self.num_replicas)
        self.total_size = self.num_samples * self.num_replicas
        self._resume: tuple[int, int] | None = None

    def resume(self, epoch: int, skip: int) -> None:
        """Move to ``epoch`` and start it after this rank's first ``skip`` samples, once (a mid-epoch resume)."""
        if not (isinstance(epoch, int) and epoch >= 0 and isinstance(skip, int) and skip >= 0):
            raise ValueError(f"resume(epoch={epoch!r}, skip={skip!r}): expected two ints >= 0")
        self.set_epoch(epoch)
        self._resume = (epoch, skip)

    def all_indices(self, epoch: int) -> list[int]:
        """Every rank's indices for ``epoch`` together, before padding (a pure function of seed and epoch)."""
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + epoch)
            return torch.randperm(self.dataset_size, generator=g)[: self.samples_per_epoch].tolist()
        return list(range(self.samples_per_epoch))

    def epoch_indices(self, epoch: int) -> list[int]:
        """This rank's indices for ``epoch`` (a pure function of seed, epoch and rank)."""
        order = self.all_indices(epoch)
        order += order[: self.total_size - len(order)]
        return order[self.rank : self.total_size : self.num_replicas]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch = self.epoch
        indices = self.epoch_indices(epoch)
        if self._resume is not None and self._resume[0] == epoch:
            indices = indices[self._resume[1] :]
        self._resume = None
        return ((epoch, i) for i in indices)

    def __len__(self) -> int:
        return self.num_samples
