"""A Ray worker resumes from Ray's own list of the run's checkpoints (`RaySink`), so that storage
with no directory to scan (s3://, gs://) resumes too: here the storage is a pyarrow filesystem
rooted elsewhere (a stand-in for an object store, whose paths are not local paths), Ray's list
is faked with committed and uncommitted entries, and no Ray cluster runs. The fallback rules
hold: the newest readable checkpoint wins, an unreadable one is passed over (left in the
storage, since there is nothing local to rename), and with local storage the directory scan
still adds what Ray has not registered yet."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest

from distributed_bism import train
from distributed_bism.launch.ray_backend import RaySink
from distributed_bism.training.checkpointing import STATE_FILE
from distributed_bism.training.loop import TrainLoop
from tests.helpers.local_runs import checkpoint_dirs, run_dir, scratch_cwd, tiny  # noqa: F401 (scratch_cwd: autouse)


@pytest.fixture
def bucket(tmp_path: Path) -> Path:
    """A finished 12-step local run (checkpoints at 4, 8, 12, all kept) copied into
    tmp_path/bucket/tiny/, the way Ray lays out URI storage; the local run directory is deleted."""
    cfg = tiny(tmp_path / "out", **{"trainer.steps": 12, "trainer.num_to_keep": 3})
    train(cfg)
    assert [d.name for d in checkpoint_dirs(cfg)] == [f"checkpoint_{s:08d}" for s in (4, 8, 12)]
    shutil.copytree(run_dir(cfg), tmp_path / "bucket" / "tiny")
    shutil.rmtree(run_dir(cfg))
    return tmp_path / "bucket"


def fake_ray_list(monkeypatch: pytest.MonkeyPatch, entries: list[tuple[Any, str]], latest: Any = None) -> list[dict]:
    """ray.train.get_all_reported_checkpoints → `entries` (checkpoint, status name), and
    get_checkpoint → `latest`; returns the calls' keyword arguments."""
    import ray.train
    from ray.train.v2.api.reported_checkpoint import ReportedCheckpoint, ReportedCheckpointStatus

    calls: list[dict] = []

    def listed(**kwargs: Any) -> list[Any]:
        calls.append(kwargs)
        return [ReportedCheckpoint(c, {}, ReportedCheckpointStatus[s]) for c, s in entries]

    monkeypatch.setattr(ray.train, "get_all_reported_checkpoints", listed)
    monkeypatch.setattr(ray.train, "get_checkpoint", lambda: latest)
    return calls


def remote(bucket: Path, step: int) -> Any:
    """Ray's Checkpoint of step `step` in the bucket: a path only the bucket's filesystem knows."""
    import pyarrow.fs
    from ray.train import Checkpoint

    fs = pyarrow.fs.SubTreeFileSystem(str(bucket), pyarrow.fs.LocalFileSystem())
    return Checkpoint(f"tiny/checkpoint_{step:08d}", filesystem=fs)


def test_uri_storage_resumes_from_rays_committed_list(bucket: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """No run directory (URI storage): the loop resumes from Ray's list alone, asked for committed
    checkpoints. Step 12 is truncated and passed over, left as it is in the bucket; step 8 loads,
    from a downloaded copy. An entry whose upload is not committed yet is never a candidate."""
    from distributed_bism.training.checkpointing import load_state

    whole = (bucket / "tiny" / "checkpoint_00000012" / STATE_FILE).read_bytes()
    (bucket / "tiny" / "checkpoint_00000012" / STATE_FILE).write_bytes(whole[:200])
    calls = fake_ray_list(monkeypatch, [(remote(bucket, 4), "COMMITTED"), (remote(bucket, 8), "COMMITTED"),
                                        (remote(bucket, 12), "COMMITTED")])
    loop = TrainLoop.from_config(tiny(tmp_path / "again", **{"trainer.steps": 16}), sink=RaySink(None, None))
    assert loop.resume()
    assert loop.step == 8 and calls and calls[0]["consistency_mode"].name == "COMMITTED"
    expected = load_state(bucket / "tiny" / "checkpoint_00000008")
    assert all((a == b).all() for a, b in zip(loop.replica.energy.state_dict().values(), expected["energy"].values()))
    assert sorted(p.name for p in (bucket / "tiny").iterdir() if p.name.startswith("checkpoint_")) == [
        "checkpoint_00000004", "checkpoint_00000008", "checkpoint_00000012"]  # nothing renamed in the storage

    fake_ray_list(monkeypatch, [(remote(bucket, 4), "COMMITTED"), (remote(bucket, 8), "PENDING_VALIDATION")])
    sink = RaySink(None, None)
    assert [p.name for p in sink.candidates()] == ["checkpoint_00000004"]


def test_local_storage_joins_rays_list_and_the_directory(bucket: Path, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Local storage: a checkpoint Ray has not registered yet (on disk only) and one Ray lists are
    both candidates, newest first; an entry of Ray's whose directory is gone is passed over; an
    unreadable local one is renamed *.unreadable by set_aside."""
    from ray.train import Checkpoint

    local = tmp_path / "runs" / "tiny"
    shutil.copytree(bucket / "tiny", local)
    shutil.rmtree(local / "checkpoint_00000004")
    gone = Checkpoint.from_directory(str(tmp_path / "runs" / "tiny"))  # replaced below by a vanished path
    gone.path = str(local / "checkpoint_00000004")
    fake_ray_list(monkeypatch, [(gone, "COMMITTED"), (Checkpoint.from_directory(str(local / "checkpoint_00000008")),
                                                      "COMMITTED")])
    sink = RaySink(local, None)
    assert [p.name for p in sink.candidates()] == ["checkpoint_00000012", "checkpoint_00000008"]
    assert sink.set_aside(local / "checkpoint_00000012").startswith("kept as ")
    assert (local / "checkpoint_00000012.unreadable").is_dir()


def test_another_rank_fetches_its_own_copy(bucket: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`local`: rank 0's choice where it is not readable here (rank 0's download on another node)
    is this rank's own copy of Ray's checkpoint of the same name."""
    fake_ray_list(monkeypatch, [(remote(bucket, 8), "COMMITTED")])
    sink = RaySink(None, None)  # holds the copy: it is removed with the sink
    copy = sink.local(Path("/nonexistent/rank0/tmp/checkpoint_00000008"))
    assert copy.name == "checkpoint_00000008" and (copy / STATE_FILE).read_bytes() == (
        bucket / "tiny" / "checkpoint_00000008" / STATE_FILE).read_bytes()
