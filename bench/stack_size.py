#!/usr/bin/env python
"""How many inner inputs one stacked f(ṽ) call should take: the measurement behind
`objective.inner_pass_elements` and its CPU default (distributed_bism/core/bilevel.py,
CPU_STACK_ELEMENTS).

The bi-level step computes the conv EBLVM's visible features f at its K unrolled inputs (each
B × C×H×W) in stacked calls (exact: f is per example). Here f at K inputs is computed with
`per_call` inputs stacked in each call, for per_call from 1 (one call per input) to K (all in
one), with the graph kept and backpropagated (the unrolled stage) and without a graph (the
warm-up stage). Times are medians over interleaved, rotated repeats, one thread, and are reported
relative to one call per input (< 1: stacking is faster).

    .venv/bin/python bench/stack_size.py                  # demo and reference sizes, ~15 min on 2 cores
    .venv/bin/python bench/stack_size.py --quick --out /tmp/stack

Writes stack_size.json and stack_size.png (time relative to per_call=1 against the input
elements per call) into --out (default bench/results/).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_machine import CpuSampler, busy_cores_now, machine_info  # noqa: E402

# name: (input shape, ch, blocks_per_stage, B, K, per_call values, repeats)
CONFIGS: dict[str, tuple[tuple[int, int, int], int, int, int, int, list[int], int]] = {
    "demo": ((1, 8, 8), 16, 0, 50, 5, [1, 5], 15),
    "conv-b16": ((1, 32, 32), 64, 1, 16, 8, [1, 2, 4, 8], 5),
    "conv-b64": ((1, 32, 32), 64, 1, 64, 4, [1, 2, 4], 3),
}
QUICK = {"demo": 3, "conv-b16": 1}  # --quick: these configurations, with this many repeats


def measure(name: str, repeats: int | None) -> dict[str, Any]:
    import torch

    from distributed_bism.models.conv_energy import ConvEBLVM

    shape, ch, blocks, batch, k, per_calls, default_repeats = CONFIGS[name]
    repeats = repeats or default_repeats
    torch.manual_seed(0)
    model = ConvEBLVM(shape, h_dim=20, ch=ch, blocks_per_stage=blocks)
    xs = [torch.randn(batch, *shape) for _ in range(k)]

    def features(per_call: int) -> list[Any]:
        return [model.visible_features(torch.cat(xs[i : i + per_call])) for i in range(0, k, per_call)]

    def with_graph(per_call: int) -> None:
        model.zero_grad(set_to_none=True)
        sum(f.square().sum() for f in features(per_call)).backward()

    def no_graph(per_call: int) -> None:
        with torch.no_grad():
            features(per_call)

    out: dict[str, Any] = {"input_shape": shape, "ch": ch, "batch": batch, "K": k, "repeats": repeats}
    for stage, fn in (("with_graph", with_graph), ("no_graph", no_graph)):
        times = timed(fn, per_calls, repeats)
        base = statistics.median(times[1])
        out[stage] = {
            str(p): {
                "elements_per_call": p * batch * shape[0] * shape[1] * shape[2],
                "median_s": statistics.median(times[p]),
                "relative_to_one_per_call": statistics.median(times[p]) / base,
                "times_s": times[p],
            }
            for p in per_calls
        }
        rel = "  ".join(f"{p}/call {out[stage][str(p)]['relative_to_one_per_call']:.3f}" for p in per_calls)
        print(f"[{name}] {stage}: one per call {base:.3g}s; {rel}", flush=True)
    return out


def timed(fn: Callable[[int], None], per_calls: Sequence[int], repeats: int) -> dict[int, list[float]]:
    """Median-ready samples: one untimed call each first, then `repeats` rounds, rotated."""
    for p in per_calls:
        fn(p)
    times: dict[int, list[float]] = {p: [] for p in per_calls}
    for r in range(repeats):
        for p in [*per_calls[r % len(per_calls) :], *per_calls[: r % len(per_calls)]]:
            t = time.perf_counter()
            fn(p)
            times[p].append(time.perf_counter() - t)
    return times


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, stage in zip(axes, ("with_graph", "no_graph")):
        for name, r in results["configs"].items():
            pts = sorted(r[stage].values(), key=lambda d: d["elements_per_call"])
            ax.plot([d["elements_per_call"] for d in pts], [d["relative_to_one_per_call"] for d in pts],
                    marker="o", label=f"{name} (B={r['batch']}, K={r['K']})")
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.axvline(results["cpu_stack_elements"], color="k", ls=":", label="CPU default cap")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("input elements per stacked call")
        ax.set_title(f"f at K inputs, {stage.replace('_', ' ')}")
    axes[0].set_ylabel("time / time with one call per input")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{results['machine']['cpu_model']}, 1 thread", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    p.add_argument("--configs", nargs="+", choices=sorted(CONFIGS))
    p.add_argument("--repeats", type=int, help="override every configuration's repeats")
    p.add_argument("--quick", action="store_true", help="smoke run: demo and conv-b16, few repeats")
    args = p.parse_args(argv)

    import torch

    from distributed_bism.core.bilevel import CPU_STACK_ELEMENTS

    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    busy = busy_cores_now()
    if busy > 0.3:
        print(f"warning: other processes keep {busy:.1f} cores busy; timings will be contaminated", flush=True)
    names = args.configs or (list(QUICK) if args.quick else list(CONFIGS))
    sampler = CpuSampler()
    sampler.start()
    results: dict[str, Any] = {"machine": machine_info(), "threads": 1, "cpu_stack_elements": CPU_STACK_ELEMENTS,
                               "configs": {}}
    for name in names:
        t0 = time.time()
        results["configs"][name] = measure(name, args.repeats or (QUICK.get(name) if args.quick else None))
        results["configs"][name]["other_processes_cores"] = (sampler.cores(t0, time.time()) or {}).get("other_processes")
    sampler.stop()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "stack_size.json").write_text(json.dumps(results, indent=1))
    plot(results, args.out / "stack_size.png")
    print(f"wrote {args.out / 'stack_size.json'} and stack_size.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
