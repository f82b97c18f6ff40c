"""Every collective the package runs outside DDP / DeepSpeed, over the default process group.

    rank_and_world()            (rank, world size); (0, 1) when no group is initialised
    collective_device()         where a collective's tensor lives: cuda under nccl, the CPU otherwise
    gather_objects(obj)         [obj of rank 0, obj of rank 1, ...] on every rank (pickled)
    broadcast_object(obj)       rank 0's obj on every rank
    mean_over_ranks(x)          the mean of a float over ranks, on every rank
    all_ranks_agree(ok)         True on every rank iff ok is True on every rank
    gather_rows(t)              every rank's (n_rank, ...) tensor concatenated along dim 0, in rank order

One process (no group, or a group of one) is world size 1: every function returns its own input
without communicating, so the same code runs in tests and in single-process runs. Each is a
collective otherwise: every rank must call it, in the same order.

The device rule is in one place because the backends differ: NCCL reduces only CUDA tensors (on
the device `torch.cuda.set_device` chose, which Ray Train sets per worker), Gloo's all_gather
only CPU ones. A tensor collective therefore moves its operand to `collective_device()` and its
result back to where the caller's tensor was.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor


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


def mean_over_ranks(x: float) -> float:
    """(1/W) Σ_r x_r over the W ranks, in float64 (one all-reduce of one number)."""
    _, world = rank_and_world()
    if world == 1:
        return x
    t = torch.tensor([x], dtype=torch.float64, device=collective_device())
    dist.all_reduce(t)
    return float(t.item()) / world


def all_ranks_agree(ok: bool) -> bool:
    """True on every rank iff `ok` is True on every rank: a MIN all-reduce of one flag, so a step
    that is bad on any rank is skipped on all of them and their weights stay equal."""
    _, world = rank_and_world()
    if world == 1:
        return ok
    flag = torch.tensor([1.0 if ok else 0.0], device=collective_device())
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item() > 0)


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
