"""gpu_check.py's step_bench stage: seconds and peak CUDA memory of one bi-level iteration of the
package's step against K, at the reference and CIFAR sizes (see gpu_check.py)."""

from __future__ import annotations

import argparse
import dataclasses
import math
import statistics
import time
from collections.abc import Callable
from typing import Any

from gpu_common import error_line


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


# objective.inner_pass_elements of the two variants timed at each K: the default (by device: no
# cap on CUDA) and one call per inner input
VARIANTS: dict[str, int | None] = {"stacked": None, "unbatched": 0}


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

    def set_k(self, k: int, inner_pass_elements: int | None = None) -> None:
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
            inner_pass_elements=inner_pass_elements,
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
                # the default step and the same step unbatched, alternately
                samples: dict[str, list[tuple[float, float | None, float]]] = {name: [] for name in VARIANTS}
                for elements in VARIANTS.values():
                    it.set_k(k, elements)
                    it()  # untimed
                while not samples["stacked"] or (len(samples["stacked"]) < repeats and time.perf_counter() < t_end):
                    for name, elements in VARIANTS.items():
                        it.set_k(k, elements)
                        samples[name].append(timed(it, device))
                secs, peaks, losses = zip(*samples["stacked"])
                unbatched = statistics.median(s for s, _, _ in samples["unbatched"])
                rec["per_k"][str(k)] = {
                    "status": "ok" if all(math.isfinite(x) for x in losses) else "failed",
                    "seconds": [round(s, 5) for s in secs],
                    "median_s": statistics.median(secs),
                    "peak_mib": None if peaks[0] is None else statistics.median(p for p in peaks if p is not None),
                    "loss": losses[-1],
                    "unbatched_median_s": unbatched,
                    "unbatched_over_stacked": unbatched / statistics.median(secs),
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
