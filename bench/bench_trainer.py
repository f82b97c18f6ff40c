#!/usr/bin/env python
"""Throughput and start-up of the distributed trainer: worker scaling, harness overhead, time
to the first step.

    worker scaling    steady-state samples/s with 1 and 2 workers at the same per-worker batch,
                      for strategies ddp and deepspeed (ZeRO-1, or each of --zero-stages);
                      efficiency = r(2) / (2 r(1)); each deepspeed rate / the ddp rate at as many workers
    harness overhead  ddp with 1 worker against local on the same work; overhead = 1 - r_ddp1/r_local
    time to 1st step  `bism train CONFIG ... trainer.address=local` as a fresh subprocess (a new
                      local Ray cluster), until the first progress line of a step >= 1 appears

Work: the demo (configs/demo.yaml: conv EBLVM on digits, BiMDSM, N=2, K=1, batch 50 per
worker), one core per worker (trainer.cpus_per_worker=1, OMP/MKL_NUM_THREADS=1; local runs with
torch.set_num_threads(1)). Steady-state rate: the `train/perf/samples_per_s` metric TrainLoop logs
every trainer.log_every steps (throughput over the window since the previous log), read back
from MLflow; the first --skip-windows windows (start-up) are dropped, the median of the rest is
the rate. All Ray runs share one new local Ray cluster started here; the time-to-first-step
runs start their own. Summary, plot and table: trainer_report.py.

Usage: .venv/bin/python bench/bench_trainer.py [--quick] [--out DIR] (see --help and bench/README.md).
"""

from __future__ import annotations

# One thread per worker: set before torch is imported here, and inherited by the Ray processes
# this script starts (Ray sets OMP_NUM_THREADS only where it is unset).
import os

os.environ["OMP_NUM_THREADS"] = "1"
os.environ["MKL_NUM_THREADS"] = "1"

import argparse  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import shlex  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from collections.abc import Sequence  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import psutil  # noqa: E402
from bench_machine import CpuSampler, busy_cores_now, machine_info, package_version  # noqa: E402
from trainer_report import METHOD, plot, print_table, summarise  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEMO_CONFIG = REPO / "configs" / "demo.yaml"
FIRST_STEP = re.compile(r"\bstep (\d+)/(\d+)\b")
# Output lines that mark the stages of a launch, in order (the first match of each counts).
MARKS = (
    ("resolved_config", "resolved config:"),  # interpreter, imports, config, preflight checks
    ("mlflow_run", "MLflow run "),  # the tracking store opened and the run created
    ("workers_ready", "global batch"),  # rank 0 built its loop (Ray up, workers started, process group, models)
)


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


# ============================================================================ throughput runs
def split_label(label: str) -> tuple[str, int | None]:
    """A run label and its strategy and ZeRO stage: "ddp" -> (ddp, None); "deepspeed-z2" -> (deepspeed, 2)."""
    strategy, _, stage = label.partition("-z")
    return strategy, int(stage) if stage else None


def run_overrides(args: argparse.Namespace, label: str, workers: int | str, name: str, output_dir: Path) -> list[str]:
    """The dotted overrides of one throughput run (on top of --config and --set). `label`: a
    strategy, or deepspeed-zS for deepspeed at ZeRO stage S (--zero-stages)."""
    strategy, stage = split_label(label)
    return [
        f"trainer.name={name}", f"trainer.output_dir={output_dir}", f"trainer.strategy={strategy}",
        *([f"trainer.zero_stage={stage}"] if stage is not None else []),
        f"trainer.num_workers={workers}", "trainer.cpus_per_worker=1", f"trainer.steps={args.steps}",
        f"trainer.log_every={args.log_every}",
        # Checkpoints only at the end, after the last window: the windows time training alone.
        f"trainer.checkpoint_every={args.steps}",
        # No evaluation (sample grids would run Langevin chains on rank 0); it would fall outside
        # the steady windows anyway (step 0 and the end).
        "eval.metrics=[]", f"eval.every={args.steps}",
        "tracking.enabled=true", f"tracking.tracking_uri=sqlite:///{output_dir / 'mlflow.db'}",
        *args.set,
    ]


def wait_for_idle_cluster(ray: Any, timeout: float = 180.0) -> float:
    """Wait until the previous run's workers have given their CPUs back (Ray frees them a little
    after fit() returns; a worker group started before that waits, and times out after 60 s)."""
    t0 = time.perf_counter()
    total = ray.cluster_resources().get("CPU", 0)
    while ray.available_resources().get("CPU", 0) < total and time.perf_counter() - t0 < timeout:
        time.sleep(0.25)
    return time.perf_counter() - t0


def throughput_run(args: argparse.Namespace, ray: Any, strategy: str, workers: int, repeat: int, work: Path,
                   sampler: CpuSampler) -> dict[str, Any]:
    import torch
    from mlflow import MlflowClient

    from distributed_bism import train
    from distributed_bism.config import load_config

    name = f"{strategy}-w{workers}-r{repeat}"
    overrides = run_overrides(args, strategy, workers, name, work)
    cfg = load_config(args.config, overrides)
    waited = wait_for_idle_cluster(ray)
    t_wall0, t0 = time.time(), time.perf_counter()
    summary = train(cfg)
    wall = time.perf_counter() - t0
    history = MlflowClient(summary.tracking_uri).get_metric_history(summary.run_id, "train/perf/samples_per_s")
    windows, prev = [], 0
    for m in sorted(history, key=lambda m: m.step):
        # The window's length, from its steps and rate (samples/s counts all workers' samples).
        seconds = (m.step - prev) * cfg.trainer.batch_size * workers / m.value
        windows.append({"step": m.step, "samples_per_s": m.value, "seconds": seconds, "time": m.timestamp / 1000})
        prev = m.step
    steady = windows[args.skip_windows:]
    if not steady:
        raise RuntimeError(f"{name}: {len(windows)} logged windows, none left after --skip-windows "
                           f"{args.skip_windows}; raise --steps or lower --log-every")
    # The steady part starts where the last skipped window ended.
    start = windows[args.skip_windows - 1]["time"] if args.skip_windows > 0 else t_wall0
    rates = [w["samples_per_s"] for w in steady]
    out = {
        "strategy": strategy, "workers": workers, "repeat": repeat, "name": name,
        "zero_stage": cfg.trainer.zero_stage if cfg.trainer.strategy == "deepspeed" else None,
        "run_id": summary.run_id, "steps": summary.step, "wall_s": wall, "waited_for_idle_cluster_s": waited,
        "torch_threads_driver": torch.get_num_threads(),
        "windows": windows, "steady_rates": rates, "median_samples_per_s": statistics.median(rates),
        "cores_during_steady_windows": sampler.cores(start, steady[-1]["time"]),
    }
    gc.collect()
    return out


# ============================================================================ time to first step
def raylets() -> list[tuple[int, str]]:
    """(pid, command line) of every raylet on this machine."""
    found = []
    for p in psutil.process_iter(["cmdline"]):
        cmd = p.info.get("cmdline") or []
        if cmd and os.path.basename(cmd[0]) == "raylet":
            found.append((p.pid, " ".join(cmd)))
    return found


def wait_for_raylets_to_go(marker: str, timeout: float = 30.0) -> None:
    """After ray.shutdown(): wait until the raylet of our own cluster (its command line names our
    temp dir) has exited, so that it no longer competes for the cores."""
    deadline = time.monotonic() + timeout
    while any(marker in cmd for _, cmd in raylets()) and time.monotonic() < deadline:
        time.sleep(0.2)


def bism_command() -> list[str]:
    script = Path(sys.executable).parent / "bism"
    return [str(script), "train"] if script.exists() else [sys.executable, "-m", "distributed_bism.cli", "train"]


def _descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def stop_tree(proc: subprocess.Popen, children: list[psutil.Process]) -> None:
    """Kill the child and what it started, by PID (it runs in its own session)."""
    if proc.poll() is None:
        proc.kill()
    for p in children:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        pass


def time_to_first_step(args: argparse.Namespace, strategy: str, workers: int, repeat: int,
                       sampler: CpuSampler) -> dict[str, Any]:
    """Launch `bism train CONFIG ... trainer.address=local` in a fresh interpreter (a new local Ray
    cluster, its files in its own RAY_TMPDIR), and time the stages of its output until the first
    progress line of a step >= 1."""
    ray_tmp = tempfile.mkdtemp(dir="/tmp", prefix="rt")  # short: Ray's socket paths have a length limit
    out_dir = Path(tempfile.mkdtemp(prefix="bism_ttfs_"))
    others = len(raylets())
    steps = args.ttfs_steps
    overrides = [f"trainer.name=ttfs-{strategy}-w{workers}-r{repeat}", f"trainer.output_dir={out_dir}",
                 f"trainer.strategy={strategy}", f"trainer.num_workers={workers}", "trainer.cpus_per_worker=1",
                 f"trainer.steps={steps}", "trainer.log_every=1", f"trainer.checkpoint_every={steps}",
                 "eval.metrics=[]", f"eval.every={steps}", *args.set, "trainer.address=local"]
    cmd = [*bism_command(), str(args.config), *overrides]
    env = {**os.environ, "RAY_TMPDIR": ray_tmp, "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)
    env.pop("MLFLOW_TRACKING_URI", None)
    log(f"time to first step: {strategy} × {workers}" + (f" ({others} other raylet(s) running)" if others else ""))
    lines: list[tuple[float, str]] = []
    t_wall0, t0 = time.time(), time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                            env=env, cwd=REPO, start_new_session=True)
    timer = threading.Timer(args.ttfs_timeout, lambda: stop_tree(proc, _descendants(proc.pid)))
    timer.start()
    marks: dict[str, float] = {}
    first_step = None
    children: list[psutil.Process] = []
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            t = time.perf_counter() - t0
            line = line.rstrip("\n")
            lines.append((t, line))
            for key, text in MARKS:
                if key not in marks and text in line:
                    marks[key] = t
            m = FIRST_STEP.search(line)
            if first_step is None and m and int(m.group(1)) >= 1:
                first_step = t
            if first_step is None:
                children = _descendants(proc.pid) or children  # remembered for the clean-up
        rc = proc.wait()
        exit_s = time.perf_counter() - t0
    finally:
        timer.cancel()
        stop_tree(proc, children + _descendants(proc.pid))
        shutil.rmtree(ray_tmp, ignore_errors=True)
        shutil.rmtree(out_dir, ignore_errors=True)
    out: dict[str, Any] = {
        "strategy": strategy, "workers": workers, "repeat": repeat,
        "command": shlex.join(_rel(c) for c in cmd),
        "other_raylets_at_launch": others,
        "rc": rc, "first_step_s": first_step, "exit_s": exit_s, "marks_s": marks,
        "cores_until_first_step": sampler.cores(t_wall0, t_wall0 + (first_step or exit_s)),
        "output": [[round(t, 3), ln[:240]] for t, ln in lines[:400]],
    }
    if rc != 0 or first_step is None:
        log(f"time to first step: {strategy} × {workers} failed (exit {rc}); last lines:\n"
            + "\n".join(ln for _, ln in lines[-30:]))
    return out


def _rel(s: str) -> str:
    try:
        return str(Path(s).relative_to(REPO)) if s.startswith("/") else s
    except ValueError:
        return s


# ============================================================================ machine
def trainer_machine_info() -> dict[str, Any]:
    info = machine_info()
    ext_root = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or Path.home() / ".cache" / "torch_extensions")
    info.update({
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        **{pkg: package_version(pkg) for pkg in ("ray", "deepspeed", "mlflow")},
        # DeepSpeed compiles its shared-memory comm op once per machine (~45 s); where it was not
        # cached yet, the first deepspeed launch pays it (before its first step).
        "deepspeed_shm_comm_cached_at_start": any(ext_root.glob("*/deepspeed_shm_comm")),
        **package_source(),
    })
    return info


def package_source() -> dict[str, Any]:
    """Which distributed_bism this process imports (PYTHONPATH may point at another checkout, e.g.
    an unchanged copy for a before/after comparison), and that checkout's commit if it is one."""
    import distributed_bism

    where = Path(distributed_bism.__file__).resolve().parent
    head = subprocess.run(["git", "-C", str(where), "rev-parse", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(["git", "-C", str(where), "status", "--porcelain", "--", "."], capture_output=True,
                           text=True)
    return {"distributed_bism": str(where),
            "distributed_bism_commit": head.stdout.strip() if head.returncode == 0 else None,
            "distributed_bism_dirty": bool(dirty.stdout.strip()) if head.returncode == 0 else None}


def ray_worker_threads(ray: Any) -> dict[str, Any]:
    """What a 1-CPU Ray task sees: the thread variables and torch's default thread count (Ray
    Train workers are 1-CPU actors of the same cluster; worker_main also calls set_num_threads)."""

    @ray.remote(num_cpus=1)
    def probe() -> dict[str, Any]:
        import torch

        import distributed_bism

        return {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
                "MKL_NUM_THREADS": os.environ.get("MKL_NUM_THREADS"), "torch_threads": torch.get_num_threads(),
                # which code the workers run (PYTHONPATH may point at another checkout)
                "distributed_bism": str(Path(distributed_bism.__file__).parent)}

    return ray.get(probe.remote())


# ============================================================================ command line
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 75 steps, log every 25, one repeat, ddp time-to-first-step only (2.5-4 min); "
                        "writes trainer_scaling_quick.*")
    p.add_argument("--config", type=Path, default=DEMO_CONFIG, help="the work (default configs/demo.yaml)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="extra dotted overrides for every run, e.g. trainer.batch_size=100")
    p.add_argument("--steps", type=int, help="steps per throughput run (default 300)")
    p.add_argument("--log-every", type=int, help="steps per throughput window (default 50)")
    p.add_argument("--skip-windows", type=int, help="start-up windows dropped from each run (default 1)")
    p.add_argument("--repeats", type=int, help="runs per (strategy, workers), interleaved (default 2)")
    p.add_argument("--strategies", nargs="+", default=["ddp", "deepspeed"], choices=["ddp", "deepspeed"])
    p.add_argument("--zero-stages", type=int, nargs="+", choices=[0, 1, 2],
                   help="deepspeed at each of these ZeRO stages, side by side (runs labelled deepspeed-zS; "
                        "default: the config's trainer.zero_stage, labelled deepspeed)")
    p.add_argument("--no-local", action="store_true", help="skip the local run (and the harness overhead)")
    p.add_argument("--stem", help="output file stem (default trainer_scaling, or trainer_scaling_quick with --quick)")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="worker counts (default 1 2; 1 is needed)")
    p.add_argument("--ttfs", nargs="*", choices=["ddp", "deepspeed", "local"],
                   help="strategies timed to the first step (default ddp deepspeed; none: skip)")
    p.add_argument("--ttfs-workers", type=int, default=2, help="workers of the time-to-first-step launches")
    p.add_argument("--ttfs-steps", type=int, default=3, help="steps of a time-to-first-step launch")
    p.add_argument("--ttfs-repeats", type=int, default=1)
    p.add_argument("--ttfs-timeout", type=float, default=300.0)
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results",
                   help="output folder (default bench/results)")
    args = p.parse_args(argv)
    quick = dict(steps=75, log_every=25, skip_windows=1, repeats=1, ttfs=["ddp"])
    full = dict(steps=300, log_every=50, skip_windows=1, repeats=2, ttfs=["ddp", "deepspeed"])
    for k, v in (quick if args.quick else full).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.quick:
        args.ttfs_steps = min(args.ttfs_steps, 2)
    if 1 not in args.workers:
        p.error("--workers must include 1 (the baseline of the scaling efficiency)")
    if args.steps % args.log_every or args.steps // args.log_every <= args.skip_windows:
        p.error("--steps must be a multiple of --log-every, with more windows than --skip-windows")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    torch.set_num_threads(1)  # local runs in this process: one core, like one worker
    from distributed_bism.config import load_config

    base = load_config(args.config, args.set)
    stem = args.stem or ("trainer_scaling_quick" if args.quick else "trainer_scaling")
    info = trainer_machine_info()
    info["busy_cores_at_start"] = busy_cores_now()
    if info["busy_cores_at_start"] > 0.2:
        log(f"warning: other processes keep {info['busy_cores_at_start']:.1f} cores busy; timings will be contaminated")

    sampler = CpuSampler()
    sampler.sample()
    sampler.start()
    work = Path(tempfile.mkdtemp(prefix="bism_bench_"))
    ray_tmp = tempfile.mkdtemp(dir="/tmp", prefix="rt")  # our cluster's files, apart from any other's
    os.environ["RAY_TMPDIR"] = ray_tmp
    os.environ.pop("RAY_ADDRESS", None)
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    t_start = time.perf_counter()
    runs: list[dict[str, Any]] = []
    ttfs: list[dict[str, Any]] = []
    labels = [lab for s in args.strategies
              for lab in ([f"{s}-z{z}" for z in args.zero_stages] if s == "deepspeed" and args.zero_stages else [s])]
    combos = ([] if args.no_local else [("local", 1)]) + [(lab, w) for lab in labels for w in args.workers]
    try:
        import ray

        # A new local cluster even where another runs on this machine (never joins it).
        ray.init(address="local", num_cpus=max(args.workers), include_dashboard=True, dashboard_host="127.0.0.1",
                 logging_level="WARNING")
        try:
            info["ray_worker_threads"] = ray_worker_threads(ray)
            if info["ray_worker_threads"]["distributed_bism"] != info["distributed_bism"]:
                # Ray puts the driver's working directory first on its workers' sys.path: run the
                # script from the checkout you mean to time (cd there), not only with PYTHONPATH.
                log(f"warning: the Ray workers import {info['ray_worker_threads']['distributed_bism']}, this "
                    f"process {info['distributed_bism']}")
            for r in range(args.repeats):
                k = r % len(combos)  # rotated, so no configuration always runs first
                for strategy, workers in combos[k:] + combos[:k]:
                    log(f"{strategy} × {workers}, repeat {r + 1}/{args.repeats}")
                    res = throughput_run(args, ray, strategy, workers, r, work, sampler)
                    runs.append(res)
                    log(f"{strategy} × {workers}: median {res['median_samples_per_s']:.1f} samples/s over "
                        f"{len(res['steady_rates'])} windows (wall {res['wall_s']:.0f}s)")
        finally:
            ray.shutdown()
            wait_for_raylets_to_go(ray_tmp)
        # Last: Ray is down, and DeepSpeed's comm op has been compiled by the runs above.
        for r in range(args.ttfs_repeats):
            for strategy in args.ttfs:
                ttfs.append(time_to_first_step(args, strategy, 1 if strategy == "local" else args.ttfs_workers,
                                               r, sampler))
    finally:
        sampler.stop()
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    info["loadavg_end"] = os.getloadavg()
    info["wall_s"] = time.perf_counter() - t_start

    doc = {
        "what": "distributed trainer: worker scaling (ddp, deepspeed at the config's ZeRO stage or each of "
                "--zero-stages), deepspeed against ddp, harness overhead (ddp × 1 vs local), "
                "time from launching `bism train` to the first step",
        "command": shlex.join([_rel(sys.executable), _rel(str(Path(__file__).resolve())), *sys.argv[1:]]),
        "machine": info,
        "settings": {
            "quick": args.quick,
            "config": _rel(str(Path(args.config).resolve())), "extra_overrides": args.set,
            "batch_per_worker": base.trainer.batch_size, "steps": args.steps, "log_every": args.log_every,
            "skip_windows": args.skip_windows, "repeats": args.repeats, "cpus_per_worker": 1,
            "zero_stage": base.trainer.zero_stage, "zero_stages": args.zero_stages,
            "unroll_steps": base.objective.unroll_steps, "unroll_optimizer": base.objective.unroll_optimizer,
            "warmup_steps": base.objective.warmup_steps,
            "overrides_per_run": run_overrides(args, "<strategy>", "<workers>", "<name>", Path("<tmp>"))[2:],
            "ttfs_steps": args.ttfs_steps,
        },
        "method": METHOD,
        "runs": runs,
        "time_to_first_step": ttfs,
    }
    doc["summary"] = summarise(runs, ttfs, args.workers)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{stem}.json").write_text(json.dumps(doc, indent=1))
    plot(doc, args.out / f"{stem}.png")
    print_table(doc)
    print(f"\n{info['cpu_model']}, {info['cpus_available']} cores, torch {info['torch']}, ray {info['ray']}, "
          f"deepspeed {info['deepspeed']}; wall {info['wall_s']:.0f}s; load avg start "
          f"{info['loadavg_start'][0]:.2f} end {info['loadavg_end'][0]:.2f}")
    print(f"wrote {args.out / (stem + '.json')} and {args.out / (stem + '.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
