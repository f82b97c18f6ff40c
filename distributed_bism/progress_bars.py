"""Progress bars for long work (AIS, the FID classifier's training, sampling and feature
extraction, `bism eval`): tqdm on stderr when stderr is a terminal, nothing at all otherwise, so
that logs (Ray workers, CI, output redirected to a file) stay free of bar redraws. Under
torch.distributed only rank 0 draws them: the ranks do the same work in step, and W bars on one
terminal would overwrite one another."""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

from distributed_bism.distributed import rank_and_world

T = TypeVar("T")


def shown() -> bool:
    """Whether bars are drawn: stderr is a terminal, and this is rank 0 (or the only process)."""
    return sys.stderr.isatty() and rank_and_world()[0] == 0


def bar(items: Iterable[T], desc: str, *, total: int | None = None, unit: str = "it") -> Iterator[T]:
    """`items`, with a bar named `desc` on a terminal (removed when done: it leaves no line
    behind); `items` unchanged, without tqdm's overhead, when stderr is not a terminal."""
    if not shown():
        return iter(items)
    from tqdm import tqdm  # type: ignore[import-untyped]  # (no stubs installed)

    return iter(tqdm(items, desc=desc, total=total, unit=unit, leave=False, dynamic_ncols=True, file=sys.stderr))
