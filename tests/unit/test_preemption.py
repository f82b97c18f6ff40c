"""Preemption without a cluster: trainer.max_preemption_failures reaches Ray Train's FailureConfig,
and a preemption notice makes the loop checkpoint at the next step boundary, from which a relaunch
continues exactly (training/preemption.py, launch/preemption.py).

The notice is simulated through the loop's own `preemption` argument, the path Ray's notice takes
(launch/ray_backend.worker_loop passes RayPreemptionNotice there). Two ranks that hear it at
different steps are in tests/distributed/test_preemption.py, with a real drain on Ray.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from distributed_bism.config import Config, ConfigError, from_dict
from distributed_bism.launch import ray_backend
from distributed_bism.launch.preemption import failure_config
from distributed_bism.training.checkpointing import LocalSink, load_state
from distributed_bism.training.loop import TrainLoop
from distributed_bism.training.preemption import PreemptionCheck
from tests.helpers.local_runs import BASE, assert_same, checkpoint_dirs, run_dir, scratch_cwd, tiny  # noqa: F401 (scratch_cwd: an autouse fixture)


# --------------------------------------------------------------------------- the config key and Ray
def test_max_preemption_failures_is_checked() -> None:
    trainer = {**BASE["trainer"], "max_preemption_failures": -1}
    with pytest.raises(ConfigError, match=r"^trainer\.max_preemption_failures: must be >= 0 \(or null: no limit\), got -1$"):
        from_dict(Config, {**BASE, "trainer": trainer})
    assert from_dict(Config, BASE).trainer.max_preemption_failures is None  # default: no limit, as Ray's


@pytest.mark.parametrize(("given", "ray_value"), [(None, -1), (0, 0), (7, 7)])
def test_failure_config_counts_preemptions_apart(tmp_path: Path, given: int | None, ray_value: int) -> None:
    t = tiny(tmp_path, **{"trainer.max_failures": 3, "trainer.max_preemption_failures": given}).trainer
    fc = failure_config(t)
    assert (fc.max_failures, fc.max_preemption_failures) == (3, ray_value)


class Fitted(Exception):
    """Raised by the fake TorchTrainer's fit: the test has what it wanted."""


def test_run_on_ray_passes_the_failure_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """run_on_ray hands TorchTrainer a RunConfig whose FailureConfig has both limits (no Ray
    started: the session and the trainer are stand-ins that record what they are given)."""
    import ray.train.v2.torch.torch_trainer as torch_trainer

    class FakeRay:
        def cluster_resources(self) -> dict[str, float]:
            return {"CPU": 8.0}

        def nodes(self) -> list[dict[str, Any]]:
            return [{"Alive": True}]

    @contextlib.contextmanager
    def session(address: str | None, **kwargs: Any) -> Iterator[FakeRay]:
        yield FakeRay()

    given: dict[str, Any] = {}

    class FakeTrainer:
        def __init__(self, fn: Any, **kwargs: Any) -> None:
            given.update(kwargs)

        def fit(self) -> None:
            raise Fitted

    monkeypatch.setattr(ray_backend, "ray_session", session)
    monkeypatch.setattr(torch_trainer, "TorchTrainer", FakeTrainer)
    cfg = tiny(tmp_path, **{"trainer.strategy": "ddp", "trainer.address": "127.0.0.1:6379",
                            "trainer.max_failures": 1, "trainer.max_preemption_failures": 4})
    with pytest.raises(Fitted):
        ray_backend.run_on_ray(cfg, lambda conf: None, {})
    fc = given["run_config"].failure_config
    assert (fc.max_failures, fc.max_preemption_failures) == (1, 4)


# --------------------------------------------------------------------------- the loop's check
def test_check_is_due_once_and_only_when_told() -> None:
    calls: list[int] = []

    def told() -> bool:
        calls.append(1)
        return len(calls) >= 3

    def due(check: PreemptionCheck) -> bool:  # one rank: the agreed vote is its own
        vote = check.vote()
        return vote is not None and check.settle(vote)

    check = PreemptionCheck(told)
    assert [due(check) for _ in range(6)] == [False, False, True, False, False, False]
    assert len(calls) == 3  # asked no more once the checkpoint was due
    assert check.vote() is None  # and nothing left to agree on
    assert PreemptionCheck(None).vote() is None


class NodeLost(Exception):
    """The simulated preempted node going away: the worker dies where it stands."""


class Notice:
    """A fake notice on the loop's own path: told during step `told_at` (run_step votes after the
    step's forward-backward, before it counts the step)."""

    def __init__(self, told_at: int) -> None:
        self.told_at = told_at
        self.loop: TrainLoop | None = None

    def __call__(self) -> bool:
        assert self.loop is not None
        return self.loop.step + 1 >= self.told_at


def fit(cfg: Config, notice: Notice | None = None, lost_at: int | None = None) -> TrainLoop:
    """TrainLoop.fit as the local strategy runs it, its checkpoints in the run directory; with
    `lost_at`, the node is lost (NodeLost) when step lost_at + 1 begins."""
    sink = LocalSink(run_dir(cfg), cfg.trainer.num_to_keep)
    loop = TrainLoop.from_config(cfg, sink=sink, preemption=notice, log=print)
    if notice is not None:
        notice.loop = loop
    if lost_at is not None:
        run_step = loop.run_step

        def dying(v: Any) -> Any:
            if loop.step >= lost_at:
                raise NodeLost(f"step {loop.step}")
            return run_step(v)

        loop.run_step = dying  # type: ignore[method-assign]
    loop.fit()
    return loop


def test_notice_checkpoints_at_once_and_the_relaunch_continues_from_it(tmp_path: Path,
                                                                         capsys: pytest.CaptureFixture[str]) -> None:
    """Checkpoints every 4 steps of 12; told at step 6, the loop checkpoints at step 6 (once:
    7 is not one) and trains on; the node is lost at step 7. The relaunch resumes at step 6, not
    4, and ends bit for bit where an uninterrupted run of the same seed ends."""
    over = {"trainer.num_to_keep": 10, "objective.unroll_steps": 1, "eval.metrics": []}
    cfg = tiny(tmp_path / "preempted", **over)
    with pytest.raises(NodeLost, match="step 7"):
        fit(cfg, Notice(told_at=6), lost_at=7)
    assert "step 6: a node of the run is being preempted: checkpoint now" in capsys.readouterr().out
    assert [p.name for p in checkpoint_dirs(cfg)] == ["checkpoint_00000004", "checkpoint_00000006"]
    assert load_state(checkpoint_dirs(cfg)[-1])["step"] == 6

    relaunched = fit(cfg)
    assert f"resumed from {run_dir(cfg) / 'checkpoint_00000006'} at step 6" in capsys.readouterr().out
    assert relaunched.step == 12
    straight = tiny(tmp_path / "straight", **over)
    fit(straight)
    assert [p.name for p in checkpoint_dirs(straight)] == ["checkpoint_00000004", "checkpoint_00000008",
                                                           "checkpoint_00000012"]
    a, b = load_state(checkpoint_dirs(cfg)[-1]), load_state(checkpoint_dirs(straight)[-1])
    assert a["step"] == b["step"] == 12
    assert a.pop("config").replace("/preempted", "/straight") == b.pop("config")
    assert_same(a, b, "state")


def test_notice_on_a_checkpoint_step_adds_none(tmp_path: Path) -> None:
    """Told at step 8, a checkpoint step anyway: one checkpoint there, and none extra after."""
    cfg = tiny(tmp_path, **{"trainer.num_to_keep": 10})
    fit(cfg, Notice(told_at=8))
    assert [p.name for p in checkpoint_dirs(cfg)] == ["checkpoint_00000004", "checkpoint_00000008",
                                                      "checkpoint_00000012"]
