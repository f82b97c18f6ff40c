"""`bism tune` end to end on a local Ray (2 CPUs): 2-trial ASHA sweeps over lr_θ on a tiny
GRBM, run in a subprocess that starts its own Ray (trainer.address is not used by sweeps; the
subprocess gets --address local) and is cleaned up by PID.

Trials run one at a time (max_concurrent_trials 1), so ASHA's decisions are reproducible: the
grid puts lr_θ = 1e-6 (no learning) after lr_θ = 3e-2, so at its first rung the slow trial falls
below the one before it and is stopped. Each trial costs ~25 s, most of it Ray Train starting its
worker group, so the sweeps are as small as what they prove allows.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest
import yaml

from tests.helpers.processes import BismProcess, run_bism

TINY = {
    "data": {"name": "checkerboard", "n_train": 512, "n_test": 256},
    "model": {"name": "grbm", "h_dim": 4},
    "posterior": {"name": "bernoulli", "temperature": 0.5},
    "objective": {"name": "bidsm", "sigma": 0.1, "warmup_steps": 1, "unroll_steps": 0},
    "optim": {"lr": 1e-2, "posterior_lr": 1e-2},
    "trainer": {"strategy": "ddp", "num_workers": 1, "steps": 40, "batch_size": 32, "log_every": 5,
                "checkpoint_every": 20},
    "eval": {"every": 5, "metrics": ["test_loglik"]},
}


def spec(tmp_path: Path) -> Path:
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(TINY))
    s = {"base": str(tmp_path / "tiny.yaml"),
         "search": {"optim.lr": {"grid": [3e-2, 1e-6]}},
         "metric": "eval/test_loglik", "mode": "max",
         "scheduler": {"name": "asha", "grace_period": 1, "reduction_factor": 2, "max_t": 8},
         "searcher": {"name": "random"}, "num_samples": 1, "max_concurrent_trials": 1,
         "resources": {"workers_per_trial": 1, "gpus_per_worker": 0}}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(s))
    return path


@pytest.mark.slow
def test_asha_sweep_end_to_end(tmp_path):
    out = tmp_path / "out"
    log = tmp_path / "tune.log"
    rc = run_bism(["tune", str(spec(tmp_path)), "--name", "t2", "--output-dir", str(out)], log, timeout=600)
    text = log.read_text()
    assert rc == 0, text[-4000:]
    sweep = out / "sweeps" / "t2"
    rows = json.loads((sweep / "results.json").read_text())
    assert len(rows) == 2 and {r["status"] for r in rows} <= {"done", "stopped early"}, rows
    assert any(r["status"] == "stopped early" and r["iterations"] < 8 for r in rows), f"ASHA stopped no trial: {rows}"
    assert rows[0]["optim.lr"] == 3e-2  # best first
    assert (sweep / "metric_vs_params.png").stat().st_size > 0

    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    exp = client.get_experiment_by_name("distributed_bism")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1 and len(children) == 2
    assert all(c.data.tags["mlflow.parentRunId"] == parents[0].info.run_id for c in children)
    assert all(c.data.metrics.get("eval/test_loglik") is not None for c in children), [c.data.metrics for c in children]
    assert {a.path for a in client.list_artifacts(parents[0].info.run_id)} >= {
        "sweep_spec.yaml", "results.md", "best_config.yaml", "metric_vs_params.png"}
    assert all(r.info.status == "FINISHED" for r in runs), [r.info.status for r in runs]
    assert any(c.data.tags.get("stopped_early") == "true" for c in children)

    # the best config trains as it is (in one process: what is checked is the YAML, not Ray again)
    rc = run_bism(["train", str(sweep / "best_config.yaml"), "trainer.steps=5", "trainer.name=from-best", "trainer.strategy=local",
               f"trainer.output_dir={tmp_path / 'best'}", "tracking.enabled=false"], tmp_path / "best.log", 300)
    assert rc == 0, (tmp_path / "best.log").read_text()[-3000:]


@pytest.mark.slow
def test_killed_sweep_resumes_without_rerunning_finished_trials(tmp_path):
    """The sweep's driver is SIGKILLed (with its Ray) once its first trial has finished; the
    same command then completes the sweep, and the finished trial is not started again."""
    out = tmp_path / "out"
    args = ["tune", str(spec(tmp_path)), "--name", "rs", "--output-dir", str(out)]
    first = BismProcess(args, tmp_path / "first.log")
    state = out / "sweeps" / "rs" / "tune" / "rs"
    try:  # a trial is finished for the sweep once Tune's experiment state on disk says so
        deadline = time.monotonic() + 300
        while not any('\\"status\\": \\"TERMINATED\\"' in f.read_text() for f in state.glob("experiment_state-*.json")):
            assert first.proc.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "no trial finished"
            time.sleep(0.2)
    finally:
        first.stop()
    done = re.findall(r"Trial (trial_driver_\w+) completed after", (tmp_path / "first.log").read_text())
    assert done and not (out / "sweeps" / "rs" / "results.json").exists()

    assert run_bism(args, tmp_path / "second.log", timeout=600) == 0, (tmp_path / "second.log").read_text()[-4000:]
    second = (tmp_path / "second.log").read_text()
    assert "resuming sweep 'rs'" in second
    for trial in done:
        assert f"Trial {trial} started" not in second, f"{trial} was run again"
    rows = json.loads((out / "sweeps" / "rs" / "results.json").read_text())
    assert len(rows) == 2

    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("distributed_bism").experiment_id])
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(runs) - len(children) == 1, "the resumed sweep opened a second parent run"
    assert len(children) == 2, "a trial got a second child run"
    assert all(r.info.status == "FINISHED" for r in runs), [r.info.status for r in runs]


@pytest.mark.slow
def test_optuna_sweep_records_a_failed_trial_and_goes_on(tmp_path):
    """TPE through ray.tune.search.optuna, FIFO, 2 trials one at a time; lr_θ's choices reach
    1e30, where the GRBM's loss turns non-finite and max_bad_steps=0 stops the trial with an error.
    The failed trial is recorded as ERROR and its MLflow run FAILED; the other finishes. (With
    seed 0, TPE's first two draws are 1e30 and 3e-2: one of each.)"""
    path = spec(tmp_path)
    raw = yaml.safe_load(path.read_text())
    raw["search"] = {"optim.lr": {"choice": [3e-2, 1e30]}}
    raw.update({"searcher": {"name": "optuna", "seed": 0}, "scheduler": {"name": "fifo"}, "num_samples": 2})
    raw["overrides"] = {"trainer.max_bad_steps": 0}
    path.write_text(yaml.safe_dump(raw))
    out = tmp_path / "out"
    rc = run_bism(["tune", str(path), "--name", "opt", "--output-dir", str(out)], tmp_path / "opt.log", timeout=600)
    text = (tmp_path / "opt.log").read_text()
    assert rc == 0, text[-4000:]
    rows = json.loads((out / "sweeps" / "opt" / "results.json").read_text())
    assert sorted((r["optim.lr"], r["status"]) for r in rows) == [(3e-2, "done"), (1e30, "ERROR")], rows

    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("distributed_bism").experiment_id])
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    statuses = sorted(r.info.status for r in children)
    assert statuses == ["FAILED", "FINISHED"], statuses
