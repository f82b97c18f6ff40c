"""Each rank's share of an evaluation's n samples, in chunks whose draws do not depend on the
number of ranks.

The n rows are cut into chunks of eval.sample_chunk rows, chunk k holding global rows
[k·chunk, min((k+1)·chunk, n)); rank r of W takes the contiguous chunks
distributed.share(num_chunks, r, W) (num_chunks // W each, one more for the first ranks). A
chunk's random numbers come from a generator seeded by (seed, k), never by the rank, and a chunk
is always drawn and featurised as one batch: so the union of the ranks' rows is bit-for-bit the
rows one process draws, whatever W. What W changes is only the order in which sums over rows are
added (FeatureStats.reduced), a float64 rounding difference.

    part = SampleShare(n, chunk=100, rank=r, world_size=W)
    fake = part.draw(lambda rows, seed: sample(codes[rows], seed), (C, H, W), seed=s)  # (part.stop − part.start, C, H, W)
    feats = part.map(features, fake)                                                 # (part.stop − part.start, F)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from distributed_bism.distributed import share
from distributed_bism.progress_bars import bar


def chunk_seed(seed: int, k: int) -> int:
    """The generator seed of chunk k of a draw seeded `seed`: numpy's SeedSequence of (seed, k),
    so that no (seed, k) pair shares a stream with another (seed + k would: (0, 1) and (1, 0))."""
    return int(np.random.SeedSequence([seed, k]).generate_state(1)[0])


@dataclass(frozen=True)
class SampleShare:
    """Rank `rank`'s chunks of n rows cut into chunks of `chunk` rows (see the module docstring)."""

    n: int
    chunk: int
    rank: int = 0
    world_size: int = 1

    def __post_init__(self) -> None:
        if self.n < 0 or self.chunk < 1 or not 0 <= self.rank < self.world_size:
            raise ValueError(
                f"no share of n={self.n} in chunks of {self.chunk} for rank {self.rank} of {self.world_size}"
            )

    @property
    def num_chunks(self) -> int:
        return -(-self.n // self.chunk)

    @property
    def chunks(self) -> range:
        """The global indices of this rank's chunks (empty when there are fewer chunks than ranks)."""
        return range(*share(self.num_chunks, self.rank, self.world_size))

    def rows(self, k: int) -> slice:
        """The global rows of chunk k."""
        return slice(k * self.chunk, min((k + 1) * self.chunk, self.n))

    @property
    def start(self) -> int:
        """This rank's first global row (its rows are [start, stop))."""
        return min(self.chunks.start * self.chunk, self.n)

    @property
    def stop(self) -> int:
        return min(self.chunks.stop * self.chunk, self.n)

    def draw(
        self, fn: Callable[[slice, int], Tensor], row_shape: tuple[int, ...], *, seed: int, desc: str = "samples"
    ) -> Tensor:
        """This rank's rows (stop − start, *row_shape): fn(global rows of chunk k, chunk_seed(seed, k))
        for each of its chunks k, concatenated; fn returns (len(rows), *row_shape). An empty
        (0, *row_shape) CPU tensor for a rank without chunks."""
        parts = [fn(self.rows(k), chunk_seed(seed, k)) for k in bar(self.chunks, desc, unit="chunk")]
        return torch.cat(parts) if parts else torch.zeros((0, *row_shape))

    def map(self, fn: Callable[[Tensor], Tensor], local: Tensor, *, desc: str = "features") -> Tensor:
        """fn applied chunk by chunk to `local` (this rank's rows, (stop − start, ...)) and concatenated,
        (stop − start, ...): each chunk is one call, as it is in one process. A rank without rows
        runs fn on one row of zeros and keeps none of it, so that its (0, F) result has the trailing
        shape, dtype and device of the others' (what the collectives after it need)."""
        if len(local) != self.stop - self.start:
            raise ValueError(f"rank {self.rank} holds rows [{self.start}, {self.stop}), got {len(local)} rows")
        if not self.chunks:
            return fn(local.new_zeros((1, *local.shape[1:])))[:0]
        parts = []
        for k in bar(self.chunks, desc, unit="chunk"):
            rows = self.rows(k)
            parts.append(fn(local[rows.start - self.start : rows.stop - self.start]))
        return torch.cat(parts)
