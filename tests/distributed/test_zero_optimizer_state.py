"""The unrolled Adam's warm start under ZeRO-1/2: `EngineUpdater.optimizer_state` assembles the
posterior's partitioned Adam state in ONE collective, and returns exactly what DeepSpeed's own
per-parameter assembly (safe_get_full_optimizer_state: one all_reduce per parameter per moment)
returns. Two gloo processes (fork), one DeepSpeed engine each, no Ray."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from distributed_bism.config import Config, from_dict

# Every tensor collective of torch.distributed that a gather could be written with; each is
# wrapped to count its calls while optimizer_state runs (deepspeed.comm calls these by name too).
COLLECTIVES = (
    "all_reduce",
    "all_gather",
    "all_gather_into_tensor",
    "_all_gather_base",
    "broadcast",
    "reduce",
    "reduce_scatter",
    "reduce_scatter_tensor",
    "gather",
    "scatter",
    "all_to_all",
    "all_to_all_single",
    "all_gather_object",
    "broadcast_object_list",
    "all_reduce_coalesced",
    "all_gather_coalesced",
)


def counting(calls: list[str]) -> dict[str, Callable[..., Any]]:
    """Replace each of COLLECTIVES by a wrapper that records its name; returns the originals."""
    originals = {name: getattr(dist, name) for name in COLLECTIVES if hasattr(dist, name)}

    def wrap(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def counted(*args: Any, **kwargs: Any) -> Any:
            calls.append(name)
            return fn(*args, **kwargs)

        return counted

    for name, fn in originals.items():
        setattr(dist, name, wrap(name, fn))
    return originals


class Net(nn.Module):
    """Parameters of odd sizes (35, 7, 21, 3, 1 elements), so ZeRO pads between them and the
    partition boundary falls inside a parameter."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(5, 7)
        self.b = nn.Linear(7, 3)
        self.scale = nn.Parameter(torch.ones(1))  # not 0-dim: DeepSpeed cannot broadcast those

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * self.b(torch.tanh(self.a(x)))


def _rank(rank: int, port: int, path: str, stage: int, groups: int) -> None:
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        import deepspeed
        from deepspeed.utils import safe_get_full_optimizer_state

        from distributed_bism.training.replica import deepspeed_config, skip_inference_comm_op
        from distributed_bism.training.updaters import EngineUpdater

        skip_inference_comm_op()
        torch.manual_seed(0)  # the same initial weights on both ranks
        net = Net()
        params = list(net.parameters())
        # groups=2: two param groups (two flat buffers, each partitioned across the ranks)
        param_groups = [{"params": params[:2]}, {"params": params[2:]}] if groups == 2 else [{"params": params}]
        cfg = from_dict(Config, {"trainer": {"strategy": "deepspeed", "zero_stage": stage, "batch_size": 4}})
        engine, *_ = deepspeed.initialize(
            model=net, optimizer=torch.optim.Adam(param_groups, lr=1e-2), config=deepspeed_config(cfg)
        )
        updater = EngineUpdater(engine, stage)
        named = dict(net.named_parameters())
        before = updater.optimizer_state(named)  # no step yet: no state
        torch.manual_seed(1 + rank)  # different data per rank
        for _ in range(3):
            loss = engine(torch.randn(4, 5)).pow(2).mean()
            updater.backward(loss)
            updater.step()
        calls: list[str] = []
        originals = counting(calls)
        try:
            flat = updater.optimizer_state(named)
        finally:
            for name, fn in originals.items():
                setattr(dist, name, fn)
        # DeepSpeed links each parameter to its Adam state once, right after the first param group's
        # first step, so the parameters of later groups never get linked and its own assembly raises
        # for them (0.19.8, ZeroOptimizer.step -> _optimizer_step(i) per group). Link again here,
        # with every group's state present, to have the reference.
        engine.optimizer._hp_optimizer_states_linked = False
        engine.optimizer._lazy_init_hp_params_optimizer_state()
        reference = {
            n: {
                "exp_avg": safe_get_full_optimizer_state(p, "exp_avg"),
                "exp_avg_sq": safe_get_full_optimizer_state(p, "exp_avg_sq"),
            }
            for n, p in named.items()
        }
        steps = [st["step"] for st in engine.optimizer.optimizer.state.values()]
        torch.save(
            {
                "before": before,
                "flat": flat,
                "reference": reference,
                "steps": steps,
                "calls": calls,
                "shapes": {n: tuple(p.shape) for n, p in named.items()},
            },
            f"{path}.{rank}",
        )
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize(("stage", "groups"), [(1, 1), (2, 1), (2, 2)])
def test_flat_zero_optimizer_state_equals_deepspeeds_per_parameter_assembly_in_one_collective(tmp_path, stage, groups):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    path = str(tmp_path / "out")
    mp.start_processes(_rank, args=(port, path, stage, groups), nprocs=2, join=True, start_method="fork")
    got = [torch.load(f"{path}.{r}", weights_only=False) for r in range(2)]
    for r, g in enumerate(got):
        assert g["before"] == {}, f"rank {r}: state before the first step"
        # One all_gather for every parameter and both moments; DeepSpeed's assembly makes
        # 2 × 5 all_reduces here.
        assert len(g["calls"]) <= 1, f"rank {r}: {len(g['calls'])} collectives: {g['calls']}"
        assert set(g["flat"]) == set(g["shapes"]), f"rank {r}: parameters {sorted(g['flat'])}"
        assert len(g["steps"]) == groups and all(float(s) == 3.0 for s in g["steps"])
        for n, st in g["flat"].items():
            assert float(st["step"]) == 3.0, f"rank {r} {n}: step {st['step']}"
            for k in ("exp_avg", "exp_avg_sq"):
                ref = g["reference"][n][k]
                assert st[k].shape == g["shapes"][n] and st[k].dtype == ref.dtype
                assert torch.equal(st[k], ref), f"rank {r} {n} {k}: {st[k].flatten()[:4]} != {ref.flatten()[:4]}"
                assert st[k].abs().sum() > 0, f"rank {r} {n} {k} is all zeros: the test would not see a misplaced slice"
                assert torch.equal(st[k], got[0]["flat"][n][k]), f"{n} {k} differs between ranks"
