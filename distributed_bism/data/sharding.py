"""Per-worker batches whose order is a pure function of (seed, step, rank, world size).

Each epoch, `DistributedSampler` shuffles the indices with seed + epoch and deals rank r every
W-th one; the rank's share is cut into equal batches (the last partial one is dropped, so the
MDSM σ schedule always spans a full batch). Because the batch at step t is computed, not
drawn, a resumed run sees exactly the batches the uninterrupted run would have seen.
"""

from __future__ import annotations

from typing import cast

import torch
from torch import Tensor
from torch.utils.data import Dataset, DistributedSampler


class ShardedBatches:
    """Batches of `batch_size` rows of `data` (N, ...) for rank `rank` of `world_size`."""

    def __init__(self, data: Tensor, batch_size: int, *, rank: int = 0, world_size: int = 1, seed: int = 0):
        per_rank = len(data) // world_size
        if per_rank < batch_size:
            raise ValueError(
                f"trainer.batch_size={batch_size} is larger than the {per_rank} training examples "
                f"each of the {world_size} workers gets (data has {len(data)})"
            )
        self.data, self.batch_size = data, batch_size
        # the sampler only needs len(); a range of row indices stands in for the data set
        indices = cast("Dataset[int]", range(len(data)))
        self.sampler: DistributedSampler[int] = DistributedSampler(
            indices, num_replicas=world_size, rank=rank, shuffle=True, seed=seed, drop_last=True
        )
        self.per_epoch = per_rank // batch_size
        self._epoch: int | None = None
        self._batches: list[Tensor] = []

    def __call__(self, step: int) -> Tensor:
        """The batch (batch_size, ...) used at 0-based iteration `step`."""
        epoch, i = divmod(step, self.per_epoch)
        if epoch != self._epoch:
            self.sampler.set_epoch(epoch)
            idx = torch.tensor(list(iter(self.sampler)))
            self._batches = list(idx[: self.per_epoch * self.batch_size].split(self.batch_size))
            self._epoch = epoch
        return self.data[self._batches[i]]
