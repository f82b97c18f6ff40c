"""Checkpoints: one explicit dict per training state, saved with torch.save and loaded with
`torch.load(weights_only=True)`, so a checkpoint cannot run code when it is opened.

Layout of a checkpoint directory:

    state.pt            the dict below, written by rank 0
    optim_rank{r}.pt    DeepSpeed ZeRO ≥ 1 only: rank r's shard of the optimiser states

    {
      "format": 1, "step": t, "world_size": W, "bad_steps": n,
      "energy": θ state_dict, "posterior": φ state_dict | None, "ema": EMA(θ) | {},
      "energy_optimizer": ..., "posterior_optimizer": ...,   # None when sharded (see above)
      "rng": [torch RNG state of rank r for r < W],        # uint8 tensors
      "objective": [objective state of rank r] ,           # PCD chains; {} otherwise
      "config": resolved config as YAML, "mlflow_run_id": str | None,
    }

Older checkpoints also hold "schedules" (the learning rates at t). Nothing reads it, since
`LRSchedule.at(t)` recomputes them, and loading takes keys by name, so they load as they are.

Where the directories go is a `CheckpointSink`, the only thing the training loop sees: under Ray
(`RaySink`, launch/ray_backend.py) they are handed to `ray.train.report` and kept by Ray's
CheckpointConfig; the "local" strategy keeps them itself (`LocalSink`), in the same layout.
"""

from __future__ import annotations

import math
import pickle
import re
import shutil
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor

STATE_FILE = "state.pt"
FORMAT = 1


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file."""


def is_uri(path: str) -> bool:
    """Whether a storage path is a URI (s3://..., gs://...) rather than a local path: only a local
    path can be listed, checked for writability or searched for checkpoints from this process."""
    return "://" in path


def optim_shard_file(rank: int) -> str:
    return f"optim_rank{rank}.pt"


def all_finite(state: Any) -> bool:
    """True if every floating-point tensor nested in `state` is finite."""
    if isinstance(state, Tensor):
        return not state.is_floating_point() or bool(torch.isfinite(state).all())
    if isinstance(state, dict):
        return all(all_finite(v) for v in state.values())
    if isinstance(state, (list, tuple)):
        return all(all_finite(v) for v in state)
    return not (isinstance(state, float) and not math.isfinite(state))


def save_state(directory: str | Path, state: dict[str, Any]) -> Path:
    """Write `state` to directory/state.pt; refuses non-finite weights (a NaN checkpoint would
    be resumed from forever)."""
    for key in ("energy", "posterior", "ema"):
        if not all_finite(state.get(key)):
            raise FloatingPointError(f"refusing to write a checkpoint at step {state.get('step')}: "
                                     f"'{key}' has non-finite weights")
    path = Path(directory) / STATE_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save({"format": FORMAT, **state}, tmp)
    tmp.replace(path)  # a reader never sees half a file
    return path


def load_file(path: str | Path, *, safe_globals: list[Any] | None = None) -> dict[str, Any]:
    """torch.load(weights_only=True) with a one-line error naming the file when it is unusable."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file not found: {path}")
    try:
        with torch.serialization.safe_globals(safe_globals or []):
            return torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError) as e:  # a bad zip, a bad pickle
        # Not torch's text: it advises weights_only=False, which would let the file run code.
        why = e.strerror if isinstance(e, OSError) and e.strerror else "the file is corrupt or not a checkpoint"
        raise CheckpointError(f"cannot read checkpoint {path}: {why} ({type(e).__name__})") from e


def load_state(directory: str | Path) -> dict[str, Any]:
    """The state dict of a checkpoint directory, checked for its format."""
    state = load_file(Path(directory) / STATE_FILE)
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{Path(directory) / STATE_FILE}: not a distributed_bism checkpoint (format "
                              f"{state.get('format') if isinstance(state, dict) else type(state).__name__})")
    return state


class LocalCheckpoints:
    """checkpoint_{step:08d}/ directories under `root`, the newest `num_to_keep` kept (local strategy)."""

    _PATTERN = re.compile(r"^checkpoint_(\d{8})$")

    def __init__(self, root: str | Path, num_to_keep: int):
        self.root, self.num_to_keep = Path(root), num_to_keep

    def all(self) -> list[Path]:
        if not self.root.is_dir():
            return []
        found = [p for p in self.root.iterdir() if p.is_dir() and self._PATTERN.match(p.name) and (p / STATE_FILE).is_file()]
        return sorted(found, key=lambda p: int(self._PATTERN.match(p.name).group(1)))  # type: ignore[union-attr]

    def latest(self) -> Path | None:
        found = self.all()
        return found[-1] if found else None

    def directory(self, step: int) -> Path:
        return self.root / checkpoint_dir_name(step)

    def prune(self) -> None:
        for old in self.all()[:-self.num_to_keep]:
            shutil.rmtree(old)


def checkpoint_dir_name(step: int) -> str:
    return f"checkpoint_{step:08d}"


def move_aside(directory: Path) -> Path:
    """Rename a checkpoint directory to <name>.unreadable[.N], so nothing writes over it."""
    target, n = directory.with_name(directory.name + ".unreadable"), 1
    while target.exists():
        target, n = directory.with_name(f"{directory.name}.unreadable.{n}"), n + 1
    directory.rename(target)
    return target


# --------------------------------------------------------------------------- sinks
class CheckpointSink(Protocol):
    """Where checkpoints go. Every rank calls `report` at the same steps."""

    def candidates(self) -> list[Path]:
        """Checkpoint directories to resume from, newest first."""

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None, step: int) -> None:
        """Hand over this step's metrics and, at checkpoints, a directory `TrainLoop.save` filled
        (a temporary one: the sink copies or uploads what it keeps)."""


class NoCheckpoints:
    """Keeps nothing (benchmarks and tests of the loop itself)."""

    def candidates(self) -> list[Path]:
        return []

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None, step: int) -> None:
        return None


class LocalSink:
    """Checkpoints as checkpoint_XXXXXXXX/ directories under the run directory (local strategy)."""

    def __init__(self, root: Path, num_to_keep: int):
        self.checkpoints = LocalCheckpoints(root, num_to_keep)
        self.last: Path | None = None

    def candidates(self) -> list[Path]:
        return self.checkpoints.all()[::-1]

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None, step: int) -> None:
        if checkpoint_dir is None:
            return
        target = self.checkpoints.directory(step)
        if target.exists():  # never overwrite what was saved
            raise FileExistsError(f"checkpoint {target} already exists")
        shutil.copytree(checkpoint_dir, target)
        self.last = target
        self.checkpoints.prune()
