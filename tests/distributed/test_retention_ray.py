"""Nothing saved is lost (issue 15) under Ray Train (strategy ddp): Ray's retention no longer
disagrees with what is on disk, and a checkpoint that cannot be uploaded ends the run with one
CheckpointWriteError instead of group restarts and a WorkerGroupError.

One local 2-CPU Ray for the module (conftest.ray_cluster, started and shut down by this process);
tiny GRBM runs of a few steps, tracked in a sqlite store under tmp_path.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from ray import cloudpickle

from distributed_bism import train
from distributed_bism.launch import ray_backend
from distributed_bism.training.checkpointing import STATE_FILE, CheckpointWriteError, load_state
from tests.helpers import retention_workers
from tests.helpers.local_runs import checkpoint_dirs, run_dir, scratch_cwd, tiny  # noqa: F401 (scratch_cwd: autouse)

pytestmark = pytest.mark.usefixtures("ray_cluster")
cloudpickle.register_pickle_by_value(retention_workers)  # workers cannot import tests/


def ddp(out: Path, workers: int, **over: object):
    return tiny(out, **{"trainer.strategy": "ddp", "trainer.num_workers": workers, "trainer.cpus_per_worker": 1,
                        "trainer.max_failures": 2, "tracking.enabled": True,
                        "tracking.tracking_uri": f"sqlite:///{out / 'mlflow.db'}", **over})


def mlflow_run(cfg):
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=cfg.tracking.tracking_uri)
    (run,) = client.search_runs([client.get_experiment_by_name(cfg.tracking.experiment).experiment_id])
    return run


def test_truncated_newest_then_more_steps_keeps_every_valid_checkpoint(tmp_path: Path) -> None:
    """The finding: 6 steps (checkpoints 4 and 6 kept), checkpoint 6 truncated, relaunched to 10
    with a checkpoint every step. Ray's old bookkeeping deleted the valid 4, then the rewritten 6
    (same name as the renamed one it still listed), then crashed deleting a path that was gone.
    Now the relaunch finishes, the newest two are readable, the truncated one is kept aside, the
    MLflow run is FINISHED with an existing checkpoint_path, and a third launch starts cleanly."""
    cfg = ddp(tmp_path, 1, **{"trainer.steps": 6, "trainer.checkpoint_every": 2})
    train(cfg)
    assert [d.name for d in checkpoint_dirs(cfg)] == ["checkpoint_00000004", "checkpoint_00000006"]
    state = run_dir(cfg) / "checkpoint_00000006" / STATE_FILE
    state.write_bytes(state.read_bytes()[:200])

    summary = train(ddp(tmp_path, 1, **{"trainer.steps": 10, "trainer.checkpoint_every": 1}))
    assert summary.step == 10 and load_state(summary.checkpoint)["step"] == 10
    names = [d.name for d in checkpoint_dirs(cfg)]
    assert names == ["checkpoint_00000006.unreadable", "checkpoint_00000009", "checkpoint_00000010"], names
    run = mlflow_run(cfg)
    assert run.info.status == "FINISHED" and Path(run.data.tags["checkpoint_path"]).is_dir()

    third = train(ddp(tmp_path, 1, **{"trainer.steps": 12, "trainer.checkpoint_every": 1}))
    assert third.step == 12 and mlflow_run(cfg).info.status == "FINISHED"
    assert [d.name for d in checkpoint_dirs(cfg)][1:] == ["checkpoint_00000011", "checkpoint_00000012"]


def test_upload_that_fails_stops_every_worker_with_one_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """2 workers; Ray's upload of checkpoint 8 fails with ENOSPC. The run stops at once (no group
    restart) with a CheckpointWriteError naming the directory and the OS error, the MLflow run is
    FAILED, checkpoint 4 is intact and no empty checkpoint_00000008 is left; the rerun resumes
    from 4 and finishes."""
    cfg = ddp(tmp_path, 2, **{"trainer.steps": 12})
    real = ray_backend.worker_main
    monkeypatch.setattr(ray_backend, "worker_main", retention_workers.upload_fails_at_8)
    with pytest.raises(CheckpointWriteError) as err:
        train(cfg)
    message = str(err.value)
    assert "\n" not in message and str(run_dir(cfg) / "checkpoint_00000008") in message, message
    assert "[Errno 28]" in message and "No space left on device" in message, message
    assert mlflow_run(cfg).info.status == "FAILED"
    assert [d.name for d in checkpoint_dirs(cfg)] == ["checkpoint_00000004"]
    assert load_state(run_dir(cfg) / "checkpoint_00000004")["step"] == 4

    monkeypatch.setattr(ray_backend, "worker_main", real)
    summary = train(cfg)
    assert summary.step == 12 and mlflow_run(cfg).info.status == "FINISHED"
    assert [d.name for d in checkpoint_dirs(cfg)] == ["checkpoint_00000008", "checkpoint_00000012"]
