"""Worker functions the distributed tests run on a Ray TorchTrainer. They drive the package's
own TrainLoop and write what each rank saw to <out>/rank{r}.pt for the test to compare."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from distributed_bism.config import Config, from_dict
from distributed_bism.models import unwrap
from distributed_bism.training.loop import TrainLoop
from distributed_bism.training.updaters import EngineUpdater


def first_step_config(cfg: Config, k: int) -> Config:
    """cfg with K = k and no warm-up (N = 0), for the one-step gradient check."""
    return dataclasses.replace(cfg, objective=dataclasses.replace(cfg.objective, unroll_steps=k, warmup_steps=0))


def applied_grads(loop: TrainLoop) -> dict[str, torch.Tensor]:
    """θ's gradient as the optimiser will apply it: .grad after DDP's all-reduce, or the
    shards of a ZeRO engine assembled."""
    core = unwrap(loop.replica.energy)
    names = [n for n, p in core.named_parameters() if p.requires_grad]
    upd = loop.replica.energy_updater
    if isinstance(upd, EngineUpdater):
        grads = upd.full_grads()
    else:
        grads = [p.grad for p in core.parameters() if p.requires_grad]
    return {n: (torch.zeros_like(p) if g is None else g.detach().float().cpu().clone())
            for n, g, p in zip(names, grads, core.parameters())}


def params_of(loop: TrainLoop) -> dict[str, torch.Tensor]:
    out = {f"energy.{n}": p.detach().cpu().clone() for n, p in unwrap(loop.replica.energy).named_parameters()}
    if loop.replica.posterior is not None:
        out.update({f"posterior.{n}": p.detach().cpu().clone()
                    for n, p in unwrap(loop.replica.posterior).named_parameters()})
    return out


def gradient_probe(conf: dict[str, Any]) -> None:
    """For each K in conf["ks"]: one forward_backward (N = 0) on this rank's first batch; then
    20 steps of conf["config"]; a save, 2 more steps, and the same 2 steps from the reloaded
    checkpoint; then one step where rank 0's batch is NaN."""
    import ray.train

    torch.set_num_threads(1)
    cfg = from_dict(Config, conf["config"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    out: dict[str, Any] = {"first_step": {}}
    for k in conf["ks"]:
        loop = TrainLoop.from_config(first_step_config(cfg, k), rank=rank, world_size=world)
        batch, rng = loop.batches(0), torch.get_rng_state()
        loop.forward_backward(batch)
        out["first_step"][k] = {"grads": applied_grads(loop), "rng": rng, "batch": batch.clone()}
    loop = TrainLoop.from_config(cfg, rank=rank, world_size=world)
    if cfg.trainer.strategy == "deepspeed":  # strategies.skip_inference_comm_op kept it from compiling
        from deepspeed.comm import comm as ds_comm

        out["shm_comm_op_built"] = ds_comm.cdb.shm_comm_op is not None
    for _ in range(20):
        loop.run_step(loop.batches(loop.step))
    out["params_after_20"] = params_of(loop)
    # A checkpoint round trip: 2 more steps from a reloaded copy must equal 2 more steps here.
    ckpt = Path(conf["out"]) / "ckpt"
    ckpt.mkdir(exist_ok=True)
    loop.save(ckpt)
    torch.distributed.barrier()
    for _ in range(2):
        loop.run_step(loop.batches(loop.step))
    out["params_continued"] = params_of(loop)
    reloaded = TrainLoop.from_config(cfg, rank=rank, world_size=world)
    reloaded.load(ckpt)
    for _ in range(2):
        reloaded.run_step(reloaded.batches(reloaded.step))
    out["params_reloaded"] = params_of(reloaded)
    v = loop.batches(loop.step)
    if rank == 0:
        v = torch.full_like(v, float("nan"))
    loop.run_step(v)
    out["params_after_nan"], out["bad_steps"] = params_of(loop), loop.bad_steps
    torch.save(out, Path(conf["out"]) / f"rank{rank}.pt")


def gradient_probes(conf: dict[str, Any]) -> None:
    """`gradient_probe` for each of conf["cases"] in turn, in one worker group (whatever each
    case's strategy: the process group is the same)."""
    for case in conf["cases"]:
        gradient_probe(case)
