"""Elastic runs' checkpoints: saved on 2 workers, resumed on 1, saved again and resumed on 2,
for DDP and DeepSpeed ZeRO-1/2 on gloo (forked processes, one TrainLoop each, no Ray).

At every save the checkpoint's optimiser states are whole: for ZeRO, each parameter's Adam moments
and fp32 master weight equal DeepSpeed's own per-parameter assembly of the partitions
(safe_get_full_*). At every load, on the other world size, the engine's state assembled again
equals the checkpoint's, the per-worker batch is the global batch ÷ the world size, and training
goes on with finite parameters, identical on every rank."""

from __future__ import annotations

import copy
import os
import socket
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from distributed_bism.config import Config, from_dict

GLOBAL_BATCH = 32
STEPS = 3  # steps of each phase


def config(strategy: str, stage: int) -> dict[str, Any]:
    return {
        "data": {"name": "checkerboard", "n_train": 256, "n_test": 64},
        "model": {"name": "grbm", "h_dim": 5, "init": "small", "init_std": 0.1},
        "posterior": {"name": "bernoulli", "temperature": 0.5},
        # K = 1: the unrolled Adam reads φ's optimiser state, so a misplaced one changes the step
        "objective": {"name": "bidsm", "sigma": 0.1, "warmup_steps": 1, "unroll_steps": 1, "unroll_optimizer": "adam"},
        "optim": {"lr": 1e-2, "posterior_lr": 1e-2},
        "trainer": {
            "strategy": strategy,
            "zero_stage": stage,
            "num_workers": [1, 2],
            "global_batch_size": GLOBAL_BATCH,
            "ema_decay": 0.9,
        },
        "tracking": {"enabled": False},
    }


def named_params(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().float().cpu().clone() for n, p in module.named_parameters()}


def deepspeed_view(updater: Any) -> dict[str, Any]:
    """DeepSpeed's own assembly of a ZeRO engine's state, by parameter index (module order): the
    fp32 master weight and Adam moments of every parameter (collectives)."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    zero = updater.engine.optimizer
    zero._hp_optimizer_states_linked = False  # link every group's state (DeepSpeed links the first only)
    zero._lazy_init_hp_params_optimizer_state()
    params = [p for p in updater.engine.module.parameters() if p.requires_grad]
    return {
        j: {"master": safe_get_full_fp32_param(p).clone()}
        | {k: safe_get_full_optimizer_state(p, k).clone() for k in ("exp_avg", "exp_avg_sq")}
        for j, p in enumerate(params)
    }


def _phase(rank: int, world: int, port: int, conf: dict[str, Any]) -> None:
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        from distributed_bism.models import unwrap
        from distributed_bism.training.loop import TrainLoop

        torch.set_num_threads(1)
        cfg = from_dict(Config, conf["config"])
        loop = TrainLoop.from_config(cfg, rank=rank, world_size=world)
        out: dict[str, Any] = {"batch": loop.batches.batch_size}
        if conf["load"]:
            loop.load(Path(conf["load"]))
            out["step"] = loop.step
            # copies: torch's state_dict() holds the tensors the next steps update in place
            out["loaded"] = {
                k: copy.deepcopy(u.state_dict())
                for k, u in (("energy", loop.replica.energy_updater), ("posterior", loop.replica.posterior_updater))
            }
            if cfg.trainer.strategy == "deepspeed":
                out["deepspeed_loaded"] = deepspeed_view(loop.replica.energy_updater)
        out["losses"] = [loop.run_step(loop.batches(loop.step)).loss.item() for _ in range(STEPS)]
        out["energy"] = named_params(unwrap(loop.replica.energy))
        out["posterior"] = named_params(unwrap(loop.replica.posterior))
        if cfg.trainer.strategy == "deepspeed":
            out["deepspeed_saved"] = deepspeed_view(loop.replica.energy_updater)
        save = Path(conf["save"])
        save.mkdir(exist_ok=True)
        loop.save(save)
        torch.save(out, f"{conf['out']}.{rank}")
    finally:
        dist.destroy_process_group()


def run_phase(world: int, conf: dict[str, Any]) -> list[dict[str, Any]]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_phase, args=(world, port, conf), nprocs=world, join=True, start_method="fork")
    return [torch.load(f"{conf['out']}.{r}", weights_only=False) for r in range(world)]


def assert_close_tree(a: Any, b: Any, where: str) -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.shape == b.shape, where
        assert torch.equal(a.float().cpu(), b.float().cpu()), f"{where}: {a.flatten()[:4]} != {b.flatten()[:4]}"
    elif isinstance(a, dict):
        assert set(a) == set(b), f"{where}: keys {sorted(map(str, a))} != {sorted(map(str, b))}"
        for k in a:
            assert_close_tree(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_close_tree(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def check_saved(saved: dict[str, Any], ranks: list[dict[str, Any]], strategy: str, world: int) -> None:
    """The checkpoint of a phase: its world size, whole optimiser states (ZeRO: DeepSpeed's own
    assembly), and the weights every rank ended with, finite and identical across ranks."""
    from distributed_bism.training.zero_state import is_full_state

    assert saved["world_size"] == world
    for r, got in enumerate(ranks):
        assert got["batch"] == GLOBAL_BATCH // world, f"rank {r}: per-worker batch {got['batch']}"
        assert all(torch.isfinite(torch.tensor(loss)) for loss in got["losses"])
        for part in ("energy", "posterior"):
            for n, p in got[part].items():
                assert torch.isfinite(p).all(), f"rank {r} {part}.{n} not finite"
                assert torch.equal(p, ranks[0][part][n]), f"{part}.{n} differs between rank {r} and rank 0"
    for n, p in ranks[0]["energy"].items():
        assert torch.equal(saved["energy"][n].float(), p), f"saved energy.{n} is not what the ranks hold"
    opt = saved["energy_optimizer"]
    if strategy == "ddp":
        assert set(opt["state"]) == set(range(len(saved["energy"]))), "torch Adam: one state per parameter"
        return
    assert is_full_state(opt) and is_full_state(saved["posterior_optimizer"])
    reference = ranks[0]["deepspeed_saved"]
    assert set(opt["master"]) == set(reference) == set(opt["state"])
    for j, ref in reference.items():
        assert torch.equal(opt["master"][j], ref["master"]), f"master weight {j}"
        for k in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(opt["state"][j][k], ref[k]), f"{k} of parameter {j}"
            assert opt["state"][j][k].abs().sum() > 0, (
                f"{k} of parameter {j} is all zeros: the check would not see a misplaced slice"
            )
        assert float(opt["state"][j]["step"]) == float(saved["step"])


def check_loaded(saved: dict[str, Any], ranks: list[dict[str, Any]], strategy: str) -> None:
    """After loading `saved` on another world size: the step, and every rank's optimiser state
    assembled again equals the checkpoint's (ZeRO: by DeepSpeed's own assembly too)."""
    for r, got in enumerate(ranks):
        assert got["step"] == saved["step"]
        assert_close_tree(got["loaded"]["energy"], saved["energy_optimizer"], f"rank {r} energy optimiser")
        assert_close_tree(got["loaded"]["posterior"], saved["posterior_optimizer"], f"rank {r} posterior optimiser")
        if strategy == "deepspeed":
            for j, ref in got["deepspeed_loaded"].items():
                assert torch.equal(ref["master"], saved["energy_optimizer"]["master"][j])
                for k in ("exp_avg", "exp_avg_sq"):
                    assert torch.equal(ref[k], saved["energy_optimizer"]["state"][j][k]), f"rank {r} {k} {j}"


@pytest.mark.parametrize(("strategy", "stage"), [("ddp", 0), ("deepspeed", 1), ("deepspeed", 2)])
def test_checkpoint_of_2_workers_resumes_on_1_and_back_on_2(tmp_path, strategy, stage):
    from distributed_bism.training.checkpointing import load_state
    from distributed_bism.training.loop import TrainLoop  # noqa: F401  (imported once: the forked ranks inherit it)

    if strategy == "deepspeed":
        import deepspeed  # noqa: F401  (its import takes seconds; the forked ranks inherit it)

    conf = {"config": config(strategy, stage), "out": str(tmp_path / "out")}
    a, b, c = (tmp_path / name for name in ("ckpt_w2", "ckpt_w1", "ckpt_w2_again"))
    first = run_phase(2, conf | {"load": None, "save": str(a)})
    saved_a = load_state(a)
    check_saved(saved_a, first, strategy, 2)
    assert not list(a.glob("optim_rank*.pt")), "no per-rank optimiser files: the state is whole in state.pt"

    second = run_phase(1, conf | {"load": str(a), "save": str(b)})
    check_loaded(saved_a, second, strategy)
    saved_b = load_state(b)
    check_saved(saved_b, second, strategy, 1)
    assert saved_b["step"] == 2 * STEPS

    third = run_phase(2, conf | {"load": str(b), "save": str(c)})
    check_loaded(saved_b, third, strategy)
    check_saved(load_state(c), third, strategy, 2)
