#!/usr/bin/env python
"""GPU check (issue 16, item 6): what a lent CUDA machine should tell us, in one run of ~7 minutes.
This file is the driver; the stages are gpu_grad.py, gpu_deepspeed.py and gpu_step.py, and
gpu_common.py holds what they share.

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
                  as bench/bilevel_impls.py's conv setup. At each K the default step (inner
                  passes stacked: objective.inner_pass_elements is "by device", no cap on CUDA)
                  and the same step unbatched (inner_pass_elements 0) are timed alternately, so
                  the JSON says what stacking gains on the GPU. Timed with CUDA events between
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
import importlib.metadata
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gpu_common import REPO, error_line, last_line, write_json  # gpu_common puts REPO on sys.path
from gpu_deepspeed import stage_deepspeed_bf16
from gpu_grad import stage_nccl_grad
from gpu_step import stage_step_bench

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
                + (f" (unbatched {r['unbatched_over_stacked']:.2f}x)" if "unbatched_over_stacked" in r else "")
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
