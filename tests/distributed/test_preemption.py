"""The just-in-time checkpoint across ranks, and on Ray when a node is really drained for preemption.

  * 2 gloo ranks (ddp, no Ray): only rank 1 is told, after step 6; both ranks checkpoint at step 6
    (the decision is a collective), then train on to the end with equal parameters, and watching
    for the notice costs no collective of its own (it rides in θ's skip decision).
  * Ray (a private one-node cluster): the run's node is drained with reason PREEMPTION, as the
    autoscaler, `ray drain-node` or a SIGTERM to `ray start` do. Ray Train's watcher tells the
    workers, they write a checkpoint at the next step, and when the drain's deadline passes Ray
    ends the run with a PreemptionError: with trainer.max_preemption_failures=0 and
    max_failures=2, that it did not restart shows the limit reached Ray and the preemption was
    counted as one (restarting here would wait forever: the only node is draining).
"""

from __future__ import annotations

import datetime
import os
import re
import signal
import socket
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from distributed_bism.config import Config, from_dict
from distributed_bism.launch.ray_backend import train_on_ray
from distributed_bism.models import unwrap
from distributed_bism.training.checkpointing import NoCheckpoints, load_state
from distributed_bism.training.loop import TrainLoop
from tests.helpers.local_runs import BASE, checkpoint_dirs, run_dir, scratch_cwd, tiny  # noqa: F401 (scratch_cwd: autouse)
from tests.helpers.private_ray import private_ray

TOLD_AT = 6  # rank 1 is told during this step (run_step votes before it counts the step)


class Recorder(NoCheckpoints):
    """Keeps nothing; records the steps at which a checkpoint was handed over, and its files."""

    def __init__(self) -> None:
        self.saved: list[tuple[int, list[str]]] = []

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None, step: int) -> None:
        if checkpoint_dir is not None:
            self.saved.append((step, sorted(p.name for p in checkpoint_dir.iterdir())))


def _rank(rank: int, port: int, out: str, config: dict[str, Any]) -> None:
    torch.set_num_threads(1)
    # a short timeout: ranks that disagreed on the checkpoint step would wait in different collectives
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=60))
    try:
        sink = Recorder()
        loop = TrainLoop.from_config(from_dict(Config, config), rank=rank, world_size=2, sink=sink,
                                     preemption=lambda: rank == 1 and loop.step + 1 >= TOLD_AT)
        reduces, per_step = [0], []  # Python-level all-reduces (DDP's own run in C++ and are not counted)
        all_reduce, run_step = dist.all_reduce, loop.run_step

        def counted_all_reduce(*args: Any, **kwargs: Any) -> Any:
            reduces[0] += 1
            return all_reduce(*args, **kwargs)

        def counted_run_step(v: torch.Tensor) -> Any:
            before = reduces[0]
            result = run_step(v)
            per_step.append(reduces[0] - before)
            return result

        dist.all_reduce, loop.run_step = counted_all_reduce, counted_run_step  # type: ignore[method-assign]
        loop.fit()
        params = {n: p.detach().clone() for n, p in unwrap(loop.replica.energy).named_parameters()}
        torch.save({"saved": sink.saved, "params": params, "reduces_per_step": per_step}, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_one_rank_told_checkpoints_every_rank_at_the_same_step(tmp_path: Path) -> None:
    cfg = tiny(tmp_path, **{"trainer.strategy": "ddp", "trainer.num_workers": 2, "eval.metrics": []})
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = str(tmp_path / "rank")
    mp.start_processes(_rank, args=(port, out, cfg.to_dict()), nprocs=2, join=True, start_method="fork")
    got = [torch.load(f"{out}.{r}", weights_only=True) for r in range(2)]
    for r, g in enumerate(got):
        assert [step for step, _ in g["saved"]] == [4, TOLD_AT, 8, 12], f"rank {r}: {g['saved']}"
        # the vote rides in the skip decision: one per warm-up step (φ's) and one for θ, no more
        assert g["reduces_per_step"] == [cfg.objective.warmup_steps + 1] * cfg.trainer.steps, (r, g["reduces_per_step"])
    assert "state.pt" in dict(got[0]["saved"])[TOLD_AT]  # rank 0 wrote the whole checkpoint there
    for name, p in got[0]["params"].items():
        assert torch.equal(p, got[1]["params"][name]), name


# --------------------------------------------------------------------------- a real drain on Ray
EVERY = 50  # regular checkpoints; the drain comes once the first is on disk
DEADLINE_S = 10  # the drain's deadline: Ray ends the preempted run this long after the drain
GUARD_S = 600  # should the run not end (a restart waiting for the drained node), Ctrl-C it


def drain_when(path: Path, done: threading.Event, drained: dict[str, bool]) -> None:
    """Once `path` exists, drain this (only) node with reason PREEMPTION and a deadline DEADLINE_S
    away, as `ray drain-node --reason DRAIN_NODE_REASON_PREEMPTION` does (ray/scripts/scripts.py)."""
    import ray
    from ray.core.generated import autoscaler_pb2

    while not path.is_dir():
        if done.wait(0.2):
            return
    gcs = ray._raylet.GcsClient(address=ray.get_runtime_context().gcs_address)
    deadline_ms = int(time.time() * 1000) + DEADLINE_S * 1000
    accepted, why = gcs.drain_node(ray.get_runtime_context().get_node_id(),
                                   autoscaler_pb2.DrainNodeReason.Value("DRAIN_NODE_REASON_PREEMPTION"),
                                   "test_preemption", deadline_ms)
    drained["accepted"] = accepted
    if not done.wait(GUARD_S):
        os.kill(os.getpid(), signal.SIGINT)  # Ray Train's handler aborts the run; the asserts below fail


def test_drain_for_preemption_checkpoints_in_time_and_ends_as_preemption(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    from ray.train.v2.api.exceptions import PreemptionError

    monkeypatch.setenv("RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S", "0.2")  # Ray Train's watcher (5 s by default)
    cfg = tiny(tmp_path, **{"trainer.strategy": "ddp", "trainer.num_workers": 2, "trainer.steps": 100_000,
                            "trainer.checkpoint_every": EVERY, "trainer.num_to_keep": 100, "trainer.log_every": 10_000,
                            "trainer.max_failures": 2, "trainer.max_preemption_failures": 0,
                            "eval.metrics": [], "eval.every": 100_000})
    done, drained = threading.Event(), dict[str, bool]()
    with private_ray(num_cpus=2):
        watcher = threading.Thread(target=drain_when, args=(run_dir(cfg) / f"checkpoint_{EVERY:08d}", done, drained))
        watcher.start()
        try:
            with pytest.raises(PreemptionError) as raised:
                train_on_ray(cfg, None, None)
        finally:
            done.set()
            watcher.join()
    assert drained.get("accepted"), drained
    assert raised.value.preemption_info.deadline_ms is not None
    log = capfd.readouterr().out
    told = [int(s) for s in re.findall(r"step (\d+): a node of the run is being preempted: checkpoint now", log)]
    assert len(told) == 1, log[-3000:]
    steps = [load_state(d)["step"] for d in checkpoint_dirs(cfg)]
    assert told[0] in steps and told[0] > EVERY, (told, steps)
    assert all(s % EVERY == 0 for s in steps if s != told[0]), steps  # no other off-schedule checkpoint
