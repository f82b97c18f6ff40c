"""A worker SIGKILLed in the middle of a 2-worker `bism train` run: Ray restarts the worker
group, the run continues from its last checkpoint, and ends with the parameters of an
uninterrupted run of the same seed, in the same MLflow run, FINISHED.

Each `bism train` runs as a subprocess that starts its own Ray (trainer.address=local: a new
local cluster even if another runs on this machine; RAY_TMPDIR keeps its files apart). The test
kills one of that subprocess's own RayTrainWorker descendants, and at the end kills whatever
descendants are left by their PIDs (never `ray stop`).
"""

from __future__ import annotations

import signal
import time
from pathlib import Path

import psutil
import pytest
import torch
import yaml

from tests.helpers.processes import BismProcess

STEPS, EVERY = 600, 100


def write_config(path: Path, output_dir: Path) -> Path:
    cfg = {
        "data": {"name": "checkerboard", "n_train": 4000, "n_test": 500},
        "model": {"name": "grbm", "h_dim": 4},
        "posterior": {"name": "bernoulli", "temperature": 0.1},
        "objective": {"name": "bidsm", "sigma": 0.05, "warmup_steps": 2, "unroll_steps": 2},
        "optim": {"lr": 1e-3, "posterior_lr": 1e-3},
        "trainer": {"name": "killme", "strategy": "ddp", "num_workers": 2, "address": "local", "steps": STEPS, "batch_size": 50,
                    "log_every": 50, "checkpoint_every": EVERY, "max_failures": 2, "output_dir": str(output_dir)},
        "eval": {"every": STEPS, "metrics": ["test_loglik"]},
    }
    path.write_text(yaml.safe_dump(cfg))
    return path


def final_model(output_dir: Path) -> dict:
    return torch.load(output_dir / "models" / "killme" / "model.pt", weights_only=True)


def mlflow_runs(output_dir: Path) -> list:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{output_dir / 'mlflow.db'}")
    exp = client.get_experiment_by_name("distributed_bism")
    return client.search_runs([exp.experiment_id])


@pytest.mark.slow
def test_sigkill_of_a_worker_resumes_to_the_uninterrupted_result(tmp_path):
    clean_out, killed_out = tmp_path / "clean", tmp_path / "killed"
    clean = BismProcess(["train", str(write_config(tmp_path / "clean.yaml", clean_out))], tmp_path / "clean.log")
    try:
        assert clean.wait(timeout=300) == 0, (tmp_path / "clean.log").read_text()[-3000:]
    finally:
        clean.stop()

    run = BismProcess(["train", str(write_config(tmp_path / "killed.yaml", killed_out))], tmp_path / "killed.log")
    victim = None
    try:
        marker = killed_out / "ray_results" / "killme" / f"checkpoint_{2 * EVERY:08d}"
        deadline = time.monotonic() + 240
        while not marker.exists():
            assert run.proc.poll() is None, (tmp_path / "killed.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "no checkpoint appeared"
            time.sleep(0.2)
        workers = run.workers()
        assert len(workers) == 2, f"expected 2 RayTrainWorker processes, found {len(workers)}"
        victim = workers[-1]
        victim.send_signal(signal.SIGKILL)
        assert run.wait(timeout=300) == 0, (tmp_path / "killed.log").read_text()[-3000:]
    finally:
        run.stop()
    log = (tmp_path / "killed.log").read_text()
    assert not psutil.pid_exists(victim.pid) or psutil.Process(victim.pid).status() == psutil.STATUS_ZOMBIE
    assert "resumed from" in log, "the restarted workers did not load a checkpoint"
    assert f"step {STEPS}/{STEPS}" in log

    a, b = final_model(clean_out), final_model(killed_out)
    assert a["step"] == b["step"] == STEPS
    for part in ("energy", "posterior", "ema"):
        for name, t in a[part].items():
            assert torch.allclose(t, b[part][name], rtol=0, atol=1e-6), f"{part}.{name} differs after the kill"

    runs = mlflow_runs(killed_out)
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert runs[0].data.tags.get("checkpoint_path", "").endswith(f"checkpoint_{STEPS:08d}")
