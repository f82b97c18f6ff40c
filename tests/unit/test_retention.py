"""Nothing saved is lost (issue 15), strategy `local`: retention never removes a valid checkpoint
on the strength of a newer one that is unreadable or missing; a run complete at a truncated
checkpoint resumes from the newest readable one and `bism eval`/`sample` of its directory use
that one; a relaunch logs no step twice to MLflow; a checkpoint that cannot be written ends the
run with one `bism: error:` line, the MLflow run FAILED and every saved checkpoint intact.

Tiny GRBM runs (local_runs.tiny), every file under tmp_path.
"""

from __future__ import annotations

import errno
import shutil
from pathlib import Path

import pytest
import yaml

from distributed_bism import train
from distributed_bism.cli import main
from distributed_bism.commands.trained import load_trained, resolve_checkpoint
from distributed_bism.training import checkpointing
from distributed_bism.training.checkpointing import STATE_FILE, CheckpointWriteError, LocalSink, load_state, save_state
from tests.helpers.local_runs import checkpoint_dirs, run_dir, scratch_cwd, tiny  # noqa: F401 (scratch_cwd: autouse)


def truncate(directory: Path) -> bytes:
    """Cut directory/state.pt to 200 bytes, as a crash mid-write would; returns what is left."""
    f = directory / STATE_FILE
    f.write_bytes(f.read_bytes()[:200])
    return f.read_bytes()


def tracked(out: Path, **over: object):
    return tiny(out, **{"tracking.enabled": True, "tracking.tracking_uri": f"sqlite:///{out / 'mlflow.db'}", **over})


def mlflow_run(cfg):
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=cfg.tracking.tracking_uri)
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    (run,) = client.search_runs([exp.experiment_id])
    return client, run


# --------------------------------------------------------------------------- finding 1: one retention rule
def test_sink_never_prunes_a_valid_checkpoint_for_a_newer_unreadable_one(tmp_path: Path) -> None:
    """A run directory with valid 2 and 4 and a truncated 8 (not moved aside): writing 5 removes
    nothing (only one checkpoint of num_to_keep=2 written since), writing 6 removes those older
    than 5; the truncated 8 is never counted and never removed."""
    root = tmp_path / "run"
    for step in (2, 4, 8):
        save_state(root / f"checkpoint_{step:08d}", {"step": step, "energy": {}, "posterior": None, "ema": {}})
    bad = truncate(root / "checkpoint_00000008")
    sink = LocalSink(root, num_to_keep=2)
    src = tmp_path / "src"
    for step in (5, 6):
        save_state(src, {"step": step, "energy": {}, "posterior": None, "ema": {}})
        sink.report({}, src, step)
        names = sorted(p.name for p in root.iterdir())
        if step == 5:
            assert names == ["checkpoint_00000002", "checkpoint_00000004", "checkpoint_00000005",
                             "checkpoint_00000008"], names
    assert names == ["checkpoint_00000005", "checkpoint_00000006", "checkpoint_00000008"], names
    assert (root / "checkpoint_00000008" / STATE_FILE).read_bytes() == bad
    assert load_state(root / "checkpoint_00000006")["step"] == 6


def test_the_checkpoint_resumed_from_counts_as_kept(tmp_path: Path) -> None:
    """After a resume from 4 (it loaded, newer ones were moved aside), writing 5 makes num_to_keep=2
    good ones, so 2 goes; a checkpoint of another directory does not count."""
    root = tmp_path / "run"
    for step in (2, 4):
        save_state(root / f"checkpoint_{step:08d}", {"step": step, "energy": {}, "posterior": None, "ema": {}})
    sink = LocalSink(root, num_to_keep=2)
    sink.resumed(tmp_path / "elsewhere" / "checkpoint_00000004")  # not this run's: ignored
    sink.resumed(root / "checkpoint_00000004")
    save_state(tmp_path / "src", {"step": 5, "energy": {}, "posterior": None, "ema": {}})
    sink.report({}, tmp_path / "src", 5)
    assert sorted(p.name for p in root.iterdir()) == ["checkpoint_00000004", "checkpoint_00000005"]


def test_relaunch_after_truncation_keeps_every_valid_checkpoint(tmp_path: Path) -> None:
    """The finding's sequence on the local strategy: 6 steps (checkpoints 4 and 6 kept), the
    newest truncated, a relaunch to 10 with a checkpoint every step. It ends FINISHED, the
    truncated one is kept as *.unreadable, the newest 2 on disk are readable and the one the
    summary names exists."""
    cfg = tracked(tmp_path, **{"trainer.steps": 6, "trainer.checkpoint_every": 2})
    train(cfg)
    cut = truncate(checkpoint_dirs(cfg)[-1])
    summary = train(tracked(tmp_path, **{"trainer.steps": 10, "trainer.checkpoint_every": 1}))
    assert summary.step == 10 and Path(summary.checkpoint).is_dir()
    names = [d.name for d in checkpoint_dirs(cfg)]
    assert names == ["checkpoint_00000006.unreadable", "checkpoint_00000009", "checkpoint_00000010"], names
    assert (run_dir(cfg) / "checkpoint_00000006.unreadable" / STATE_FILE).read_bytes() == cut
    assert [load_state(run_dir(cfg) / n)["step"] for n in names[1:]] == [9, 10]
    _, run = mlflow_run(cfg)
    assert run.info.status == "FINISHED" and run.data.tags["checkpoint_path"] == summary.checkpoint


# --------------------------------------------------------------------------- finding 2: complete at a truncated checkpoint
def test_complete_run_with_truncated_final_checkpoint_retrains_it(tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """A run whose final checkpoint (8) is truncated is not "already complete": the relaunch
    keeps the bad one aside, resumes from 4 and writes 8 again. Before it, `bism eval` and
    `bism sample` of the run directory use checkpoint 4, naming the skipped one on stderr."""
    cfg = tiny(tmp_path, **{"trainer.steps": 8})
    train(cfg)
    cut = truncate(run_dir(cfg) / "checkpoint_00000008")
    capsys.readouterr()

    assert resolve_checkpoint(run_dir(cfg)) == run_dir(cfg) / "checkpoint_00000004"
    assert "checkpoint_00000008" in capsys.readouterr().err
    assert load_trained(run_dir(cfg)).step == 4
    grid = tmp_path / "grid.png"
    assert main(["sample", str(run_dir(cfg)), "-n", "4", "-o", str(grid)]) == 0
    assert grid.is_file()

    summary = train(cfg)
    log = capsys.readouterr().out
    assert "already complete" not in log and "at step 4" in log, log
    assert summary.step == 8 and load_state(run_dir(cfg) / "checkpoint_00000008")["step"] == 8
    assert (run_dir(cfg) / "checkpoint_00000008.unreadable" / STATE_FILE).read_bytes() == cut
    train(cfg)
    assert "already complete at step 8" in capsys.readouterr().out


def test_no_readable_checkpoint_in_a_run_directory_is_one_line(tmp_path: Path) -> None:
    cfg = tiny(tmp_path, **{"trainer.steps": 4, "trainer.num_to_keep": 1})
    train(cfg)
    truncate(run_dir(cfg) / "checkpoint_00000004")
    with pytest.raises(checkpointing.CheckpointError, match="no readable checkpoint.*checkpoint_00000004") as e:
        resolve_checkpoint(run_dir(cfg))
    assert "\n" not in str(e.value)


# --------------------------------------------------------------------------- finding 3: no step logged twice
def test_crash_and_rerun_logs_each_step_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Logging every step, a checkpoint every 4, a crash in step 11: steps 9 and 10 were logged
    after the last checkpoint. The rerun resumes from 8 and logs 11 and 12 only, so every
    metric has one point per step, and those of 9 and 10 are the crashed launch's values."""
    from distributed_bism.training.loop import TrainLoop

    over = {"trainer.steps": 12, "trainer.log_every": 1, "trainer.checkpoint_every": 4, "eval.every": 4}
    cfg = tracked(tmp_path, **over)
    real = TrainLoop.run_step

    def crash_at_11(self, v):
        if self.step == 10:
            raise RuntimeError("simulated crash in step 11")
        return real(self, v)

    monkeypatch.setattr(TrainLoop, "run_step", crash_at_11)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(cfg)
    client, run = mlflow_run(cfg)
    before = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "train/loss")}
    assert sorted(before) == list(range(1, 11))
    monkeypatch.setattr(TrainLoop, "run_step", real)

    train(cfg)
    client, run = mlflow_run(cfg)
    for key in ("train/loss", "train/lr", "eval/test_loglik"):
        steps = [m.step for m in client.get_metric_history(run.info.run_id, key)]
        assert len(steps) == len(set(steps)), f"{key}: a step logged twice: {sorted(steps)}"
    history = client.get_metric_history(run.info.run_id, "train/loss")
    assert sorted(m.step for m in history) == list(range(1, 13))
    assert {m.step: m.value for m in history if m.step <= 10} == before
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "eval/test_loglik")) == [0, 4, 8, 12]
    assert run.info.status == "FINISHED"


# --------------------------------------------------------------------------- finding 4: a write that fails
def _fail_writes_from(monkeypatch: pytest.MonkeyPatch, step: int, error: OSError, where: str) -> dict[str, bool]:
    """Make checkpoint writes at `step` or later raise `error` (a full disk) while the returned
    flag's "on" is true: writing state.pt ("save") or copying it into the run directory ("copy")."""
    flag = {"on": True}
    real_save, real_copy = checkpointing.save_state, shutil.copytree

    def save(directory, state):
        if flag["on"] and state["step"] >= step:
            raise error
        return real_save(directory, state)

    def copytree(src, dst, *a, **k):
        if flag["on"] and f"checkpoint_{step:08d}" in str(dst):
            raise OSError(error.errno, error.strerror, str(dst))
        return real_copy(src, dst, *a, **k)

    if where == "save":
        monkeypatch.setattr("distributed_bism.training.loop.save_state", save)
    else:
        monkeypatch.setattr(checkpointing.shutil, "copytree", copytree)
    return flag


@pytest.mark.parametrize("where", ["save", "copy"])
def test_full_disk_ends_the_run_with_one_line_and_loses_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                capsys: pytest.CaptureFixture[str], where: str) -> None:
    """No space left at step 8's checkpoint (writing state.pt, or copying it into the run
    directory): `bism train` prints one `bism: error:` line naming the directory and the OS
    error, no traceback, the MLflow run is FAILED, checkpoint 4 is as it was and no partial
    directory is left; once space is back the rerun resumes from 4 and finishes."""
    cfg = tracked(tmp_path, **{"trainer.steps": 12})
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(cfg.to_dict()))
    full = _fail_writes_from(monkeypatch, 8, OSError(errno.ENOSPC, "No space left on device"), where)
    capsys.readouterr()
    assert main(["train", str(config)]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip() and " INFO mlflow." not in line]  # MLflow's own notes
    assert len(lines) == 1 and lines[0].startswith("bism: error: cannot write the checkpoint of step 8"), err
    assert "No space left on device" in lines[0] and "[Errno 28]" in lines[0]
    if where == "copy":
        assert str(run_dir(cfg) / "checkpoint_00000008") in lines[0]
    assert "Traceback" not in err
    assert [d.name for d in checkpoint_dirs(cfg)] == ["checkpoint_00000004"]  # no partial directory
    assert load_state(run_dir(cfg) / "checkpoint_00000004")["step"] == 4
    _, run = mlflow_run(cfg)
    assert run.info.status == "FAILED"

    full["on"] = False
    assert main(["train", str(config)]) == 0
    assert f"resumed from {run_dir(cfg) / 'checkpoint_00000004'}" in capsys.readouterr().out
    assert [d.name for d in checkpoint_dirs(cfg)] == ["checkpoint_00000008", "checkpoint_00000012"]
    _, run = mlflow_run(cfg)
    assert run.info.status == "FINISHED"


def test_write_error_names_directory_and_errno() -> None:
    e = checkpointing.write_error(8, "/runs/x/checkpoint_00000008", PermissionError(errno.EACCES, "Permission denied"))
    assert isinstance(e, CheckpointWriteError)
    assert str(e) == "cannot write the checkpoint of step 8 to /runs/x/checkpoint_00000008: [Errno 13] Permission denied"


def test_unwritable_run_directory_at_a_ray_launch_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Before Ray starts, the driver removes Ray's stale checkpoint list from the run directory; a
    directory made read-only since preflight is a CheckpointWriteError naming it, not a traceback."""
    from distributed_bism.launch.ray_backend import RAY_SNAPSHOT, forget_ray_checkpoints

    (tmp_path / RAY_SNAPSHOT).write_text("{}")

    def refuse(self: Path, missing_ok: bool = False) -> None:
        raise PermissionError(errno.EPERM, "Operation not permitted", str(self))

    monkeypatch.setattr(Path, "unlink", refuse)
    with pytest.raises(CheckpointWriteError, match=f"run directory {tmp_path}: Operation not permitted"):
        forget_ray_checkpoints(tmp_path)
