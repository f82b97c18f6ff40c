"""gpu_check.py's nccl_grad stage: the cross-rank gradient check of
tests/distributed/test_distributed.py on the package's own TrainLoop (see gpu_check.py)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gpu_common import energy_grads, error_line, free_port, grad_config

GRAD_KS = (0, 3)  # as tests/distributed/test_distributed.py's KS
REL_TOL = {"cpu": 1e-6, "cuda": 1e-5}  # the test's 1e-6 on CPU; CUDA kernels may sum in another order


def _rng_state(device: Any) -> tuple[Any, Any]:
    import torch

    return torch.get_rng_state(), (torch.cuda.get_rng_state(device) if device.type == "cuda" else None)


def _set_rng_state(state: tuple[Any, Any], device: Any) -> None:
    import torch

    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def grad_rank(rank: int, world: int, backend: str, device_type: str, port: int, out_dir: str, ks: list[int]) -> None:
    """One rank (torch.multiprocessing.spawn): for each K, the gradient DDP applied and this rank's
    single-process hypergradient on the same batch and noise, to <out_dir>/rank{r}.pt."""
    import torch
    import torch.distributed as dist

    from distributed_bism.training.loop import TrainLoop

    torch.set_num_threads(1)
    device = torch.device("cuda", 0) if device_type == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        out: dict[int, dict[str, Any]] = {}
        for k in ks:
            cfg = grad_config("ddp", world, k, out_dir)
            loop = TrainLoop.from_config(cfg, rank=rank, world_size=world, device=device)
            batch = loop.batches(0)
            rng = _rng_state(device)
            loop.forward_backward(batch)  # DDP (world 2): θ's .grad averaged over the ranks
            applied = energy_grads(loop.replica.energy)
            local_cfg = dataclasses.replace(
                cfg, trainer=dataclasses.replace(cfg.trainer, strategy="local", num_workers=1)
            )
            local = TrainLoop.from_config(local_cfg, device=device)
            _set_rng_state(rng, device)
            local.forward_backward(batch)
            rec: dict[str, Any] = {"applied": applied, "own": energy_grads(local.replica.energy)}
            if world == 1:  # nothing to average: at least one collective on this backend, on this device
                flat = torch.cat([g.flatten() for g in applied.values()]).to(device)
                reduced = flat.clone()
                dist.all_reduce(reduced)
                rec["all_reduce_equal"] = bool(torch.equal(reduced, flat))
            out[k] = rec
        dist.barrier()
        torch.save(out, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def compare_ranks(out_dir: Path, world: int, tol: float) -> dict[str, Any]:
    """The test's check_ranks, one-step part: applied gradient = mean over ranks of the shards'."""
    import torch

    ranks = [torch.load(out_dir / f"rank{r}.pt", weights_only=True) for r in range(world)]
    per_k: dict[str, Any] = {}
    ok = True
    for k in ranks[0]:
        own = [ranks[r][k]["own"] for r in range(world)]
        mean = {n: sum(o[n] for o in own) / world for n in own[0]}
        scale = max(m.abs().max().item() for m in mean.values())
        rec: dict[str, Any] = {}
        if world > 1:
            spread = max((own[0][n] - own[1][n]).abs().max().item() for n in mean)
            rec["shard_spread_rel"] = spread / max(scale, 1e-30)
            rec["shards_differ"] = spread > 1e-3 * scale
            ok &= rec["shards_differ"]
        err = max(
            (ranks[r][k]["applied"][n] - mean[n]).abs().max().item() / max(1.0, mean[n].abs().max().item())
            for r in range(world)
            for n in mean
        )
        rec["max_rel_err"], rec["equal_to_mean"] = err, err <= tol
        ok &= rec["equal_to_mean"]
        if "all_reduce_equal" in ranks[0][k]:
            rec["all_reduce_equal"] = all(ranks[r][k]["all_reduce_equal"] for r in range(world))
            ok &= rec["all_reduce_equal"]
        per_k[str(k)] = rec
    return {"passed": bool(ok), "per_k": per_k, "tolerance": tol}


def grad_attempt(backend: str, world: int, device_type: str, seconds: float) -> dict[str, Any]:
    """Spawn `world` ranks on one device, wait at most `seconds`, then compare their gradients."""
    import torch.multiprocessing as mp

    rec: dict[str, Any] = {
        "backend": backend,
        "world_size": world,
        "device": "cuda:0" if device_type == "cuda" else "cpu",
        "averaging_checked": world > 1,
    }
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gpu_check_grad_") as tmp:
        ctx = mp.spawn(
            grad_rank, args=(world, backend, device_type, free_port(), tmp, list(GRAD_KS)), nprocs=world, join=False
        )
        try:
            while not ctx.join(timeout=1.0):
                if time.perf_counter() - t0 > seconds:
                    for p in ctx.processes:  # the ranks this call started
                        if p.is_alive():
                            p.kill()
                    raise TimeoutError(f"{backend} world {world}: no result within {seconds:.0f} s")
            rec.update(compare_ranks(Path(tmp), world, REL_TOL[device_type]))
            rec["status"] = "ok" if rec["passed"] else "failed"
            if not rec["passed"]:
                rec["error"] = f"gradient check failed: {json.dumps(rec['per_k'])}"
        except Exception as e:  # recorded; the caller decides on a fallback
            rec["status"], rec["error"] = "failed", error_line(e)
    rec["seconds"] = round(time.perf_counter() - t0, 2)
    return rec


def stage_nccl_grad(args: argparse.Namespace, budget: float, report: Callable[[dict], None]) -> dict[str, Any]:
    if args.cpu_smoke:  # gloo stands in for nccl; 2 ranks on the CPU
        attempts = [grad_attempt("gloo", 2, "cpu", budget - 5)]
        report({"attempts": attempts})
        ok = attempts[0]["status"] == "ok"
        return {
            "attempts": attempts,
            "status": "ok" if ok else "failed",
            "ran": "gloo world 2 (cpu-smoke)",
            **({} if ok else {"error": attempts[0]["error"]}),
        }
    t_end = time.perf_counter() + budget - 5
    first = grad_attempt("nccl", 2, "cuda", 0.45 * budget)
    attempts = [first]
    report({"attempts": attempts})
    if first["status"] == "ok":
        return {"attempts": attempts, "status": "ok", "ran": "nccl world 2 on cuda:0"}
    # NCCL refuses two ranks on one GPU ("Duplicate GPU detected"): nccl alone, and the averaging with gloo
    for backend, world in (("nccl", 1), ("gloo", 2)):
        left = t_end - time.perf_counter()
        if left < 10:
            attempts.append({"backend": backend, "world_size": world, "status": "skipped", "error": "no time left"})
        else:
            attempts.append(grad_attempt(backend, world, "cuda", left / (2 if world == 1 else 1)))
        report({"attempts": attempts})
    ok = all(a["status"] == "ok" for a in attempts[1:])
    ran = "nccl world 2 refused; " + ", ".join(
        f"{a['backend']} world {a['world_size']}: {a['status']}" for a in attempts[1:]
    )
    bad = [a for a in attempts[1:] if a["status"] != "ok"]
    return {
        "attempts": attempts,
        "status": "ok" if ok else "failed",
        "ran": ran,
        **({} if ok else {"error": f"{bad[0]['backend']} world {bad[0]['world_size']}: {bad[0].get('error', '')}"}),
    }
