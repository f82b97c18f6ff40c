#!/usr/bin/env python
"""Where a training step's time goes, per strategy: ddp against deepspeed at ZeRO stages 0/1/2.

Each (strategy, workers) runs in `workers` fresh processes (fork) on one gloo process group (no
Ray, no MLflow), one thread each, and times TrainLoop.run_step on the demo's work
(configs/demo.yaml unless --config) and, inside it, every call the step makes on the two
updaters (the posterior's warm-up backward and step, the posterior optimiser state the unrolled
Adam starts from, θ's backward and step, zero_grad, set_lr). "other" is the rest of the step: the
forward passes, the unroll, autograd outside the updaters' backward. The strategies run
interleaved, rotated per repeat. Rank 0's per-step times are kept; the median over steps (after
--skip start-up steps) is reported, per part and for the whole step.

    .venv/bin/python bench/step_parts.py --workers 1 --out bench/results/step_parts_w1.json
"""

from __future__ import annotations

import os

os.environ["OMP_NUM_THREADS"] = "1"
os.environ["MKL_NUM_THREADS"] = "1"

import argparse  # noqa: E402
import json  # noqa: E402
import shlex  # noqa: E402
import socket  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PARTS = (
    "posterior.backward",
    "posterior.step",
    "posterior.optimizer_state",
    "energy.backward",
    "energy.step",
    "zero_grad",
    "set_lr",
)


def timed(fn: Callable[..., Any], acc: dict[str, float], key: str) -> Callable[..., Any]:
    """fn, adding its wall time to acc[key] and its process CPU time to acc["cpu:" + key]."""

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        t0, c0 = time.perf_counter(), time.process_time()
        try:
            return fn(*args, **kwargs)
        finally:
            acc[key] = acc.get(key, 0.0) + time.perf_counter() - t0
            acc["cpu:" + key] = acc.get("cpu:" + key, 0.0) + time.process_time() - c0

    return wrapper


def worker(rank: int, world: int, port: int, label: str, args: dict[str, Any], path: str) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        import distributed_bism
        from distributed_bism.config import load_config
        from distributed_bism.training.loop import TrainLoop

        strategy, _, stage = label.partition("-z")
        overrides = [
            f"trainer.strategy={strategy}",
            f"trainer.num_workers={world}",
            *args["set"],
            f"trainer.output_dir={tempfile.mkdtemp(prefix='bism_parts_')}",
            "tracking.enabled=false",
        ]
        if stage:
            overrides.append(f"trainer.zero_stage={stage}")
        cfg = load_config(args["config"], overrides)
        loop = TrainLoop.from_config(cfg, rank=rank, world_size=world)
        acc: dict[str, float] = {}
        for who, upd in (("energy", loop.replica.energy_updater), ("posterior", loop.replica.posterior_updater)):
            if upd is None:
                continue
            for m in ("backward", "step", "optimizer_state"):
                setattr(upd, m, timed(getattr(upd, m), acc, f"{who}.{m}"))
            for m in ("zero_grad", "set_lr"):
                setattr(upd, m, timed(getattr(upd, m), acc, m))
        steps: list[dict[str, float]] = []
        for _ in range(args["steps"]):
            acc.clear()
            v = loop.batches(loop.step)
            t0, c0 = time.perf_counter(), time.process_time()
            loop.run_step(v)
            total, cpu = time.perf_counter() - t0, time.process_time() - c0
            steps.append({"step": total, "cpu:step": cpu, **acc})
        if rank == 0:
            Path(path).write_text(
                json.dumps(
                    {
                        "label": label,
                        "world": world,
                        "steps": steps,
                        "zero_stage": cfg.trainer.zero_stage,
                        "distributed_bism": str(Path(distributed_bism.__file__).parent),
                    }
                )
            )
    finally:
        dist.destroy_process_group()


def child(label: str, world: int, args: dict[str, Any], path: str) -> None:
    """One (strategy, workers) run: `world` forked ranks; rank 0 writes its step times to `path`."""
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(worker, args=(world, port, label, args, path), nprocs=world, join=True, start_method="fork")


def run(code: str, where: str, label: str, world: int, args: dict[str, Any]) -> dict[str, Any]:
    """`child` in a fresh interpreter that imports distributed_bism from `where` (PYTHONPATH), so
    that two versions of the code (--code) can be timed interleaved in one benchmark run."""
    fd, path = tempfile.mkstemp(suffix=".json")
    os.close(fd)
    spec = json.dumps({"label": label, "world": world, "args": args, "path": path})
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([where, os.environ.get("PYTHONPATH", "")])}
    subprocess.run([sys.executable, __file__, "--child", spec], env=env, check=True)
    out = json.loads(Path(path).read_text())
    os.unlink(path)
    out["code"], out["label"] = code, f"{code}:{label}" if code else label
    return out


def summarise(runs: list[dict[str, Any]], skip: int) -> dict[str, Any]:
    by: dict[str, list[dict[str, float]]] = {}
    for r in runs:
        by.setdefault(r["label"], []).extend(r["steps"][skip:])
    out: dict[str, Any] = {}
    for label, steps in by.items():
        med: dict[str, float] = {}
        for c in ("", "cpu:"):  # wall time, then the process's CPU time (less sensitive to other load)
            med[c + "step"] = statistics.median(s[c + "step"] for s in steps)
            for p in PARTS:
                med[c + p] = statistics.median(s.get(c + p, 0.0) for s in steps)
            med[c + "other"] = statistics.median(s[c + "step"] - sum(s.get(c + p, 0.0) for p in PARTS) for s in steps)
        out[label] = {"median_s": med, "n_steps": len(steps)}
    for label, v in out.items():
        code = label.rpartition(":")[0]
        ddp = out.get(f"{code}:ddp" if code else "ddp", {}).get("median_s")
        if ddp:
            v["minus_ddp_ms"] = {k: 1e3 * (x - ddp[k]) for k, x in v["median_s"].items()}
            v["ratio_step_vs_ddp"] = v["median_s"]["step"] / ddp["step"]
            v["ratio_cpu_step_vs_ddp"] = v["median_s"]["cpu:step"] / ddp["cpu:step"]
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(REPO / "configs" / "demo.yaml"))
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE")
    p.add_argument("--strategies", nargs="+", default=["ddp", "deepspeed-z0", "deepspeed-z1", "deepspeed-z2"])
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--skip", type=int, default=30, help="start-up steps dropped from each run")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument(
        "--code",
        nargs="+",
        default=[],
        metavar="NAME=PATH",
        help="time each of these checkouts' distributed_bism (PATH: the folder that holds it), "
        "interleaved; default: the one this interpreter imports",
    )
    p.add_argument("--out", type=Path)
    p.add_argument("--child", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        c = json.loads(a.child)
        child(c["label"], c["world"], c["args"], c["path"])
        return 0
    args = {"config": a.config, "set": a.set, "steps": a.steps}
    import distributed_bism

    codes = [tuple(c.split("=", 1)) for c in a.code] or [("", str(Path(distributed_bism.__file__).parents[1]))]
    combos = [(code, where, label) for code, where in codes for label in a.strategies]
    runs = []
    for r in range(a.repeats):
        k = r % len(combos)
        for code, where, label in combos[k:] + combos[:k]:
            t0 = time.perf_counter()
            runs.append(run(code, where, label, a.workers, args))
            print(
                f"[parts] {runs[-1]['label']} × {a.workers}, repeat {r + 1}: {time.perf_counter() - t0:.0f}s",
                file=sys.stderr,
            )
    summary = summarise(runs, a.skip)
    head = f"{'strategy':<26} {'step ms':>8} " + " ".join(f"{p.split('.')[-1][:10]:>10}" for p in (*PARTS, "other"))
    print(head)
    print(" " * 36 + " ".join(f"{p.split('.')[0][:10]:>10}" for p in (*PARTS, "other")))
    for c, what in (("", "wall"), ("cpu:", "cpu")):
        for label, v in summary.items():
            m = v["median_s"]
            ratio = v.get("ratio_cpu_step_vs_ddp" if c else "ratio_step_vs_ddp")
            print(
                f"{label + ' ' + what:<26} {1e3 * m[c + 'step']:>8.1f} "
                + " ".join(f"{1e3 * m[c + p]:>10.2f}" for p in (*PARTS, "other"))
                + (f"   {ratio:.3f}× ddp" if ratio else "")
            )
    if a.out:
        doc = {
            "what": "median per-step time of TrainLoop.run_step and of each updater call in it, per strategy "
            "(rank 0; gloo, one thread per process, no Ray): wall time, and the process's CPU time "
            "(cpu:*, all its threads)",
            "command": shlex.join([sys.executable, *sys.argv]),
            "code": dict(codes),
            "settings": {**vars(a), "out": str(a.out)},
            "loadavg": os.getloadavg(),
            "summary": summary,
            "runs": runs,
        }
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(doc, indent=1))
        print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
