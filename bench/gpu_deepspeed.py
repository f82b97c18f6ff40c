"""gpu_check.py's deepspeed_bf16 stage: one DeepSpeed step in bf16, ZeRO-1, through the package's
build_replica and TrainLoop.run_step (see gpu_check.py)."""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import math
import os
import tempfile
import time
import traceback
from collections.abc import Callable
from typing import Any

from gpu_common import error_line, free_port, grad_config


def ds_case(k: int, cast_bf16: bool, device: Any, out_dir: str) -> dict[str, Any]:
    """One TrainLoop.run_step with strategy deepspeed, ZeRO-1, bf16: loss finite, not skipped, θ changed."""
    import torch

    from distributed_bism.models import unwrap
    from distributed_bism.training.loop import TrainLoop

    t0 = time.perf_counter()
    rec: dict[str, Any] = {
        "unroll_steps": k,
        "batch_dtype": "bfloat16" if cast_bf16 else "float32 (as the trainer passes it)",
    }
    try:
        cfg = grad_config("deepspeed", 1, k, out_dir, zero_stage=1, precision="bf16")
        cfg = dataclasses.replace(cfg, objective=dataclasses.replace(cfg.objective, warmup_steps=2))
        loop = TrainLoop.from_config(cfg, device=device)
        energy = unwrap(loop.replica.energy)
        before = {n: p.detach().float().clone() for n, p in energy.named_parameters()}
        rec["param_dtypes"] = sorted({str(p.dtype) for p in energy.parameters()})
        v = loop.batches(0)
        out = loop.run_step(v.to(torch.bfloat16) if cast_bf16 else v)
        loss = float(out.loss.float())
        changed = {n: (p.detach().float() - before[n]).abs().max().item() for n, p in energy.named_parameters()}
        rec.update(loss=loss, loss_finite=math.isfinite(loss), skipped_steps=loop.bad_steps, max_change=changed)
        ok = math.isfinite(loss) and loop.bad_steps == 0 and max(changed.values()) > 0
        rec["status"] = "ok" if ok else "failed"
        if not ok:
            rec["error"] = f"loss {loss}, skipped steps {loop.bad_steps}, largest change of θ {max(changed.values())}"
    except Exception as e:
        rec["status"], rec["error"] = "failed", error_line(e)
        rec["traceback_tail"] = traceback.format_exc().strip().splitlines()[-8:]
    rec["seconds"] = round(time.perf_counter() - t0, 2)
    return rec


def stage_deepspeed_bf16(args: argparse.Namespace, budget: float, report: Callable[[dict], None]) -> dict[str, Any]:
    import torch
    import torch.distributed as dist

    device = torch.device("cpu") if args.cpu_smoke else torch.device("cuda", 0)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    res: dict[str, Any] = {"zero_stage": 1, "precision": "bf16", "model": "checkerboard GRBM h 4, Bernoulli posterior"}
    try:
        res["deepspeed_version"] = importlib.metadata.version("deepspeed")
        import deepspeed  # noqa: F401  (a missing install fails here, with its own message)
    except Exception as e:
        return {**res, "status": "failed", "error": f"deepspeed not importable: {error_line(e)}"}
    # one process: the variables a launcher would set (DeepSpeed reads LOCAL_RANK itself)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
    dist.init_process_group("gloo" if args.cpu_smoke else "nccl", init_method="env://", rank=0, world_size=1)
    with tempfile.TemporaryDirectory(prefix="gpu_check_ds_") as tmp:
        # The stage's check: the trainer's own path, an fp32 batch into bf16 engines, K = 1.
        res["step"] = ds_case(1, False, device, tmp)
        report(res)
        # A probe beside it (recorded, not the stage's status): K = 0 with the batch already bf16.
        res["probes"] = {}
        for name, k, cast in (("k0_bf16_batch", 0, True),):
            res["probes"][name] = ds_case(k, cast, device, tmp)
            report(res)
    dist.destroy_process_group()
    res["status"] = res["step"]["status"]
    if res["status"] != "ok":
        res["error"] = res["step"]["error"]
    return res
