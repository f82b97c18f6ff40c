"""MLflow tracking of the training driver (strategy `local`): run status, params, metrics by
step, artifacts, relaunch into the same run, a failed run, and $MLFLOW_TRACKING_URI."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from distributed_bism import train
from distributed_bism.api import TrainSummary
from distributed_bism.config import Config
from distributed_bism.training.checkpointing import load_state
from tests.helpers.local_runs import checkpoint_dirs, scratch_cwd, tiny  # noqa: F401 (scratch_cwd: an autouse fixture)


# --------------------------------------------------------------------------- MLflow
@dataclass
class TrackedRun:
    cfg: Config
    uri: str
    first: TrainSummary
    second: TrainSummary
    status_after_first: str
    cwd: Path


@pytest.fixture(scope="module")
def tracked(tmp_path_factory: pytest.TempPathFactory) -> TrackedRun:
    """One tracked run: 8 steps, then relaunched to 12, from a scratch working directory (to see
    that nothing lands in ./mlruns), with $MLFLOW_TRACKING_URI unset."""
    from mlflow import MlflowClient

    root = tmp_path_factory.mktemp("tracked")
    cwd = root / "cwd"
    cwd.mkdir()
    over = {"tracking.enabled": True, "objective.unroll_steps": 1, "eval.every": 4,
            "eval.metrics": ["test_loglik", "samples"]}
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        mp.chdir(cwd)
        cfg = tiny(root / "out", **{**over, "trainer.steps": 8})
        first = train(cfg)
        status = MlflowClient(str(first.tracking_uri)).get_run(str(first.run_id)).info.status
        second = train(tiny(root / "out", **{**over, "trainer.steps": 12}))
    return TrackedRun(cfg, str(first.tracking_uri), first, second, status, cwd)


def test_mlflow_run_status_and_relaunch(tracked: TrackedRun) -> None:
    """The run ends FINISHED; a relaunch with the same name continues the same run id (one run for
    the name) and ends FINISHED again, tagged with its last checkpoint, whose state names the run."""
    from mlflow import MlflowClient

    from distributed_bism.tracking import RUN_TAG

    assert tracked.uri == f"sqlite:///{Path(tracked.cfg.trainer.output_dir).resolve() / 'mlflow.db'}"
    client = MlflowClient(tracked.uri)
    assert tracked.status_after_first == "FINISHED"
    assert tracked.second.run_id == tracked.first.run_id
    run = client.get_run(str(tracked.first.run_id))
    assert run.info.status == "FINISHED" and run.info.end_time is not None
    runs = client.search_runs([run.info.experiment_id], filter_string=f"tags.`{RUN_TAG}` = 'tiny'")
    assert [r.info.run_id for r in runs] == [tracked.first.run_id]
    ckpt = Path(run.data.tags["checkpoint_path"])
    assert ckpt == checkpoint_dirs(tracked.cfg)[-1] and ckpt.name == "checkpoint_00000012"
    assert load_state(ckpt)["mlflow_run_id"] == tracked.first.run_id


def test_mlflow_params(tracked: TrackedRun) -> None:
    """The flattened config is logged as params, e.g. objective.unroll_steps=1."""
    from mlflow import MlflowClient

    params = MlflowClient(tracked.uri).get_run(str(tracked.first.run_id)).data.params
    assert params["objective.unroll_steps"] == "1"
    assert params["trainer.batch_size"] == "32" and params["model.name"] == "grbm"
    assert set(tracked.cfg.flat()) <= set(params)


def test_mlflow_metrics_by_step(tracked: TrackedRun) -> None:
    """Training and perf metrics at every log step (4, 8 and, after the relaunch, 12); the test
    log-likelihood at every evaluation (0, 4, 8, 12), each step once (the relaunch repeats none)."""
    from mlflow import MlflowClient

    client = MlflowClient(tracked.uri)
    run_id = str(tracked.first.run_id)
    logged = {"train/loss", "train/inner_loss", "train/grad_norm_theta", "train/grad_norm_phi", "train/lr",
              "train/posterior_lr", "train/perf/samples_per_s", "train/perf/s_per_step"}
    for key in logged:
        history = client.get_metric_history(run_id, key)
        assert sorted(m.step for m in history) == [4, 8, 12], (key, [(m.step, m.value) for m in history])
        assert all(math.isfinite(m.value) for m in history), key
    assert all(m.value == 1e-2 for m in client.get_metric_history(run_id, "train/lr"))
    assert all(m.value > 0 for m in client.get_metric_history(run_id, "train/perf/samples_per_s"))
    loglik = client.get_metric_history(run_id, "eval/test_loglik")
    assert sorted(m.step for m in loglik) == [0, 4, 8, 12]
    assert all(math.isfinite(m.value) and m.value < 0 for m in loglik)


def test_mlflow_artifacts_under_output_dir(tracked: TrackedRun) -> None:
    """config.yaml and a sample figure per evaluation are artifacts of the run, and the final model
    is the run's LoggedModel (test_mlflow_models.py), not a run artifact; the experiment's artifact
    location is under trainer.output_dir, and no ./mlruns appears."""
    from mlflow import MlflowClient

    client = MlflowClient(tracked.uri)
    run_id = str(tracked.first.run_id)
    top = {a.path for a in client.list_artifacts(run_id)}
    assert {"config.yaml", "samples"} <= top and "model" not in top, top
    samples = sorted(a.path for a in client.list_artifacts(run_id, "samples"))
    assert samples == [f"samples/step_{s:08d}.png" for s in (0, 4, 8, 12)]
    # one final model per launch that trained (steps 8 and 12), each under the output_dir too
    models = [client.get_logged_model(o.model_id) for o in client.get_run(run_id).outputs.model_outputs]
    assert sorted(int(m.tags["bism.step"]) for m in models) == [8, 12]

    out = Path(tracked.cfg.trainer.output_dir).resolve()
    location = client.get_experiment(client.get_run(run_id).info.experiment_id).artifact_location
    assert location.startswith(out.as_uri() + "/"), location
    assert all(m.artifact_location.startswith(out.as_uri() + "/") for m in models)
    logged_config = next(out.rglob("artifacts/config.yaml"))
    assert yaml.safe_load(logged_config.read_text())["objective"]["unroll_steps"] == 1
    assert not (tracked.cwd / "mlruns").exists()


def test_failed_run_ends_failed(tmp_path: Path) -> None:
    """A run whose training raises (lr=1e30 diverges at step 2, max_bad_steps=0) ends FAILED,
    never RUNNING, and the error reaches the caller."""
    from mlflow import MlflowClient

    cfg = tiny(tmp_path, **{"tracking.enabled": True, "optim.lr": 1e30, "trainer.max_bad_steps": 0,
                            "trainer.name": "diverges"})
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        with pytest.raises(FloatingPointError, match="max_bad_steps=0"):
            train(cfg)
    assert not Path("mlruns").exists()
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (exp,) = [e for e in client.search_experiments() if e.name == "bism-tests"]
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.status == "FAILED" and run.info.end_time is not None
    assert "checkpoint_path" not in run.data.tags


def test_mlflow_tracking_uri_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With tracking.tracking_uri unset, $MLFLOW_TRACKING_URI names the store used."""
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'elsewhere' / 'store.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    out = tmp_path / "out"
    summary = train(tiny(out, **{"tracking.enabled": True, "trainer.steps": 2, "trainer.name": "env"}))
    assert summary.tracking_uri == uri
    run = MlflowClient(uri).get_run(str(summary.run_id))
    assert run.info.status == "FINISHED" and run.data.tags["bism.run"] == "env"
    assert not (out / "mlflow.db").exists() and not Path("mlruns").exists()
    assert os.path.getsize(tmp_path / "elsewhere" / "store.db") > 0
