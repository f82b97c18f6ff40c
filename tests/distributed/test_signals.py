"""SIGTERM and Ctrl-C (SIGINT) of the `bism train` driver: the MLflow run is closed as KILLED
with tag bism.ended_by naming the signal, the workers stop, one line says how to resume, the
exit status is 128 + the signal number, and the same command then resumes the run from its
latest checkpoint and ends it FINISHED.

Where the signal lands is made certain, not timed: a sitecustomize.py on the subprocess's
PYTHONPATH (active only with $BISM_TEST_BLOCK_AT) makes `RunLogger.metrics` stop for good once
it has logged step BISM_TEST_BLOCK_AT, after writing the file $BISM_TEST_MARKER. The test signals
the driver once that file exists. With steps 16 and checkpoints every 4, the run is then at step
12 with checkpoint_00000008 its latest (metrics are logged before a step's checkpoint)."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import time
from pathlib import Path

import psutil
import pytest

from distributed_bism.tracking import ENDED_BY_TAG, RUN_TAG
from tests.helpers.local_runs import checkpoint_dirs, scratch_cwd, tiny  # noqa: F401 (scratch_cwd: an autouse fixture)
from tests.helpers.step_hooks import Driver
from tests.helpers.step_hooks import hook_env as _env


def _run(uri: str, name: str):  # an mlflow Run
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("bism-tests")
    runs = client.search_runs([exp.experiment_id], filter_string=f"tags.`{RUN_TAG}` = '{name}'")
    assert len(runs) == 1, runs
    return runs[0]


def _interrupt_then_resume(tmp_path: Path, sig: signal.Signals, env: dict[str, str],
                           **overrides: object) -> tuple[str, list[tuple[psutil.Process, str]]]:
    """Run the tiny tracked config (16 steps, checkpoints every 4) until it blocks at step 12,
    send `sig` to the driver, check what it left, then run the same command again and check
    that it resumed from step 8 to FINISHED. Returns the first driver's output and the
    processes it had started, with their command lines (seen just before the signal)."""
    out = tmp_path / "out"
    cfg = tiny(out, **{"tracking.enabled": True, "trainer.steps": 16, "trainer.checkpoint_every": 4,
                       "trainer.log_every": 4, **overrides})
    config = tmp_path / "tiny.yaml"
    config.write_text(cfg.to_yaml())
    uri = f"sqlite:///{out.resolve() / 'mlflow.db'}"
    command = ["train", str(config)]

    driver = Driver(command, tmp_path / "first.log", _env(tmp_path, block_at=12, extra=env))
    try:
        driver.wait_for(tmp_path / "blocked", timeout=600)
        started = [(p, " ".join(_cmdline(p))) for p in psutil.Process(driver.proc.pid).children(recursive=True)]
        if sig == signal.SIGINT:  # Ctrl-C in a terminal: to the whole process group (the driver leads its own)
            os.killpg(driver.proc.pid, sig)
        else:  # kill, a scheduler: to the driver alone
            driver.proc.send_signal(sig)
        status = driver.proc.wait(timeout=300)
    finally:
        driver.stop()
    text = driver.output()
    assert status == 128 + sig, f"exit status {status}:\n{text}"
    # The driver's own lines (not those Ray forwards from its processes, "(Name pid=N) ...": Ray's
    # helpers complain when other Ray clusters run on the machine).
    own = [line for line in text.splitlines() if not re.match(r"^(\x1b\[\d+m)?\(\w+ pid=\d+", line)]
    assert not [line for line in own if "Traceback" in line], text
    [hint] = [line for line in text.splitlines() if line.startswith(f"bism: stopped by {sig.name}")]
    assert "closed as KILLED" in hint and "run the same command again" in hint, hint
    assert "checkpoint_00000008 (step 8)" in hint, hint
    run = _run(uri, "tiny")
    assert run.info.status == "KILLED" and run.info.end_time is not None
    assert run.data.tags[ENDED_BY_TAG] == sig.name
    assert [p.name for p in checkpoint_dirs(cfg)] == ["checkpoint_00000004", "checkpoint_00000008"]

    again = Driver(command, tmp_path / "second.log", _env(tmp_path, block_at=None, extra=env))
    try:
        status = again.proc.wait(timeout=600)
    finally:
        again.stop()
    second = again.output()
    assert status == 0, second
    assert "continuing from its latest checkpoint" in second and "steps 8 → 16" in second, second
    resumed = _run(uri, "tiny")
    assert resumed.info.run_id == run.info.run_id
    assert resumed.info.status == "FINISHED" and ENDED_BY_TAG not in resumed.data.tags
    assert checkpoint_dirs(cfg)[-1].name == "checkpoint_00000016"
    return text, started


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_closes_the_run_as_killed_and_the_same_command_resumes(tmp_path: Path, sig: signal.Signals) -> None:
    """strategy=local, stopped at step 12: exit 128 + signum, run KILLED with bism.ended_by, a
    resume hint naming checkpoint 8, no half checkpoint; the same command continues from step 8
    to 16, in the same MLflow run, which ends FINISHED without the tag."""
    _interrupt_then_resume(tmp_path, sig, {})


def _gone(p: psutil.Process) -> bool:
    try:
        return p.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_of_a_ddp_driver_stops_the_ray_workers_it_started(tmp_path: Path, sig: signal.Signals) -> None:
    """strategy=ddp, 2 workers on a Ray cluster the driver started (address local, its own
    RAY_TMPDIR): the same as for local, and every process the driver had started (the two
    RayTrainWorkers, Ray's own) is gone, by PID, once it has exited (within a bounded wait:
    Ray's processes exit as the cluster shuts down)."""
    import shutil
    import tempfile

    ray_tmp = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # short: Ray's socket paths have a length limit
    try:
        text, started = _interrupt_then_resume(tmp_path, sig, {"RAY_TMPDIR": ray_tmp, "RAY_ADDRESS": "local"},
                                               **{"trainer.strategy": "ddp", "trainer.num_workers": 2,
                                                  "trainer.address": "local"})
        workers = [p for p, cmd in started if "RayTrainWorker" in cmd]
        assert len(workers) == 2, [cmd for _, cmd in started]
        deadline = time.monotonic() + 60
        while not all(_gone(p) for p, _ in started) and time.monotonic() < deadline:
            time.sleep(0.5)
        left = [(p.pid, cmd) for p, cmd in started if not _gone(p)]
        assert not left, f"left running after the driver exited: {left}"
    finally:
        for p, _ in started if "started" in locals() else []:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
        shutil.rmtree(ray_tmp, ignore_errors=True)


def _cmdline(p: psutil.Process) -> list[str]:
    try:
        return p.cmdline()
    except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
        return []


def test_a_signal_waits_for_what_must_not_be_cut() -> None:
    """Inside deferred() (a checkpoint being kept, the run being opened) a SIGTERM waits until the
    block is done, then stops the driver; a second signal while stopping is only acknowledged;
    outside stop_on_signals the previous handlers are back."""
    from distributed_bism.launch.signals import Interrupted, deferred, stop_on_signals

    before = signal.getsignal(signal.SIGTERM)
    done = []
    with pytest.raises(Interrupted) as stopped, stop_on_signals(), deferred():
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.2)  # the handler runs in here, and must not raise
        done.append("checkpoint kept")
    assert done == ["checkpoint kept"] and stopped.value.code == 143 and stopped.value.name == "SIGTERM"
    with pytest.raises(Interrupted), stop_on_signals():
        try:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.2)
        finally:  # cleaning up: a second signal does not cut it
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.2)
            done.append("run closed")
    assert done[-1] == "run closed" and signal.getsignal(signal.SIGTERM) is before


def test_a_signal_while_closing_a_failed_run_hides_nothing() -> None:
    """After an error the driver is unwinding: a signal then neither cuts the closing of the run
    nor replaces the error with an exit status."""
    from distributed_bism.launch.signals import stop_on_signals, unwinding

    closed = []
    with pytest.raises(ZeroDivisionError), stop_on_signals():
        try:
            1 / 0  # noqa: B018 (the training's error)
        except BaseException:
            unwinding()
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.2)
            closed.append("FAILED")
            raise
    assert closed == ["FAILED"]
