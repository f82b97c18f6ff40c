#!/usr/bin/env python
"""Peak memory of ONE bi-level iteration against the unroll depth K, as live tensor bytes.

bench_bilevel.py measures peak resident memory (RSS). On the CPU that overstates what a step
keeps: glibc's malloc keeps freed pages of large tensors resident (its mmap threshold grows
with every large free), so a step that allocates and frees one ResNet graph per unrolled step,
as `unroll_checkpoint` does, shows RSS growth for memory that is no longer live. What limits K
on a GPU is live memory (the caching allocator's `max_memory_allocated`), and its CPU
counterpart is the byte count of torch's CPU allocator. torch.profiler(profile_memory=True)
records it with every allocation and free ("Total Allocated" of its `[memory]` events); the
peak of that count during one iteration, minus the count before it, is what we report here.

Each (implementation, K) is measured in a fresh interpreter, after one untimed iteration at that
K, as the max over `--repeats` profiled iterations. The growth per unrolled step is the
least-squares slope of the peak on K. RSS growth of the same iterations is reported beside it.

Usage: .venv/bin/python bench/unroll_memory.py [--configs conv-b16 conv-b64 demo] [--ks 0 1 5 10]
Writes bench/results/unroll_memory.{json,png}.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from bench_bilevel import PeakRSS
from bench_machine import busy_cores_now, machine_info
from bench_report import _slope
from bilevel_impls import IMPL_LABELS, make_impl

RESULT_MARK = "@@MEMORY_RESULT@@ "
# name → (model, batch): the sizes of bench_bilevel.py's configurations.
CONFIGS = {"demo": ("demo", 50), "conv-b16": ("conv", 16), "conv-b64": ("conv", 64)}
IMPLS = ("ours", "ours_unbatched", "ours_checkpoint", "higher")


def peak_live_mib(fn: Callable[[], Any]) -> float:
    """Peak of torch's CPU-allocator byte count while `fn()` runs, minus the count at its start
    (MiB), from the profiler's memory events."""
    from torch.profiler import ProfilerActivity, profile

    gc.collect()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(path))
        events = [e["args"] for e in json.loads(path.read_text())["traceEvents"] if e.get("name") == "[memory]"]
    if not events:
        return 0.0
    # The count after the first event minus that event's own bytes: the count before fn ran.
    base = events[0]["Total Allocated"] - events[0]["Bytes"]
    return (max(e["Total Allocated"] for e in events) - base) / 2**20


def run_child(impl_name: str, model: str, batch: int, k: int, repeats: int, seed: int) -> dict[str, Any]:
    import torch

    torch.set_num_threads(1)
    impl = make_impl(impl_name, model, batch, seed)
    impl.set_unroll(k)
    impl.iteration()  # untimed: oneDNN kernels and allocator pools are created here
    rss = PeakRSS()
    live, grown = [], []
    for _ in range(repeats):
        live.append(peak_live_mib(impl.iteration))
        rss.start()
        impl.iteration()
        grown.append(rss.peak_delta_mib())
    return {"peak_live_mib": max(live), "peak_rss_delta_mib": max(grown), "rss_method": rss.method}


def spawn(impl: str, model: str, batch: int, k: int, repeats: int, seed: int) -> dict[str, Any]:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    args = json.dumps([impl, model, batch, k, repeats, seed])
    proc = subprocess.run(
        [sys.executable, __file__, "--child", args], env=env, stdout=subprocess.PIPE, text=True, check=False
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{impl} {model} b{batch} K={k} failed with exit status {proc.returncode}")
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT_MARK))
    return dict(json.loads(line[len(RESULT_MARK) :]))


def growth(per_k: dict[str, dict[str, Any]], key: str) -> float:
    ks = sorted(int(k) for k in per_k)
    return _slope(ks, [per_k[str(k)][key] for k in ks])


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(results), figsize=(4.2 * len(results), 6.5), squeeze=False)
    for col, (name, res) in enumerate(results.items()):
        for row, (key, label) in enumerate(
            (("peak_live_mib", "peak live tensor MiB"), ("peak_rss_delta_mib", "peak RSS growth MiB"))
        ):
            ax = axes[row][col]
            for impl, per_k in res["impls"].items():
                ks = sorted(int(k) for k in per_k)
                ax.plot(ks, [per_k[str(k)][key] for k in ks], marker="o", label=impl)
            ax.set_xlabel("K (unrolled steps)")
            ax.set_ylabel(label)
            ax.set_title(f"{name}: {label.split(' MiB')[0]}", fontsize=9)
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle("one bi-level iteration: peak memory against K (live bytes: torch's CPU allocator)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", nargs="+", default=["demo", "conv-b16", "conv-b64"], choices=sorted(CONFIGS))
    p.add_argument("--ks", type=int, nargs="+", default=[0, 1, 5, 10])
    p.add_argument("--impls", nargs="+", default=list(IMPLS), choices=sorted(IMPL_LABELS))
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    p.add_argument("--child", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        print(RESULT_MARK + json.dumps(run_child(*json.loads(args.child))), flush=True)
        return 0
    info = machine_info()
    info["busy_cores_at_start"] = busy_cores_now()
    t0 = time.perf_counter()
    results: dict[str, Any] = {}
    for name in args.configs:
        model, batch = CONFIGS[name]
        impls: dict[str, dict[str, Any]] = {}
        for impl in args.impls:
            for k in sorted(args.ks):
                r = spawn(impl, model, batch, k, args.repeats, args.seed)
                impls.setdefault(impl, {})[str(k)] = r
                print(
                    f"[{name}] {impl:16s} K={k:2d}  live {r['peak_live_mib']:8.1f} MiB  "
                    f"RSS growth {r['peak_rss_delta_mib']:8.1f} MiB",
                    file=sys.stderr,
                    flush=True,
                )
        slopes = {
            i: {
                "live_mib_per_step": growth(per_k, "peak_live_mib"),
                "rss_mib_per_step": growth(per_k, "peak_rss_delta_mib"),
            }
            for i, per_k in impls.items()
        }
        if "ours" in slopes and "ours_checkpoint" in slopes:
            for kind in ("live", "rss"):
                base = slopes["ours"][f"{kind}_mib_per_step"]
                slopes["ours_checkpoint"][f"{kind}_growth_vs_ours"] = (
                    slopes["ours_checkpoint"][f"{kind}_mib_per_step"] / base if base > 0 else None
                )
        results[name] = {"model": model, "batch": batch, "impls": impls, "growth": slopes}
    info["wall_s"] = time.perf_counter() - t0
    info["loadavg_end"] = os.getloadavg()
    doc = {
        "what": "peak memory of one bi-level iteration (N warm-up + K unrolled steps + J + backward + θ step)",
        "memory": "peak_live_mib: max of torch's CPU-allocator count (profiler [memory] events, 'Total "
        "Allocated') during the iteration minus the count before it; peak_rss_delta_mib: as in "
        "bench_bilevel.py. Max over repeats, one fresh process per (implementation, K).",
        "implementations": {i: IMPL_LABELS[i] for i in args.impls},
        "machine": info,
        "results": results,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "unroll_memory.json").write_text(json.dumps(doc, indent=1))
    plot(results, args.out / "unroll_memory.png")
    for name, res in results.items():
        for impl, g in res["growth"].items():
            extra = "".join(f"  {k} {v:.2f}" for k, v in g.items() if k.endswith("vs_ours") and v is not None)
            print(
                f"{name:9s} {impl:16s} live {g['live_mib_per_step']:7.1f} MiB/step  "
                f"RSS {g['rss_mib_per_step']:7.1f} MiB/step{extra}"
            )
    print(f"wrote {args.out / 'unroll_memory.json'} and {args.out / 'unroll_memory.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
