#!/usr/bin/env python
"""Where one bi-level iteration spends its time: torch.profiler over the default step ("ours").

For each configuration (bench/bilevel_impls.py's models: `demo` = configs/demo.yaml's conv
EBLVM at batch 50, N = 2; `conv` = the reference's 1×32×32 ch 64 model at batch 16, N = 5) it
profiles a few iterations at one K and sorts the operators' self CPU time into
    network    convolutions, pooling, linear layers and activations (forward and backward)
    optimiser  the posterior's torch Adam and the unrolled Adam's elementwise arithmetic
    other      everything else: copies, allocations, autograd bookkeeping, Python
and writes the shares and the top operators to bench/results/profile_step.json (one thread).

Usage: .venv/bin/python bench/profile_step.py [--k 1] [--iters 5] [--configs demo conv]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from bench_machine import machine_info
from bilevel_impls import make_impl

NETWORK = ("conv", "pool", "elu", "addmm", "aten::mm", "linear", "relu", "aten::bmm", "leaky_relu")
OPTIMISER = ("Optimizer.step", "_foreach", "aten::sqrt", "aten::addcdiv", "aten::addcmul", "aten::lerp")
CONFIGS = {"demo": ("demo", 50), "conv": ("conv", 16)}


def category(name: str) -> str:
    if any(key in name for key in NETWORK):
        return "network"
    if any(key in name for key in OPTIMISER):
        return "optimiser"
    return "other"


def profile(model: str, batch: int, k: int, iters: int) -> dict[str, Any]:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    impl = make_impl("ours", model, batch, 0)
    impl.set_unroll(k)
    for _ in range(2):
        impl.iteration()
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(iters):
            impl.iteration()
    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    total = sum(e.self_cpu_time_total for e in events)
    shares: dict[str, float] = {}
    for e in events:
        shares[category(e.key)] = shares.get(category(e.key), 0.0) + e.self_cpu_time_total / total
    top = sorted(events, key=lambda e: -e.self_cpu_time_total)[:15]
    return {
        "model": model,
        "batch": batch,
        "K": k,
        "iterations": iters,
        "self_cpu_s_per_iteration": total / 1e6 / iters,
        "shares": {c: round(v, 4) for c, v in sorted(shares.items())},
        "top": [
            {"op": e.key, "share": round(e.self_cpu_time_total / total, 4), "calls_per_iteration": e.count / iters}
            for e in top
        ],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--k", type=int, default=1, help="unrolled steps K (default 1)")
    p.add_argument("--iters", type=int, default=5, help="profiled iterations per configuration")
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "profile_step.json")
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    results = {}
    for name in args.configs:
        results[name] = profile(*CONFIGS[name], args.k, args.iters)
        r = results[name]
        print(f"{name}: {r['self_cpu_s_per_iteration'] * 1e3:.1f} ms self CPU per iteration; shares {r['shares']}")
        for t in r["top"][:8]:
            print(f"    {t['share']:6.1%}  {t['calls_per_iteration']:7.1f} calls/it  {t['op']}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": machine_info(), "threads": 1, "results": results}, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
