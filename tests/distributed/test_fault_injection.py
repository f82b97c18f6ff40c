"""Fault injection (issue 15, "nothing saved is ever lost"): a 2-worker ddp run of the tiny
checkerboard GRBM (12 steps, a checkpoint every 4, train/loss logged every step) meets one fault;
the same command is then run again until the run is complete. After each:

  - the final parameters (θ, φ, EMA θ of model.pt and of the final checkpoint) equal those of
    one uninterrupted run of the same config (max |Δ| ≤ 1e-6), shared by the module;
  - every checkpoint valid before the rerun is still there, unless num_to_keep newer valid ones
    made retention remove it;
  - one MLflow run, FINISHED, with train/loss logged once at each step 1..12.

Faults (where they land is made certain, not timed):
  worker_sigkill      rank 1 SIGKILLs itself once checkpoint 8 is written (Ray restarts the group)
  driver_sigkill      `bism train` SIGKILLed while frozen at step 10 (slow: a subprocess with its own Ray)
  driver_sigterm      the same with SIGTERM: exit 143, run KILLED, then the rerun (slow)
  truncated_newest    the complete run's checkpoint 12 cut to 200 bytes, then rerun
  missing_newest      then checkpoint 12's directory removed, then rerun
  enospc              Ray's copy of checkpoint 8 fails with ENOSPC: CheckpointWriteError, run FAILED
  nonfinite_restart   rank 0's batch of step 10 is NaN with max_bad_steps=0: the worker raises, Ray
                      restarts the group from checkpoint 8, the replay is clean: equal to the reference
  nonfinite_skip      the same with max_bad_steps=1: the step is skipped by design, so the result
                      differs from the reference; instead, θ, φ, EMA θ and Adam's state are
                      exactly unchanged by that step and the final checkpoint counts 1 bad step
and `test_ten_worker_sigkills` (slow): 10 SIGKILLs of a random rank after random checkpoints
(seeded) in one run of 24 steps with max_failures=10.

Counts (injected, survived, params equal, checkpoints lost) go to $BISM_FAULT_REPORT when set
(bench/fault_soak.py). In-process runs use the module's local Ray (conftest.ray_cluster); the
driver faults run `bism train` as a subprocess starting a Ray of its own (address local, its own
RAY_TMPDIR), and kill what it started by PID.
"""

from __future__ import annotations

import random
import shutil
import signal
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from ray import cloudpickle

from distributed_bism import train
from distributed_bism.config import Config
from distributed_bism.launch import ray_backend
from distributed_bism.training.checkpointing import STATE_FILE, CheckpointWriteError, load_state
from tests.helpers import fault_workers, retention_workers
from tests.helpers.fault_checks import (
    FaultRecord,
    FaultReport,
    check_outcome,
    final_params,
    lost_checkpoints,
    max_abs_diff,
    mlflow_state,
    valid_checkpoints,
)
from tests.helpers.local_runs import run_dir, scratch_cwd, tiny  # noqa: F401 (scratch_cwd: autouse)
from tests.helpers.step_hooks import Driver, hook_env

pytestmark = pytest.mark.usefixtures("ray_cluster")
cloudpickle.register_pickle_by_value(fault_workers)  # workers cannot import tests/
cloudpickle.register_pickle_by_value(retention_workers)

STEPS, EVERY, KEEP, NAME, EXPERIMENT = 12, 4, 2, "tiny", "bism-tests"
WORKER_MAIN = ray_backend.worker_main  # the package's, whatever a test patched in since


def ddp(out: Path, **over: Any) -> Config:
    """The tiny GRBM on 2 ddp workers, tracked in a sqlite store under `out`."""
    return tiny(out, **{"trainer.strategy": "ddp", "trainer.num_workers": 2, "trainer.cpus_per_worker": 1,
                        "trainer.max_failures": 2, "trainer.steps": STEPS, "trainer.checkpoint_every": EVERY,
                        "trainer.log_every": 1, "trainer.num_to_keep": KEEP, "tracking.enabled": True,
                        "tracking.tracking_uri": f"sqlite:///{out.resolve() / 'mlflow.db'}", **over})


@pytest.fixture(scope="module")
def report() -> Iterator[FaultReport]:
    r = FaultReport()
    yield r
    r.write()


@pytest.fixture(autouse=True)
def timed(report: FaultReport) -> Iterator[None]:
    """Each record's seconds end with its test."""
    yield
    report.close()


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, ray_cluster: Any) -> Callable[[int], dict[str, Any]]:
    """The final parameters of one uninterrupted run of `ddp(...)` with trainer.steps=steps, run
    once per module (lazily, with the package's own worker_main) and shared by every case."""
    cache: dict[int, dict[str, Any]] = {}

    def get(steps: int) -> dict[str, Any]:
        if steps not in cache:
            out = tmp_path_factory.mktemp(f"reference{steps}")
            with pytest.MonkeyPatch.context() as mp:
                mp.setattr(ray_backend, "worker_main", WORKER_MAIN)
                train(ddp(out, **{"trainer.steps": steps}))
            cache[steps] = final_params(out, NAME)
        return cache[steps]

    return get


def outcome(record: FaultRecord, ref: dict[str, Any], cfg: Config, valid_before: list[int]) -> None:
    """check_outcome for a run of `ddp(...)`."""
    out = Path(cfg.trainer.output_dir)
    check_outcome(record, reference=ref, output_dir=out, name=NAME, uri=str(cfg.tracking.tracking_uri),
                  experiment=EXPERIMENT, run_dir=run_dir(cfg), valid_before=valid_before, num_to_keep=KEEP,
                  steps=cfg.trainer.steps)


def test_worker_sigkill_after_a_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, reference: Any,
                                           report: FaultReport) -> None:
    """Rank 1 SIGKILLed once checkpoint 8 is on disk: Ray restarts the group (max_failures=2),
    which resumes from 8; the same command afterwards finds the run complete."""
    ref, record = reference(STEPS), report.start("worker_sigkill")
    cfg = ddp(tmp_path / "out")
    fault_workers.write_spec(tmp_path / "out", kills=[{"step": 8, "rank": 1}])
    monkeypatch.setattr(ray_backend, "worker_main", fault_workers.faulty_worker_main)
    summary = train(cfg)
    kills = fault_workers.kills_done(tmp_path / "out")
    record.injected = len(kills)
    assert [(k["step"], k["rank"]) for k in kills] == [(8, 1)]
    assert summary.step == STEPS
    assert train(cfg).step == STEPS  # the same command again: already complete
    outcome(record, ref, cfg, [int(n.split("_")[1]) for n in kills[0]["valid"]])


def test_truncated_then_missing_newest_checkpoint(tmp_path: Path, reference: Any, report: FaultReport) -> None:
    """A complete run's newest checkpoint (12) cut to 200 bytes: the rerun keeps it aside as
    *.unreadable, resumes from 8 and writes 12 again. Then checkpoint 12's directory removed:
    the rerun resumes from 8 again. Both end as the uninterrupted run."""
    ref = reference(STEPS)
    cfg = ddp(tmp_path / "out")
    train(cfg)
    state = run_dir(cfg) / f"checkpoint_{STEPS:08d}" / STATE_FILE

    record = report.start("truncated_newest")
    state.write_bytes(state.read_bytes()[:200])
    record.injected = 1
    before = valid_checkpoints(run_dir(cfg))
    assert before == [8]
    train(cfg)
    outcome(record, ref, cfg, before)
    assert (run_dir(cfg) / f"checkpoint_{STEPS:08d}.unreadable" / STATE_FILE).stat().st_size == 200

    record = report.start("missing_newest")
    shutil.rmtree(run_dir(cfg) / f"checkpoint_{STEPS:08d}")
    record.injected = 1
    before = valid_checkpoints(run_dir(cfg))
    assert before == [8]
    train(cfg)
    outcome(record, ref, cfg, before)


def test_enospc_on_a_checkpoint_write(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, reference: Any,
                                      report: FaultReport) -> None:
    """Ray's copy of checkpoint 8 into the run directory fails with ENOSPC: the run stops with
    a CheckpointWriteError, MLflow FAILED, checkpoint 4 intact; the rerun (space back) resumes
    from 4."""
    ref, record = reference(STEPS), report.start("enospc")
    cfg = ddp(tmp_path / "out")
    monkeypatch.setattr(ray_backend, "worker_main", retention_workers.upload_fails_at_8)
    with pytest.raises(CheckpointWriteError, match="No space left on device"):
        train(cfg)
    record.injected = 1
    assert mlflow_state(str(cfg.tracking.tracking_uri), EXPERIMENT)["statuses"] == ["FAILED"]
    before = valid_checkpoints(run_dir(cfg))
    assert before == [4]
    monkeypatch.setattr(ray_backend, "worker_main", WORKER_MAIN)
    train(cfg)
    outcome(record, ref, cfg, before)


def test_nonfinite_loss_with_no_skips_allowed_restarts_from_the_checkpoint(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, reference: Any, report: FaultReport) -> None:
    """max_bad_steps=0: rank 0's NaN batch in step 10 makes every rank skip the update and the
    loop raise FloatingPointError; Ray restarts the group from checkpoint 8, the NaN is not
    injected again, and the run ends as the uninterrupted one."""
    ref, record = reference(STEPS), report.start("nonfinite_restart")
    out = tmp_path / "out"
    cfg = ddp(out, **{"trainer.max_bad_steps": 0})
    fault_workers.write_spec(out, nan_at=10)
    monkeypatch.setattr(ray_backend, "worker_main", fault_workers.faulty_worker_main)
    train(cfg)
    record.injected = int((out / fault_workers.NAN_RECORD).exists())
    assert record.injected == 1
    assert "after" not in torch.load(out / fault_workers.NAN_RECORD, weights_only=True)  # the step raised
    assert train(cfg).step == STEPS
    outcome(record, ref, cfg, [4, 8])
    assert load_state(run_dir(cfg) / f"checkpoint_{STEPS:08d}")["bad_steps"] == 0


def test_nonfinite_loss_skipped_by_design(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, reference: Any,
                                          report: FaultReport) -> None:
    """max_bad_steps=1: rank 0's NaN batch in step 10 is skipped on both ranks and the run goes
    on. By design the trajectory then differs from the uninterrupted run (one update fewer), so
    the comparison is with what the design says: θ, φ, EMA θ and Adam's state leave step 10
    exactly as they entered it, the final checkpoint counts 1 bad step, its weights are finite,
    and the MLflow run is one, FINISHED, each step logged once."""
    ref, record = reference(STEPS), report.start("nonfinite_skip")
    out = tmp_path / "out"
    cfg = ddp(out, **{"trainer.max_bad_steps": 1})
    fault_workers.write_spec(out, nan_at=10)
    monkeypatch.setattr(ray_backend, "worker_main", fault_workers.faulty_worker_main)
    train(cfg)
    assert train(cfg).step == STEPS
    nan = torch.load(out / fault_workers.NAN_RECORD, weights_only=True)
    record.injected = 1
    state = mlflow_state(str(cfg.tracking.tracking_uri), EXPERIMENT)
    final = load_state(run_dir(cfg) / f"checkpoint_{STEPS:08d}")
    after = valid_checkpoints(run_dir(cfg))
    record.checkpoints_lost = len(lost_checkpoints([4, 8], after, KEEP))
    record.survived = state["statuses"] == ["FINISHED"] and state["loss_steps"] == list(range(1, STEPS + 1))
    unchanged = max(max_abs_diff(nan["before"], nan["after"]),
                    0.0 if _same(nan["before"]["energy_optimizer"], nan["after"]["energy_optimizer"]) else 1.0)
    record.max_abs_diff, record.params_equal = unchanged, unchanged == 0.0 and nan["bad_steps"] == 1
    record.notes.append(f"differs from the uninterrupted run by max |Δ| {max_abs_diff(ref, final):.3g} (a skipped step)")
    assert nan["bad_steps"] == 1 and final["bad_steps"] == 1
    assert unchanged == 0.0, f"the skipped step changed the weights or Adam's state (max |Δ| {unchanged})"
    assert max_abs_diff(ref, final) > 1e-6, "no step was skipped: the run equals the uninterrupted one"
    assert all(torch.isfinite(t).all() for part in ("energy", "posterior", "ema") for t in final[part].values())
    assert state["runs"] == 1 and state["statuses"] == ["FINISHED"], state
    assert state["loss_steps"] == list(range(1, STEPS + 1)), state["loss_steps"]
    assert not record.checkpoints_lost and after[-1] == STEPS


def _same(a: Any, b: Any) -> bool:
    """Exact equality of nested dicts/lists of tensors and plain values (Adam's state_dict)."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and set(a) == set(b) and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return bool(a == b)


@pytest.mark.slow
@pytest.mark.soak
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["driver_sigkill", "driver_sigterm"])
def test_driver_signal_then_the_same_command(tmp_path: Path, reference: Any, report: FaultReport,
                                             sig: signal.Signals) -> None:
    """`bism train` (its own local Ray) frozen once step 10 is logged (checkpoints 4 and 8 on
    disk) gets `sig`: SIGKILL leaves the MLflow run RUNNING, SIGTERM closes it KILLED with exit
    143. Every process it started is killed by PID; the same command then finishes the run."""
    ref, record = reference(STEPS), report.start(f"driver_{sig.name.lower()}")
    out = tmp_path / "out"
    cfg = ddp(out, **{"trainer.address": "local"})
    config = tmp_path / "run.yaml"
    config.write_text(cfg.to_yaml())
    ray_tmp = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # short: Ray's socket paths have a length limit
    ray_env = {"RAY_TMPDIR": ray_tmp, "RAY_ADDRESS": "local"}
    try:
        first = Driver(["train", str(config)], tmp_path / "first.log", hook_env(tmp_path, block_at=10, extra=ray_env))
        try:
            first.wait_for(tmp_path / "blocked", timeout=300)
            first.snapshot()
            before = valid_checkpoints(run_dir(cfg))
            first.proc.send_signal(sig)
            status = first.proc.wait(timeout=300)
            record.injected = 1
        finally:
            first.stop()
        assert status == (-signal.SIGKILL if sig == signal.SIGKILL else 128 + sig), first.output()[-3000:]
        assert before == [4, 8], before
        expected = "RUNNING" if sig == signal.SIGKILL else "KILLED"
        assert mlflow_state(str(cfg.tracking.tracking_uri), EXPERIMENT)["statuses"] == [expected]

        again = Driver(["train", str(config)], tmp_path / "again.log", hook_env(tmp_path, block_at=None, extra=ray_env))
        try:
            assert again.proc.wait(timeout=600) == 0, again.output()[-3000:]
        finally:
            again.stop()
        assert "continuing from its latest checkpoint" in again.output()
        outcome(record, ref, cfg, before)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)


@pytest.mark.slow
@pytest.mark.soak
def test_ten_worker_sigkills(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, reference: Any,
                             report: FaultReport) -> None:
    """One run of 24 steps with a checkpoint every step and max_failures=10: a random rank
    SIGKILLs itself after each of 10 random checkpoints (seeded). Each time Ray restarts the
    group from the newest checkpoint; the run finishes equal to the uninterrupted 24-step run
    (how often checkpoints are written does not change the trajectory), no valid checkpoint is
    lost between kills, one MLflow run, FINISHED, each step logged once."""
    steps = 24
    ref, record = reference(steps), report.start("ten_worker_sigkills")
    rng = random.Random(15)
    kills = [{"step": s, "rank": rng.randrange(2)} for s in sorted(rng.sample(range(1, steps), 10))]
    out = tmp_path / "out"
    cfg = ddp(out, **{"trainer.steps": steps, "trainer.checkpoint_every": 1, "trainer.max_failures": 10})
    fault_workers.write_spec(out, kills=kills)
    monkeypatch.setattr(ray_backend, "worker_main", fault_workers.faulty_worker_main)
    train(cfg)
    done = fault_workers.kills_done(out)
    record.injected = len(done)
    assert [{"step": k["step"], "rank": k["rank"]} for k in done] == kills
    # between one kill and the next, and after the last: nothing valid lost
    snapshots = [[int(n.split("_")[1]) for n in k["valid"]] for k in done] + [valid_checkpoints(run_dir(cfg))]
    lost = [s for a, b in zip(snapshots, snapshots[1:]) for s in lost_checkpoints(a, b, KEEP)]
    try:
        outcome(record, ref, cfg, snapshots[-2])
    finally:
        record.checkpoints_lost = len(lost)
    assert not lost, f"valid checkpoints lost between kills: {lost} ({snapshots})"
