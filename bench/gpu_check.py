#!/usr/bin/env python
"""GPU check (issue 16, item 6): what a lent CUDA machine should tell us, in one run of ~7 minutes.

Three stages, each in its own subprocess with its own time budget; a stage that fails, hangs or
runs out of time is recorded as such and the others still run:

  nccl_grad       the cross-rank gradient check of tests/distributed/test_distributed.py
                  (test_bism_averages_hypergradients_across_ranks_under_ddp_and_deepspeed, its DDP
                  case), on the package's own TrainLoop: BiDSM on the checkerboard GRBM, N = 0,
                  K ∈ {0, 3}. Each rank runs one forward_backward under DDP, then the same batch and
                  noise single-process; the gradient DDP applied must equal the mean over ranks of
                  the single-process hypergradients (and the shards' gradients must differ, so
                  that an un-averaged gradient cannot pass). First 2 ranks on cuda:0 under nccl;
                  NCCL usually refuses two ranks on one device, and then it runs nccl at world
                  size 1 (the step on CUDA plus an nccl all-reduce, no averaging to check) and
                  gloo at world size 2 on cuda:0 (the averaging check, CUDA tensors). The JSON
                  says which ran.
  deepspeed_bf16  one DeepSpeed step, bf16, ZeRO-1, through the package's build_replica
                  (deepspeed.initialize) and TrainLoop.run_step, on the tiny GRBM: loss finite,
                  step not skipped, θ changed; at K = 1 (the unrolled Adam on bf16 φ) with the
                  fp32 batch the trainer passes. A probe beside it (K = 0, batch already bf16)
                  is recorded but not part of the stage's status.
  step_bench      seconds per bi-level iteration (N = 5 warm-up steps, K unrolled steps, J and its
                  backward, θ's Adam step; distributed_bism.core.bilevel.step_from_config) and
                  peak CUDA memory (torch.cuda.max_memory_allocated over the iteration, minus
                  what was allocated before it) for K ∈ {0, 1, 5, 10}, at the reference size
                  (conv EBLVM 1×32×32, ch 64, h 20, one block per stage; batch 16 and 64) and at
                  CIFAR size (3×32×32, ch 128, h 50, two blocks per stage, as
                  configs/cifar10_bimdsm.yaml); BiMDSM, Fisher lower level, Adam 1e-4 (0.9, 0.95),
                  as bench/bilevel_impls.py's conv setup. Timed with CUDA events between
                  torch.cuda.synchronize() calls. It builds everything from the package's config
                  classes and builders and does not import bench_bilevel.py or bilevel_impls.py.

Everything goes to one JSON (--out, default bench/results/gpu_check.json): the machine (GPU,
driver from nvidia-smi, CUDA, torch, DeepSpeed), and per stage its status (ok | failed |
skipped), the last line of its error, its seconds and its measurements; then a short summary
is printed. The exit status is 0 when no stage failed, 1 otherwise, 2 when there is no CUDA.

Budget (--budget, default 420 s; --quick: 210 s): nccl_grad 100 s, deepspeed_bf16 100 s, the
rest for step_bench, which stops starting new measurements when its time is up and marks what
it did not reach as skipped (--quick: 60 s, 60 s, two configurations at 2 repeats; --cpu-smoke:
120 s, 120 s, of 300 s). Not yet run on a GPU: no device was lent to the task that wrote it. On
the 2-core development VM `--cpu-smoke --quick` takes about 40 s (~20 CPU-seconds; 80-90 s while
other work shares the cores).

--cpu-smoke runs the same stages on the CPU with gloo instead of nccl (2 ranks: the averaging
check is real), DeepSpeed's CPU accelerator in bf16, and a tiny conv EBLVM (1×8×8, ch 8, batch 4,
N = 2, K ∈ {0, 1}); it is what tests/distributed/test_gpu_check.py runs.

Setting up, on the lent H200 (the `device` tool; no network there; `python3` is 3.12 with a CUDA
torch, numpy, pyyaml and scikit-learn, but no DeepSpeed; our .venv cannot travel: Python 3.11,
a CPU torch, far over the 64 MiB that may be carried):

    make gpu-wheels      # here, once: .whl/ with deepspeed 0.19.8 (built with DS_BUILD_OPS=0, pure
                         # Python) and what it needs that the image lacks (hjson, pydantic,
                         # pydantic-core for cp312, annotated-types, typing-inspection), ~5 MiB
    # on the device, carry [".whl"], timeout_s 600 (install ~20 s, start-up of the machine ~1-2 min
    # of device time on top):
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site \\
        .whl/*.whl && PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 python3 bench/gpu_check.py --out $OUT/gpu_check.json

Without the wheels the deepspeed_bf16 stage fails on its import and the other two still run.
On a CUDA machine with network: `make setup` installs torch==2.13.0, which resolves to the CPU
build here; install the CUDA build of the same version from PyTorch's CUDA wheel index into
.venv instead, then `make gpu-check` (= .venv/bin/python bench/gpu_check.py). torch's version
is part of the JSON: the image's torch (2.11 when last seen) is not the project's pin.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import json
import math
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as `python3 bench/gpu_check.py` with no install of the package
    sys.path.insert(0, str(REPO))

STAGES = ("nccl_grad", "deepspeed_bf16", "step_bench")
# Seconds per stage (step_bench: whatever is left of --budget). A stage's subprocess is killed at
# its budget; start-up (import torch, CUDA context, DeepSpeed import) is part of it.
BUDGETS = {
    "full": (420, {"nccl_grad": 100, "deepspeed_bf16": 100}),
    "quick": (210, {"nccl_grad": 60, "deepspeed_bf16": 60}),
    # --cpu-smoke: ~20 CPU-seconds in all, but a shared 2-core machine can stretch that 4x
    "cpu-smoke": (300, {"nccl_grad": 120, "deepspeed_bf16": 120}),
}
MIN_STAGE_S = 15  # a stage with less than this left is skipped, not started
GRAD_KS = (0, 3)  # as tests/distributed/test_distributed.py's KS
REL_TOL = {"cpu": 1e-6, "cuda": 1e-5}  # the test's 1e-6 on CPU; CUDA kernels may sum in another order


# ============================================================================ small helpers
def last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else ""


def error_line(e: BaseException) -> str:
    """The last line of an exception's message (mp.spawn puts the child's traceback in it)."""
    return last_line(str(e)) or type(e).__name__


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=str) + "\n")
    tmp.replace(path)


def grad_config(strategy: str, world: int, k: int, out_dir: str, **trainer: Any) -> Any:
    """tests/distributed/test_distributed.py's tiny_config (BiDSM on the checkerboard GRBM), with K = k
    and no warm-up (N = 0): the one-step check's configuration."""
    from distributed_bism.config import Config, from_dict

    return from_dict(
        Config,
        {
            "data": {"name": "checkerboard", "n_train": 256, "n_test": 64},
            "model": {"name": "grbm", "h_dim": 4, "init": "small", "init_std": 0.1},
            "posterior": {"name": "bernoulli", "temperature": 0.5},
            "objective": {
                "name": "bidsm",
                "sigma": 0.1,
                "warmup_steps": 0,
                "unroll_steps": k,
                "unroll_optimizer": "adam",
            },
            "optim": {"lr": 1e-2, "posterior_lr": 1e-2},
            "trainer": {
                "name": f"gpu-check-{strategy}",
                "strategy": strategy,
                "num_workers": world,
                "batch_size": 16,
                "max_failures": 0,
                "output_dir": out_dir,
                **trainer,
            },
            "tracking": {"enabled": False},
        },
    )


def energy_grads(module: Any) -> dict[str, Any]:
    """θ's .grad by name, on the CPU in fp32 (zeros where a parameter got none: the GRBM's c at K = 0)."""
    import torch

    from distributed_bism.models import unwrap

    return {
        n: (torch.zeros_like(p) if p.grad is None else p.grad).detach().float().cpu().clone()
        for n, p in unwrap(module).named_parameters()
    }


# ============================================================================ stage: nccl_grad
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


# ============================================================================ stage: deepspeed_bf16
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


# ============================================================================ stage: step_bench
@dataclasses.dataclass(frozen=True)
class BenchSize:
    name: str
    shape: tuple[int, int, int]
    ch: int
    h_dim: int
    blocks_per_stage: int
    batch: int


def reference(batch: int) -> BenchSize:
    """bench/bilevel_impls.py's conv setup: ConvEBLVM((1, 32, 32), 20, ch=64, blocks_per_stage=1)."""
    return BenchSize(f"ref-b{batch}", (1, 32, 32), ch=64, h_dim=20, blocks_per_stage=1, batch=batch)


def cifar(batch: int) -> BenchSize:
    """configs/cifar10_bimdsm.yaml's model: 3×32×32, ch 128, h_dim 50, two blocks per stage."""
    return BenchSize(f"cifar-b{batch}", (3, 32, 32), ch=128, h_dim=50, blocks_per_stage=2, batch=batch)


BENCH_PLANS: dict[str, dict[str, Any]] = {
    # most telling first: step_bench stops where its budget ends
    "full": {
        "sizes": [reference(16), cifar(16), reference(64), cifar(64)],
        "ks": (0, 1, 5, 10),
        "warmup_steps": 5,
        "repeats": 3,
    },
    "quick": {"sizes": [reference(16), cifar(16)], "ks": (0, 1, 5, 10), "warmup_steps": 5, "repeats": 2},
    "cpu-smoke": {
        "sizes": [BenchSize("tiny-b4", (1, 8, 8), ch=8, h_dim=4, blocks_per_stage=0, batch=4)],
        "ks": (0, 1),
        "warmup_steps": 2,
        "repeats": 1,
    },
}


class Iteration:
    """One bi-level iteration of the package's step on the conv EBLVM, as the trainer builds it
    (config classes, model builders, get_objective, step_from_config); set_k rebuilds the step."""

    LR, BETAS = 1e-4, (0.9, 0.95)

    def __init__(self, size: BenchSize, warmup_steps: int, device: Any):
        import torch

        from distributed_bism.config import ModelConfig, PosteriorConfig
        from distributed_bism.models import build_energy, build_posterior

        torch.manual_seed(0)
        model = ModelConfig(name="conv", h_dim=size.h_dim, ch=size.ch, blocks_per_stage=size.blocks_per_stage)
        self.energy = build_energy(model, size.shape).to(device)
        self.posterior = build_posterior(PosteriorConfig(name="gaussian", encoder="conv"), size.shape, size.h_dim).to(
            device
        )
        self.opt_e = torch.optim.Adam(self.energy.parameters(), self.LR, betas=self.BETAS)
        self.opt_q = torch.optim.Adam(self.posterior.parameters(), self.LR, betas=self.BETAS)
        self.v = torch.rand(size.batch, *size.shape, device=device)
        self.warmup_steps = warmup_steps
        self.params = {
            "energy": sum(p.numel() for p in self.energy.parameters()),
            "posterior": sum(p.numel() for p in self.posterior.parameters()),
        }
        self.set_k(0)

    def set_k(self, k: int) -> None:
        from distributed_bism.config import ObjectiveConfig
        from distributed_bism.core.bilevel import step_from_config
        from distributed_bism.objectives import get_objective

        cfg = ObjectiveConfig(
            name="bimdsm",
            sigma_begin=0.05,
            sigma_end=1.2,
            sigma_schedule="linear",
            sigma0=0.1,
            lower_level="fisher",
            warmup_steps=self.warmup_steps,
            unroll_steps=k,
            unroll_optimizer="adam",
        )
        self.step = step_from_config(get_objective(cfg), cfg, posterior_lr=self.LR, posterior_betas=self.BETAS)

    def __call__(self) -> Any:
        self.opt_e.zero_grad(set_to_none=True)
        out = self.step(energy=self.energy, v=self.v, posterior=self.posterior, posterior_optimizer=self.opt_q)
        self.opt_e.step()
        return out.loss


def timed(it: Iteration, device: Any) -> tuple[float, float | None, float]:
    """(seconds, peak extra MiB or None on the CPU, loss) of one iteration."""
    import torch

    if device.type != "cuda":
        t = time.perf_counter()
        loss = float(it())
        return time.perf_counter() - t, None, loss
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    loss_t = it()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3, (torch.cuda.max_memory_allocated() - base) / 2**20, float(loss_t)


def slope(xs: list[float], ys: list[float]) -> float | None:
    if len(xs) < 2:
        return None
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    den = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / den if den else None


def stage_step_bench(args: argparse.Namespace, budget: float, report: Callable[[dict], None]) -> dict[str, Any]:
    import torch

    plan = BENCH_PLANS["cpu-smoke" if args.cpu_smoke else "quick" if args.quick else "full"]
    repeats = args.repeats or plan["repeats"]
    device = torch.device("cpu") if args.cpu_smoke else torch.device("cuda", 0)
    if device.type == "cpu":
        torch.set_num_threads(1)
    t_end = time.perf_counter() + budget - 10
    res: dict[str, Any] = {
        "plan": {
            "ks": plan["ks"],
            "warmup_steps": plan["warmup_steps"],
            "repeats": repeats,
            "objective": "bimdsm, sigma linspace[0.05, 1.2], sigma0 0.1, fisher lower level, unroll adam",
            "optimizer": "Adam 1e-4 (0.9, 0.95) both levels",
        },
        "timing": "CUDA events between synchronize() calls" if device.type == "cuda" else "perf_counter (CPU)",
        "memory": "max_memory_allocated - memory_allocated before, per iteration"
        if device.type == "cuda"
        else "not measured on the CPU",
        "configs": {},
    }
    if device.type == "cuda":
        res["cudnn_benchmark"] = torch.backends.cudnn.benchmark
        res["tf32"] = {"matmul": torch.backends.cuda.matmul.allow_tf32, "cudnn": torch.backends.cudnn.allow_tf32}
    failures: list[str] = []
    for size in plan["sizes"]:
        rec: dict[str, Any] = {**dataclasses.asdict(size), "per_k": {}}
        res["configs"][size.name] = rec
        if time.perf_counter() > t_end:
            rec["status"], rec["error"] = "skipped", "budget"
            continue
        try:
            it = Iteration(size, plan["warmup_steps"], device)
            rec["params"] = it.params
            t0 = time.perf_counter()
            it.set_k(1)  # every code path once (cuDNN/cuBLAS handles, the allocator's pools)
            for _ in range(1 if args.cpu_smoke else 2):
                it()
            if device.type == "cuda":
                torch.cuda.synchronize()
            rec["warmup_s"] = round(time.perf_counter() - t0, 3)
            for k in plan["ks"]:
                if time.perf_counter() > t_end:
                    rec["per_k"][str(k)] = {"status": "skipped", "error": "budget"}
                    continue
                it.set_k(k)
                it()  # untimed
                runs = [timed(it, device)]
                while len(runs) < repeats and time.perf_counter() < t_end:
                    runs.append(timed(it, device))
                secs, peaks, losses = zip(*runs)
                rec["per_k"][str(k)] = {
                    "status": "ok" if all(math.isfinite(x) for x in losses) else "failed",
                    "seconds": [round(s, 5) for s in secs],
                    "median_s": statistics.median(secs),
                    "peak_mib": None if peaks[0] is None else statistics.median(p for p in peaks if p is not None),
                    "loss": losses[-1],
                }
                report(res)
        except Exception as e:  # an OOM at CIFAR size is a result, not a crash
            oom = type(e).__name__ == "OutOfMemoryError"
            rec["error"] = ("out of memory: " if oom else "") + error_line(e)
            failures.append(f"{size.name}: {rec['error']}")
            if device.type == "cuda":
                torch.cuda.empty_cache()
        done = {int(k): r for k, r in rec["per_k"].items() if r.get("status") == "ok"}
        if done and done.get(0):
            base = done[0]["median_s"]
            for r in done.values():
                r["ratio_to_k0"] = r["median_s"] / base
        ks = sorted(done)
        if ks and done[ks[0]].get("peak_mib") is not None:
            rec["peak_growth_mib_per_unrolled_step"] = slope([float(k) for k in ks], [done[k]["peak_mib"] for k in ks])
        rec["status"] = rec.get("status") or (
            "failed" if "error" in rec or any(r.get("status") == "failed" for r in rec["per_k"].values()) else "ok"
        )
        if rec["status"] == "failed" and "error" not in rec:
            failures.append(f"{size.name}: non-finite loss")
        report(res)
    res["status"] = "failed" if failures else "ok"
    if failures:
        res["error"] = "; ".join(failures)
    return res


STAGE_FUNCS: dict[str, Callable[[argparse.Namespace, float, Callable[[dict], None]], dict[str, Any]]] = {
    "nccl_grad": stage_nccl_grad,
    "deepspeed_bf16": stage_deepspeed_bf16,
    "step_bench": stage_step_bench,
}


def run_stage_child(args: argparse.Namespace) -> int:
    """In the stage's subprocess: run it, writing what it has so far to --_result after each part."""
    out = Path(args._result)
    t0 = time.perf_counter()

    def report(partial: dict) -> None:
        write_json(out, {**partial, "status": "running", "seconds": round(time.perf_counter() - t0, 2)})

    if args.cpu_smoke:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    try:
        res = STAGE_FUNCS[args._stage](args, args._budget, report)
    except Exception as e:
        res = {
            "status": "failed",
            "error": error_line(e),
            "traceback_tail": traceback.format_exc().strip().splitlines()[-8:],
        }
    res["seconds"] = round(time.perf_counter() - t0, 2)
    write_json(out, res)
    return 0


# ============================================================================ the parent
def machine_info(cpu_smoke: bool) -> dict[str, Any]:
    import torch

    def version(pkg: str) -> str | None:
        try:
            return importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            return None

    info: dict[str, Any] = {
        "mode": "cpu-smoke" if cpu_smoke else "cuda",
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "deepspeed": version("deepspeed"),
        "nccl": None,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
    try:
        smi = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
        )
        info["nvidia_smi"] = smi.stdout.strip() or last_line(smi.stderr)
    except (OSError, subprocess.TimeoutExpired) as e:
        info["nvidia_smi"] = f"not available: {error_line(e)}"
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(
            gpu=p.name,
            gpu_capability=f"{p.major}.{p.minor}",
            gpu_memory_gib=round(p.total_memory / 2**30, 1),
            gpu_count=torch.cuda.device_count(),
            cudnn=torch.backends.cudnn.version(),
        )
        try:
            info["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
        except Exception as e:
            info["nccl"] = f"unknown: {error_line(e)}"
    return info


def run_stage(stage: str, args: argparse.Namespace, budget: float) -> dict[str, Any]:
    """The stage in a subprocess of its own session, killed (its whole process group) at `budget`."""
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=f"gpu_check_{stage}_") as tmp:
        result, log = Path(tmp) / "result.json", Path(tmp) / "log.txt"
        cmd = (
            [
                sys.executable,
                str(Path(__file__).resolve()),
                "--_stage",
                stage,
                "--_result",
                str(result),
                "--_budget",
                str(budget),
            ]
            + (["--cpu-smoke"] if args.cpu_smoke else [])
            + (["--quick"] if args.quick else [])
        )
        if args.repeats:
            cmd += ["--repeats", str(args.repeats)]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        with open(log, "w") as logf:
            proc = subprocess.Popen(
                cmd, stdout=logf, stderr=subprocess.STDOUT, env=env, cwd=REPO, start_new_session=True
            )
            timed_out = False
            try:
                proc.wait(timeout=budget)
            except subprocess.TimeoutExpired:
                timed_out = True
                os.killpg(proc.pid, signal.SIGKILL)  # the stage and the ranks it spawned; nothing else
                proc.wait()
        res: dict[str, Any] = json.loads(result.read_text()) if result.exists() else {}
        tail = log.read_text(errors="replace").strip().splitlines()[-30:]
        if timed_out:
            res.update(status="failed", error=f"timed out after {budget:.0f} s (what it measured before is kept)")
        elif res.get("status") not in ("ok", "failed", "skipped"):
            res.update(
                status="failed", error=f"exited {proc.returncode} without a result: {last_line(chr(10).join(tail))}"
            )
        if res["status"] != "ok":
            res["log_tail"] = tail
    res["budget_s"] = round(budget, 1)
    res["wall_s"] = round(time.perf_counter() - t0, 2)
    return res


def summary_lines(report: dict[str, Any]) -> list[str]:
    m = report["machine"]
    lines = [
        f"gpu_check ({m['mode']}): {m.get('gpu', 'no GPU')}, torch {m['torch']} (CUDA {m['torch_cuda']}), "
        f"deepspeed {m['deepspeed']}, nvidia-smi: {m['nvidia_smi']}"
    ]
    for name, st in report["stages"].items():
        line = f"  {name:15s} {st['status']:8s} {st.get('wall_s', 0):6.1f} s"
        if st.get("ran"):
            line += f"  [{st['ran']}]"
        if st.get("error"):
            line += f"  {st['error'][:300]}"
        lines.append(line)
        for probe, p in (st.get("probes") or {}).items():
            lines.append(
                f"      probe {probe}: {p['status']}" + (f"  {p.get('error', '')[:200]}" if p["status"] != "ok" else "")
            )
        for cfg_name, c in (st.get("configs") or {}).items():
            ks = "  ".join(
                f"K={k}: {r['median_s'] * 1e3:.0f} ms"
                + (f"/{r['peak_mib']:.0f} MiB" if r.get("peak_mib") is not None else "")
                for k, r in c["per_k"].items()
                if r.get("status") == "ok"
            )
            growth = c.get("peak_growth_mib_per_unrolled_step")
            lines.append(
                f"      {cfg_name}: {c['status']}  {ks}"
                + (f"  (+{growth:.0f} MiB per unrolled step)" if growth else "")
            )
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "gpu_check.json"), help="the JSON report")
    ap.add_argument("--quick", action="store_true", help="shorter budgets and fewer benchmark configurations")
    ap.add_argument("--cpu-smoke", action="store_true", help="the same stages on the CPU (gloo, tiny sizes)")
    ap.add_argument("--budget", type=float, default=None, help="total seconds (default 420, --quick 210)")
    ap.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES))
    ap.add_argument("--repeats", type=int, default=None, help="timed iterations per (config, K) in step_bench")
    ap.add_argument("--_stage", choices=STAGES, help=argparse.SUPPRESS)
    ap.add_argument("--_result", help=argparse.SUPPRESS)
    ap.add_argument("--_budget", type=float, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args._stage:
        return run_stage_child(args)

    import torch

    if not args.cpu_smoke and not torch.cuda.is_available():
        print(
            f"gpu_check: CUDA is not available (torch {torch.__version__}, torch.version.cuda = {torch.version.cuda}"
            f"{': a CPU build of torch' if torch.version.cuda is None else ''}). Run it on a CUDA machine (see the "
            f"set-up in `{Path(__file__).name} --help`), or pass --cpu-smoke for the CPU rehearsal.",
            file=sys.stderr,
        )
        return 2
    total, fixed = BUDGETS["cpu-smoke" if args.cpu_smoke else "quick" if args.quick else "full"]
    total = args.budget or total
    t_end = time.perf_counter() + total
    report: dict[str, Any] = {
        "machine": machine_info(args.cpu_smoke),
        "budget_s": total,
        "quick": args.quick,
        "stages": {},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for stage in STAGES:
        left = t_end - time.perf_counter()
        if stage not in args.stages:
            report["stages"][stage] = {"status": "skipped", "error": "not in --stages"}
        elif left < MIN_STAGE_S:
            report["stages"][stage] = {"status": "skipped", "error": f"only {left:.0f} s of --budget left"}
        else:
            budget = min(fixed.get(stage, left), left)
            print(f"[gpu_check] {stage}: up to {budget:.0f} s", flush=True)
            report["stages"][stage] = run_stage(stage, args, budget)
        write_json(out, report)  # after each stage: a later crash keeps the earlier ones
    print("\n".join(summary_lines(report)))
    print(f"[gpu_check] wrote {out}")
    return 1 if any(st["status"] == "failed" for st in report["stages"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
