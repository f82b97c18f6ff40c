"""A ZeRO-1/2 optimiser's state, whole: assembled from the ranks' partitions, and partitioned again.

Layout (deepspeed/runtime/zero/stage_1_and_2.py, 0.19.8): param group i's parameters sit in one
flat buffer, parameter p at round_robin_bit16_offsets[i][j] (alignment padding between them and
at the end); the buffer's length L_i is a multiple of the data-parallel size W, and rank r owns
the contiguous slice [r·P_i, (r+1)·P_i), P_i = L_i / W, whose fp32 master copy
single_partition_of_fp32_groups[i] is the parameter the inner torch optimiser steps, with its
exp_avg and exp_avg_sq of the same length P_i. Assembling them is one all_gather of every rank's
partitions; partitioning a whole state needs no communication (each rank cuts its own slice).

`full_state` / `load_full_state` are how checkpoints hold a ZeRO optimiser: in a form that does
not depend on W (every parameter's fp32 master weight and Adam moments, whole), so a run saved on
W workers resumes on any other number (elastic runs, docs in cluster/README.md).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import Tensor

ADAM_MOMENTS = ("exp_avg", "exp_avg_sq")
FULL_FORMAT = "zero_full_v1"  # the key that marks a whole (world-size independent) ZeRO state


def _world(group: Any) -> tuple[int, int]:
    """(rank, world size) in `group`; (0, 1) without torch.distributed."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return 0, 1
    return torch.distributed.get_rank(group=group), torch.distributed.get_world_size(group=group)


def _flat_layout(zero: Any, i: int) -> Iterator[tuple[Tensor, int, torch.Size]]:
    """(parameter, offset in group i's flat buffer, shape) of every parameter of group i, in the
    order of the client optimiser's param group (bit16_groups; DeepSpeed may store them reordered)."""
    offsets = {
        id(p): (offset, meta.shape)
        for p, offset, meta in zip(
            zero.round_robin_bit16_groups[i], zero.round_robin_bit16_offsets[i], zero.round_robin_bit16_meta[i]
        )
    }
    for p in zero.bit16_groups[i]:
        yield (p, *offsets[id(p)])


def _uniform(zero: Any) -> bool:
    """Whether the partitions can be gathered in one collective: every group partitioned over the
    same process group, on the accelerator (no CPU offload)."""
    groups = zero.real_dp_process_group
    return not getattr(zero, "cpu_offload", False) and all(g is groups[0] for g in groups)


@torch.no_grad()  # the fp32 master partitions are parameters of the inner optimiser
def _gather_flat(zero: Any, parts: list[list[Tensor]]) -> list[list[Tensor]]:
    """parts[i]: this rank's partitions of group i (each of length P_i); returns the whole flat
    buffers (length W·P_i) of each, on every rank, in ONE all_gather (none on one rank). Each rank
    sends [t_00, t_01, ..., t_10, ...]; row r of the result is rank r's, so group i's k-th tensor is
    the column block at Σ_{i'<i} n_i' P_i' + k P_i, read row by row."""
    local = torch.cat([t.detach().reshape(-1) for group in parts for t in group])
    group = zero.real_dp_process_group[0]
    _, world = _world(group)
    if world == 1:
        rows = local.view(1, -1)
    else:
        gathered = local.new_empty(world * local.numel())  # gloo wants it flat, not (world, n)
        torch.distributed.all_gather_into_tensor(gathered, local, group=group)
        rows = gathered.view(world, -1)
    out, col = [], 0
    for i, group_parts in enumerate(parts):
        size = zero.single_partition_of_fp32_groups[i].numel()
        out.append([rows[:, col + k * size : col + (k + 1) * size].reshape(-1) for k in range(len(group_parts))])
        col += len(group_parts) * size
    return out


def _adam_states(zero: Any) -> tuple[list[dict[str, Any]], Any]:
    """The inner torch Adam's state of each fp32 partition, and its step (None before the first)."""
    states = [zero.optimizer.state.get(part, {}) for part in zero.single_partition_of_fp32_groups]
    steps = [st["step"] for st in states if "step" in st]
    return states, (steps[0] if steps else None)


def zero_optimizer_state(zero: Any, params: Mapping[str, Tensor]) -> dict[str, dict]:
    """A ZeRO-1/2 optimiser's Adam state of `params` by name, whole, on every rank: the same
    values as deepspeed.utils.safe_get_full_optimizer_state(p, key), with ONE all_gather for all
    parameters and both moments instead of one all_reduce per parameter per moment, and none in
    a group of one rank. `zero` is a DeepSpeedZeroOptimizer (engine.optimizer at stage 1 or 2).
    `step`: torch Adam's per-parameter step (the same for every parameter and rank, as under DDP).
    Before the first step there is no state, and the result is {} (the unroll starts from zeros)."""
    states, step = _adam_states(zero)
    if step is None:
        return {}
    if not _uniform(zero):
        return _per_parameter_state(params, step)  # layouts _gather_flat does not handle
    full = _gather_flat(zero, [[st[k] for k in ADAM_MOMENTS] for st in states])
    by_id = {id(p): n for n, p in params.items()}
    out: dict[str, dict] = {}
    for i, moments in enumerate(full):
        for p, offset, shape in _flat_layout(zero, i):
            name = by_id.get(id(p))
            if name is not None:
                out[name] = {"step": step}
                out[name].update(
                    {k: m[offset : offset + shape.numel()].view(shape) for k, m in zip(ADAM_MOMENTS, moments)}
                )
    return out


def _per_parameter_state(params: Mapping[str, Tensor], step: Any) -> dict[str, dict]:
    """DeepSpeed's own assembly: one all_reduce per parameter per moment."""
    from deepspeed.utils import safe_get_full_optimizer_state

    return {
        n: {"step": step, **{k: safe_get_full_optimizer_state(p, k) for k in ADAM_MOMENTS}} for n, p in params.items()
    }


def full_state(zero: Any) -> dict[str, Any]:
    """The whole optimiser state of a ZeRO-1/2 engine, the same on every rank (a collective: every
    rank calls it). Keyed as torch's Adam.state_dict() is, by each parameter's index j in the
    client optimiser's param groups (group by group):

        {FULL_FORMAT: True,
         "master": {j: fp32 master weight of parameter j, its shape},
         "state": {j: {"step", "exp_avg", "exp_avg_sq"} (fp32, its shape)}   # {} before the first step
         "param_groups": [the inner Adam's hyperparameters of group i, "params": [its j]],
         "loss_scaler": the loss scaler's plain attributes (fp16's dynamic scale and counters)}

    Nothing in it depends on the number of ranks: `load_full_state` partitions it for any."""
    states, step = _adam_states(zero)
    parts = zero.single_partition_of_fp32_groups
    keys = ("master",) + (ADAM_MOMENTS if step is not None else ())
    if _uniform(zero):
        full = _gather_flat(zero, [[part] + [st[k] for k in keys[1:]] for part, st in zip(parts, states)])
    else:
        full = None
    master: dict[int, Tensor] = {}
    state: dict[int, dict[str, Any]] = {}
    groups: list[dict[str, Any]] = []
    j = 0
    for i, group in enumerate(zero.optimizer.param_groups):
        indices = []
        for p, offset, shape in _flat_layout(zero, i):
            if full is not None:
                whole = {k: t[offset : offset + shape.numel()].view(shape).clone() for k, t in zip(keys, full[i])}
            else:
                whole = _per_parameter_full(p, keys)
            master[j] = whole.pop("master")
            if step is not None:
                state[j] = {"step": step.clone() if isinstance(step, Tensor) else step, **whole}
            indices.append(j)
            j += 1
        groups.append({**{k: v for k, v in group.items() if k != "params"}, "params": indices})
    return {
        FULL_FORMAT: True,
        "master": master,
        "state": state,
        "param_groups": groups,
        "loss_scaler": _plain(zero.loss_scaler),
    }


def _plain(obj: Any) -> dict[str, Any]:
    """An object's attributes that are numbers or booleans: what a checkpoint loaded with
    torch.load(weights_only=True) may hold of DeepSpeed's loss scaler without its class."""
    return {k: v for k, v in vars(obj).items() if isinstance(v, (bool, int, float))}


def _per_parameter_full(p: Tensor, keys: tuple[str, ...]) -> dict[str, Tensor]:
    """DeepSpeed's own assembly of one parameter's master weight and moments (collectives each)."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    out = {"master": safe_get_full_fp32_param(p)}
    out.update({k: safe_get_full_optimizer_state(p, k) for k in keys[1:]})
    return out


def is_full_state(state: Any) -> bool:
    return isinstance(state, dict) and bool(state.get(FULL_FORMAT))


@torch.no_grad()
def load_full_state(zero: Any, saved: dict[str, Any]) -> None:
    """Partition a `full_state` (of any number of ranks) into this rank's share of a ZeRO-1/2
    engine: its fp32 master partitions, its inner Adam's moments and step, and the param groups'
    hyperparameters. No communication:
    each rank takes, of every parameter, what falls in its own slice [r·P_i, (r+1)·P_i) of the
    group's flat layout (zeros in the padding). The module's (bit16) weights are not touched: the
    caller loads them from the checkpoint's weights, which the master weights round to."""
    count = sum(len(group) for group in zero.bit16_groups)
    if count != len(saved["master"]):  # preflight refuses another model under the same run name
        raise ValueError(f"the saved optimiser state has {len(saved['master'])} parameters, this engine {count}")
    j = 0
    for i, part in enumerate(zero.single_partition_of_fp32_groups):
        rank, world = _world(zero.real_dp_process_group[i])
        length = zero.bit16_groups_flat[i].numel()
        if length != world * part.numel():  # DeepSpeed's own invariant; a broken one would misplace every slice
            raise RuntimeError(f"ZeRO group {i}: flat buffer of {length} is not {world} partitions of {part.numel()}")
        layout = [(index, offset, shape) for index, (_, offset, shape) in enumerate(_flat_layout(zero, i), j)]
        j += len(layout)
        part.data.copy_(_own_slice(saved["master"], layout, part, rank))
        if saved["state"]:
            moments = {
                k: _own_slice({index: saved["state"][index][k] for index, _, _ in layout}, layout, part, rank)
                for k in ADAM_MOMENTS
            }
            step = saved["state"][layout[0][0]]["step"]
            zero.optimizer.state[part] = {"step": step.clone() if isinstance(step, Tensor) else step, **moments}
    for group, hyper in zip(
        zero.optimizer.param_groups, saved["param_groups"]
    ):  # lr, betas, ... as torch restores them
        group.update({k: v for k, v in hyper.items() if k != "params"})
    for key, value in saved["loss_scaler"].items():
        setattr(zero.loss_scaler, key, value)
    zero._hp_optimizer_states_linked = False  # DeepSpeed re-links its per-parameter views after the next step


def _own_slice(
    by_index: Mapping[int, Tensor], layout: list[tuple[int, int, torch.Size]], part: Tensor, rank: int
) -> Tensor:
    """Rank `rank`'s partition (like `part`: length P, dtype, device) of the flat buffer that holds
    by_index[j] at each (j, offset, shape) of `layout`, zeros in the padding: [rank·P, (rank+1)·P)."""
    size = part.numel()
    flat = torch.zeros(size * (rank + 1), dtype=part.dtype, device=part.device)  # slices past it are others'
    for index, offset, shape in layout:
        lo, hi = max(offset, rank * size), min(offset + shape.numel(), (rank + 1) * size)
        if lo < hi:
            flat[lo:hi] = by_index[index].reshape(-1)[lo - offset : hi - offset].to(flat)
    return flat[rank * size :].clone()
