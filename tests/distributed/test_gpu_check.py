"""bench/gpu_check.py rehearsed on the CPU (--cpu-smoke --quick, ~40 s on 2 cores): every stage
reports a status, and the cross-rank gradient check really ran on 2 gloo ranks and passed (the
DDP-averaged hypergradient equals the mean of the ranks' single-process ones). The GPU run itself
needs a lent CUDA machine; see the script's docstring."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "bench" / "gpu_check.py"
STAGES = ("nccl_grad", "deepspeed_bf16", "step_bench")


def test_cpu_smoke_runs_every_stage_and_the_gradient_check_passes(tmp_path):
    out = tmp_path / "gpu_check.json"
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--cpu-smoke", "--quick", "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=330,
    )
    log = done.stdout[-4000:] + done.stderr[-4000:]
    report = json.loads(out.read_text())
    stages = report["stages"]
    assert set(stages) == set(STAGES), log
    for name in STAGES:
        assert stages[name]["status"] in ("ok", "failed", "skipped"), f"{name}: {stages[name]}"
    assert report["machine"]["mode"] == "cpu-smoke" and report["machine"]["torch"] == torch.__version__

    grad = stages["nccl_grad"]
    assert grad["status"] == "ok", f"{grad.get('error')}\n{log}"
    (attempt,) = grad["attempts"]
    assert (attempt["backend"], attempt["world_size"], attempt["averaging_checked"]) == ("gloo", 2, True)
    assert set(attempt["per_k"]) == {"0", "3"}
    for k, rec in attempt["per_k"].items():
        assert rec["shards_differ"] and rec["equal_to_mean"], f"K={k}: {rec}"
        assert rec["max_rel_err"] <= attempt["tolerance"]

    ds = stages["deepspeed_bf16"]
    assert ds["status"] == "ok", f"{ds.get('error')}\n{log}"
    assert ds["step"]["param_dtypes"] == ["torch.bfloat16"] and math.isfinite(ds["step"]["loss"])
    # the check is the trainer's own path: an fp32 batch into bf16 engines, through the unroll
    assert ds["step"]["unroll_steps"] == 1 and ds["step"]["batch_dtype"].startswith("float32")
    assert set(ds["probes"]) == {"k0_bf16_batch"} and ds["probes"]["k0_bf16_batch"]["status"] == "ok"

    bench = stages["step_bench"]
    assert bench["status"] == "ok", f"{bench.get('error')}\n{log}"
    (cfg,) = bench["configs"].values()
    assert {k: r["status"] for k, r in cfg["per_k"].items()} == {"0": "ok", "1": "ok"}
    for k, r in cfg["per_k"].items():  # the unbatched step timed beside the default at each K
        assert r["unbatched_median_s"] > 0 and math.isclose(
            r["unbatched_over_stacked"], r["unbatched_median_s"] / r["median_s"]
        ), f"K={k}: {r}"
    assert done.returncode == 0, log
    assert "nccl_grad" in done.stdout and "wrote" in done.stdout  # the printed summary


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
def test_without_cuda_it_says_so_and_writes_nothing(tmp_path):
    out = tmp_path / "gpu_check.json"
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 2
    assert "CUDA is not available" in done.stderr and "--cpu-smoke" in done.stderr
    assert not out.exists()
