"""strategy=local: the run's one TrainLoop in this process, no Ray; and what every worker shares
with it (its torch threads, how it prints)."""

from __future__ import annotations

import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from distributed_bism.config import Config
from distributed_bism.launch.preflight import storage_path
from distributed_bism.launch.signals import deferred
from distributed_bism.tracking import RunLogger, system_metrics
from distributed_bism.training.checkpointing import CheckpointSink, LocalSink
from distributed_bism.training.loop import TrainLoop


def print_line(msg: str) -> None:
    """A progress line on stdout, flushed. Not print(): in Ray Train workers print is patched to log
    *and* echo, doubling each line."""
    sys.stdout.write(msg + "\n")
    sys.stdout.flush()


def worker_threads(cfg: Config) -> int:
    """torch threads of one worker: its trainer.cpus_per_worker, at least 1. A process left at torch's
    default uses every core, and on a busy machine that is many times slower than one thread."""
    return max(1, int(cfg.trainer.cpus_per_worker))


class WholeCheckpoints:
    """A sink whose checkpoints a SIGTERM or Ctrl-C cannot cut in half: the signal waits until
    the checkpoint directory is complete (launch/signals.py)."""

    def __init__(self, sink: CheckpointSink) -> None:
        self.sink = sink

    def candidates(self) -> Iterable[Path]:
        return self.sink.candidates()

    def local(self, directory: Path) -> Path:
        return self.sink.local(directory)

    def set_aside(self, directory: Path) -> str:
        return self.sink.set_aside(directory)

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None, step: int) -> None:
        with deferred():
            self.sink.report(metrics, checkpoint_dir, step)

    def resumed(self, directory: Path) -> None:
        self.sink.resumed(directory)


def train_local(cfg: Config, run_id: str | None, uri: str | None) -> tuple[dict[str, Any], str | None]:
    """Fit one TrainLoop here, its checkpoints kept by a LocalSink under the run directory, with
    trainer.cpus_per_worker torch threads (as a Ray worker would; the caller's setting is restored
    after). A SIGTERM or Ctrl-C (`Interrupted`) stops the loop where it is, never inside a
    checkpoint being kept. Returns what `TrainLoop.fit` returns (plus the test log-likelihood
    curve, step → value, when one was measured) and the newest checkpoint."""
    sink = LocalSink(Path(storage_path(cfg)) / str(cfg.trainer.name), cfg.trainer.num_to_keep)
    loop = TrainLoop.from_config(
        cfg, sink=WholeCheckpoints(sink), logger=RunLogger(uri, run_id), run_id=run_id, log=print_line
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(worker_threads(cfg))
    try:
        with system_metrics(cfg, uri, run_id, 0):  # this machine, the run's only node
            out = loop.fit()
    finally:
        torch.set_num_threads(threads)
    if loop.history.test_loglik:
        out["test_loglik"] = loop.history.test_loglik
    last = sink.last or sink.checkpoints.latest()
    return out, str(last) if last else None
