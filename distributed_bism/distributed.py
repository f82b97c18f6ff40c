"""Every collective the package runs outside DDP / DeepSpeed, over the default process group.

    rank_and_world()            (rank, world size); (0, 1) when no group is initialised
    collective_device()         where a collective's tensor lives: cuda under nccl, the CPU otherwise
    gather_objects(obj)         [obj of rank 0, obj of rank 1, ...] on every rank (pickled)
    broadcast_object(obj)       rank 0's obj on every rank
    from_rank0(fn)              fn() run on rank 0 only, its result (or its failure) on every rank
    mean_over_ranks(x)          the mean of a float over ranks, on every rank
    sum_over_ranks(t)           the elementwise sum of every rank's same-shaped tensor, on every rank
    all_ranks_agree(ok)         True on every rank iff ok is True on every rank
    all_ranks_agree_each(oks)   the same for several flags (bools or device tensors), in one collective
    gather_rows(t)              every rank's (n_rank, ...) tensor concatenated along dim 0, in rank order
    share(n, rank, world)       [start, stop) of rank's part of n items (not a collective)

One process (no group, or a group of one) is world size 1: every function returns its own input
without communicating, so the same code runs in tests and in single-process runs. Each is a
collective otherwise: every rank must call it, in the same order.

The device rule is in one place because the backends differ: NCCL reduces only CUDA tensors (on
the device `torch.cuda.set_device` chose, which Ray Train sets per worker), Gloo's all_gather
only CPU ones. A tensor collective therefore moves its operand to `collective_device()` and its
result back to where the caller's tensor was.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar, cast

import torch
import torch.distributed as dist
from torch import Tensor

T = TypeVar("T")


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of the default process group; (0, 1) when none is initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def collective_device() -> torch.device:
    """The device a collective's tensors must be on: the current CUDA device under nccl, else the CPU (gloo)."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's picklable `obj`, indexed by rank (all_gather_object; [obj] in one process)."""
    _, world = rank_and_world()
    if world == 1:
        return [obj]
    out: list[Any] = [None] * world
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any) -> Any:
    """Rank 0's picklable `obj` on every rank (the other ranks' `obj` is ignored)."""
    _, world = rank_and_world()
    if world == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def from_rank0(fn: Callable[[], T], what: str) -> T:
    """fn() computed on rank 0 only and broadcast (it must return something picklable), e.g. a
    model that rank 0 loads from its cache or trains. When fn raises on rank 0, rank 0 raises that
    exception and every other rank a RuntimeError naming `what` and it, instead of the others
    waiting in the broadcast until the process group times out."""
    rank, _ = rank_and_world()
    value: T | None = None
    error: Exception | None = None
    if rank == 0:
        try:
            value = fn()
        except Exception as e:  # re-raised below, on rank 0 as itself
            error = e
    value, message = broadcast_object((value, None if error is None else f"{type(error).__name__}: {error}"))
    if error is not None:
        raise error
    if message is not None:
        raise RuntimeError(f"rank 0 failed to make {what}: {message}")
    return cast(T, value)


def mean_over_ranks(x: float) -> float:
    """(1/W) Σ_r x_r over the W ranks, in float64 (one all-reduce of one number)."""
    _, world = rank_and_world()
    if world == 1:
        return x
    t = torch.tensor([x], dtype=torch.float64, device=collective_device())
    dist.all_reduce(t)
    return float(t.item()) / world


def sum_over_ranks(local: Tensor) -> Tensor:
    """Σ_r local_r elementwise over the ranks (one SUM all-reduce), on `local`'s device and in its
    dtype; every rank's tensor must have the same shape and dtype. `local` itself is left as it was."""
    _, world = rank_and_world()
    if world == 1:
        return local
    t = local.detach().to(collective_device(), copy=True)
    dist.all_reduce(t)
    return t.to(local.device)


def share(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """[start, stop) of `rank`'s part of n items split as evenly as possible in rank order:
    n // world_size each, one more for each of the first n % world_size ranks. The parts of
    ranks 0..world_size-1 are contiguous and cover [0, n) once."""
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def all_ranks_agree(ok: bool | Tensor) -> bool:
    """True on every rank iff `ok` is True on every rank: a MIN all-reduce of one flag, so a step
    that is bad on any rank is skipped on all of them and their weights stay equal."""
    return all_ranks_agree_each([ok])[0]


def all_ranks_agree_each(oks: Sequence[bool | Tensor]) -> list[bool]:
    """[all_ranks_agree(ok) for ok in oks] in one MIN all-reduce of len(oks) flags (the loop's
    per-step decisions share one collective). The same number of flags on every rank. A flag may
    be a one-element bool tensor still on its device (an updater's `finite()`), so that its
    caller never waits for the device: the wait happens here, once (the collective's own)."""
    _, world = rank_and_world()
    device = collective_device() if world > 1 else torch.device("cpu")
    flags = torch.stack([torch.as_tensor(ok).reshape(()).to(device, torch.float32) for ok in oks])
    if world > 1:
        dist.all_reduce(flags, op=dist.ReduceOp.MIN)
    return [f > 0 for f in flags.tolist()]


def gather_rows(local: Tensor) -> Tensor:
    """Concatenate every rank's (n_rank, ...) tensor along dim 0 in rank order: (Σ_r n_r, ...), on
    `local`'s device. The n_r may differ (all_gather needs equal shapes: each rank pads its part
    to max_r n_r, and the padding is cut off again); the trailing shape and dtype must not."""
    _, world = rank_and_world()
    if world == 1:
        return local
    device = collective_device()
    sizes = [int(n) for n in _all_gather(torch.tensor([local.shape[0]], dtype=torch.long, device=device), world)]
    padded = torch.zeros((max(sizes), *local.shape[1:]), dtype=local.dtype, device=device)
    padded[: local.shape[0]] = local
    parts = _all_gather(padded, world)
    return torch.cat([p[:n] for p, n in zip(parts, sizes)]).to(local.device)


def _all_gather(t: Tensor, world: int) -> list[Tensor]:
    out = [torch.empty_like(t) for _ in range(world)]
    dist.all_gather(out, t)
    return out
