#!/usr/bin/env python
"""Wall time and peak memory of ONE bi-level training iteration against the unroll depth K.

One iteration = N warm-up steps on φ + K unrolled (differentiable) steps + the higher-level
loss + its backward + the θ optimiser step (docs/methods.md §1). It is measured for every
implementation in bilevel_impls.py: ours (the default step, with exact batching of the inner
feature passes), ours with every stage stacked in one call, ours unbatched, ours with
unroll_checkpoint, ours with share_inner_noise (a different estimator, reported as its own series, never as "ours"), the reference formulation on
`higher`, the same on torchopt's functional Adam, and a "floor" that runs the same passes as
straight-line code. All but ours_shared compute one estimator: the equivalence check compares
their θ-gradients on one RNG stream in every run.

Configurations: the checkerboard Gaussian RBM (batch 100, N=5); the demo's conv EBLVM (1×8×8,
ch 16, batch 50, N=2, K ∈ {0,1,2,5}); the reference's conv EBLVM (1×32×32, ch 64, batch 16 and
64, N=5, K ∈ {0,1,5,10}). Each configuration runs in a fresh subprocess; inside it the
implementations hold their own identically seeded models and are timed in interleaved, rotated
order, so that a drifting machine load hits them alike.

Peak memory: torch's CPU allocations bypass tracemalloc, so we measure resident memory. Before
each timed iteration we run gc + malloc_trim(0) (hand freed heap pages back to the OS), reset
the kernel's RSS high-water mark (write "5" to /proc/self/clear_refs) and read VmRSS; after
it, VmHWM. The difference is the iteration's peak extra resident memory. Where the reset is not
allowed we fall back to the child's ru_maxrss (lifetime peak; marked in the JSON).

Usage: .venv/bin/python bench/bench_bilevel.py [--quick] [--out DIR] (see --help).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from bench_machine import busy_cores_now, machine_cpu_s, machine_info, package_version
from bench_report import headline, plot, print_headline, print_table, summarise
from bilevel_impls import IMPL_LABELS, IMPLS, equivalence_check, make_impl

RESULT_MARK = "@@BENCH_RESULT@@ "


# ============================================================================ configuration
@dataclass(frozen=True)
class BenchConfig:
    """One model/batch configuration and how much to measure it.

    warmup_iters: untimed iterations per implementation at K=1 before anything is timed (the
        conv nets create their oneDNN kernels and the allocator grows its pools here).
    warmup_per_k: further untimed iterations per implementation at each K.
    repeats: timed iterations per (implementation, K); the median is reported.
    plain_repeats: timed single lower-level steps per implementation.
    """

    name: str
    model: str  # grbm | conv
    batch: int
    ks: tuple[int, ...] = (0, 1, 2, 5, 10)
    warmup_iters: int = 1
    warmup_per_k: int = 0
    repeats: int = 3
    plain_repeats: int = 5
    check: bool = True  # run the ours-vs-higher gradient equivalence check in this child


# Repeats are the fewest that still give a median: the default run takes ~13 minutes single-
# threaded on a 2-core cloud VM, ~60% of it in conv-b64. A conv iteration costs seconds (an
# 11M-parameter ResNet, differentiated twice), over a minute at batch 64 and K=10, so the conv
# configurations get one or two repeats; raise them with --repeats on a bigger machine. The
# GRBM costs milliseconds and gets many.
REFERENCE_KS = (0, 1, 5, 10)
FULL_CONFIGS = (
    BenchConfig("grbm", "grbm", 100, warmup_iters=3, warmup_per_k=3, repeats=30, plain_repeats=100),
    # configs/demo.yaml's model and batch at N = 2 (build_setup in bilevel_impls.py).
    BenchConfig("demo", "demo", 50, ks=(0, 1, 2, 5), warmup_iters=2, warmup_per_k=1, repeats=9, plain_repeats=20),
    BenchConfig("conv-b16", "conv", 16, ks=REFERENCE_KS, repeats=2, plain_repeats=3),
    # No equivalence check here: the estimator does not depend on the batch size (checked at 16).
    BenchConfig("conv-b64", "conv", 64, ks=REFERENCE_KS, repeats=1, plain_repeats=2, check=False),
)
QUICK_CONFIGS = (
    BenchConfig("grbm", "grbm", 100, warmup_iters=2, warmup_per_k=1, repeats=5, plain_repeats=10),
    BenchConfig("demo", "demo", 50, ks=(0, 1), warmup_iters=1, repeats=3, plain_repeats=3),
    BenchConfig("conv-b16", "conv", 16, ks=(0, 1), warmup_iters=1, repeats=1, plain_repeats=1),
)


@dataclass(frozen=True)
class ChildSpec:
    """What a child process measures (passed as JSON on its command line)."""

    config: BenchConfig
    threads: int
    seed: int
    check: bool  # allow the ours-vs-higher gradient equivalence check (--no-check clears it)


# ============================================================================ peak memory
class PeakRSS:
    """Peak resident memory of a code region, as a delta over the RSS at its start (MiB)."""

    def __init__(self) -> None:
        try:
            self._libc: ctypes.CDLL | None = ctypes.CDLL("libc.so.6")
        except OSError:
            self._libc = None
        self.method = "VmHWM-reset" if self._reset_hwm() else "ru_maxrss"
        self._base_kib = 0

    @staticmethod
    def _status_kib(key: str) -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
        raise KeyError(key)

    @staticmethod
    def _reset_hwm() -> bool:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # Linux >= 4.0: reset the peak RSS to the current RSS
            return True
        except OSError:
            return False

    def start(self) -> None:
        """Drop freed memory, then mark the current RSS as the baseline."""
        gc.collect()
        if self._libc is not None:
            self._libc.malloc_trim(0)  # otherwise freed heap pages stay resident and hide growth
        if self.method == "VmHWM-reset":
            self._reset_hwm()
        self._base_kib = self._status_kib("VmRSS")

    def peak_delta_mib(self) -> float:
        """Peak RSS since `start` minus the baseline. With ru_maxrss only the lifetime peak is
        known, so later regions can read too low; the JSON records which method was used."""
        if self.method == "VmHWM-reset":
            peak = self._status_kib("VmHWM")
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
        return (peak - self._base_kib) / 1024


# ============================================================================ measurements
def run_child(spec: ChildSpec) -> dict[str, Any]:
    """Measure every (implementation, K) of one configuration in this (fresh) process."""
    import torch

    torch.set_num_threads(spec.threads)
    cfg = spec.config
    log = lambda msg: print(f"[{cfg.name}] {msg}", file=sys.stderr, flush=True)  # noqa: E731
    out: dict[str, Any] = {"config": asdict(cfg), "threads": torch.get_num_threads()}

    if spec.check and cfg.check:
        t0 = time.perf_counter()
        out["equivalence"] = equivalence_check(cfg.model, cfg.batch, spec.seed)
        log(f"equivalence check {out['equivalence']} ({time.perf_counter() - t0:.1f}s)")
        gc.collect()

    impls = {name: make_impl(name, cfg.model, cfg.batch, spec.seed) for name in IMPLS}
    mem = PeakRSS()
    out["memory_method"] = mem.method

    t0 = time.perf_counter()
    for impl in impls.values():
        impl.set_unroll(1)  # K=1 runs every code path (warm-up, unroll, outer)
        for _ in range(cfg.warmup_iters):
            impl.iteration()
    log(f"warm-up done ({time.perf_counter() - t0:.1f}s)")

    # A plain lower-level step, the unit in which an unrolled step's cost is expressed.
    plain: dict[str, list[float]] = {"ours": [], "higher": []}
    for r in range(cfg.plain_repeats):
        for name in rotate(list(plain), r):
            t = time.perf_counter()
            impls[name].plain_step()
            plain[name].append(time.perf_counter() - t)
    out["plain_step_s"] = plain

    times: dict[str, dict[int, list[float]]] = {n: {} for n in IMPLS}
    peaks: dict[str, dict[int, list[float]]] = {n: {} for n in IMPLS}
    losses: dict[str, dict[int, list[float]]] = {n: {} for n in IMPLS}
    for k in cfg.ks:
        for impl in impls.values():
            impl.set_unroll(k)
            for _ in range(cfg.warmup_per_k):
                impl.iteration()
        for r in range(cfg.repeats):
            for name in rotate(list(IMPLS), r):  # rotated so no implementation always goes first
                mem.start()
                t = time.perf_counter()
                loss = impls[name].iteration()
                dt = time.perf_counter() - t
                times[name].setdefault(k, []).append(dt)
                peaks[name].setdefault(k, []).append(mem.peak_delta_mib())
                losses[name].setdefault(k, []).append(loss)
        log(f"K={k}  " + "  ".join(f"{n} {statistics.median(times[n][k]):.4g}s" for n in IMPLS))
    out.update(times_s=times, peak_rss_delta_mib=peaks, losses=losses,
               child_ru_maxrss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return out


def rotate(items: list[str], r: int) -> list[str]:
    r %= len(items)
    return items[r:] + items[:r]


# ============================================================================ orchestration
def torchopt_path() -> str:
    """Which torchopt Adam ran: its C++ op, or the Python fallback where the op does not load."""
    try:
        from torchopt._C import adam_op  # noqa: F401
    except (ImportError, OSError) as e:
        return f"python (the compiled op does not load: {str(e).splitlines()[0][:120]})"
    return "compiled C++ op available (the bench uses use_accelerated_op=False: the Python path)"


def bilevel_machine_info(threads: int) -> dict[str, Any]:
    info = machine_info()
    info.update(torch_threads=threads, higher=package_version("higher"), torchopt=package_version("torchopt"),
                torchopt_path=torchopt_path())
    return info


def children_cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def spawn_child(spec: ChildSpec) -> dict[str, Any]:
    """Run one configuration in a fresh interpreter and return its result, with how many cores
    other processes kept busy meanwhile (machine busy time minus the child's own CPU time)."""
    env = dict(os.environ, OMP_NUM_THREADS=str(spec.threads), MKL_NUM_THREADS=str(spec.threads))
    payload = json.dumps({**asdict(spec), "config": asdict(spec.config)})
    load0, (busy0, steal0), own0, t0 = os.getloadavg(), machine_cpu_s(), children_cpu_s(), time.perf_counter()
    proc = subprocess.run([sys.executable, __file__, "--child", payload], env=env, stdout=subprocess.PIPE,
                          text=True, check=False)
    wall = time.perf_counter() - t0
    (busy1, steal1), own1 = machine_cpu_s(), children_cpu_s()
    if proc.returncode != 0:
        raise RuntimeError(f"child for {spec.config.name} failed with exit status {proc.returncode}")
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT_MARK))
    result = json.loads(line[len(RESULT_MARK):])
    result["loadavg_before_after"] = [load0, os.getloadavg()]
    result["child_wall_s"] = wall
    result["other_processes_cores"] = max(0.0, (busy1 - busy0) - (own1 - own0)) / wall
    result["steal_cores"] = (steal1 - steal0) / wall
    return result


# ============================================================================ command line
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke run: GRBM, demo + conv batch 16 at K∈{0,1}, ~3 min")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results",
                   help="output folder for bilevel.json and bilevel.png (default bench/results)")
    p.add_argument("--configs", nargs="+", help="subset of configurations (grbm demo conv-b16 conv-b64)")
    p.add_argument("--ks", type=int, nargs="+", help="override the K values (0 is needed for marginal costs)")
    p.add_argument("--repeats", type=int, help="override the timed repeats of every configuration")
    p.add_argument("--threads", type=int, default=1,
                   help="torch.set_num_threads in every child (default 1: see bench/README.md)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-check", action="store_true", help="skip the ours-vs-higher gradient check")
    p.add_argument("--child", help=argparse.SUPPRESS)  # internal: JSON ChildSpec
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        d = json.loads(args.child)
        spec = ChildSpec(config=BenchConfig(**{**d["config"], "ks": tuple(d["config"]["ks"])}),
                         threads=d["threads"], seed=d["seed"], check=d["check"])
        print(RESULT_MARK + json.dumps(run_child(spec)), flush=True)
        return 0

    try:
        import higher  # noqa: F401
        import torchopt  # noqa: F401
    except ImportError as e:
        sys.exit(f"{e.name} is missing: run `make bench-deps` (higher 0.2.1 and torchopt 0.7.3, bench only)")

    configs = list(QUICK_CONFIGS if args.quick else FULL_CONFIGS)
    if args.configs:
        known = {c.name: c for c in FULL_CONFIGS}
        configs = [next((c for c in configs if c.name == n), known[n]) for n in args.configs]
    if args.ks:
        configs = [replace(c, ks=tuple(sorted(set(args.ks)))) for c in configs]
    if args.repeats:
        configs = [replace(c, repeats=args.repeats) for c in configs]

    info = bilevel_machine_info(args.threads)
    info["busy_cores_at_start"] = busy_cores_now()
    if info["busy_cores_at_start"] > 0.2:
        # Another process is using the CPU: absolute times will be inflated, and with more than
        # one thread every parallel region can stall a whole scheduler time slice.
        print(f"warning: other processes keep {info['busy_cores_at_start']:.1f} cores busy; "
              "timings will be contaminated", file=sys.stderr)
    t_start = time.perf_counter()
    results: dict[str, Any] = {}
    for cfg in configs:
        print(f"== {cfg.name}: batch {cfg.batch}, K {list(cfg.ks)}, {cfg.repeats} repeats", file=sys.stderr, flush=True)
        raw = spawn_child(ChildSpec(cfg, args.threads, args.seed, check=not args.no_check))
        raw["summary"] = summarise(raw)
        results[cfg.name] = raw
    info["loadavg_end"] = os.getloadavg()
    info["wall_s"] = time.perf_counter() - t_start

    args.out.mkdir(parents=True, exist_ok=True)
    doc = {
        "what": "one bi-level iteration: N warm-up (5; 2 for demo) + K unrolled steps + higher-level loss + "
                "backward + θ step",
        "machine": info,
        "implementations": IMPL_LABELS,
        "timing": "median wall time (time.perf_counter) over `repeats` iterations after untimed warm-up; "
                  "implementations interleaved in rotated order within one process per configuration",
        "memory": "peak RSS growth during one iteration: gc + malloc_trim(0), reset VmHWM via "
                  "/proc/self/clear_refs, VmHWM - VmRSS(start); max over repeats",
        "results": results,
        "headline": headline(results),
    }
    (args.out / "bilevel.json").write_text(json.dumps(doc, indent=1))
    plot(results, args.out / "bilevel.png")
    print_table(results)
    print_headline(results)
    print(f"\nthreads {args.threads}, {info['cpu_model']}, torch {info['torch']}; "
          f"wall {info['wall_s']:.0f}s; load avg start {info['loadavg_start'][0]:.2f} end {info['loadavg_end'][0]:.2f}")
    print(f"wrote {args.out / 'bilevel.json'} and {args.out / 'bilevel.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
