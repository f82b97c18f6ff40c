"""Checkpoints: one explicit dict per training state, saved with torch.save and loaded with
`torch.load(weights_only=True)`, so a checkpoint cannot run code when it is opened.

Layout of a checkpoint directory:

    state.pt            the dict below, written by rank 0

    {
      "format": 1, "step": t, "world_size": W, "bad_steps": n,
      "energy": θ state_dict, "posterior": φ state_dict | None, "ema": EMA(θ) | {},
      "energy_optimizer": ..., "posterior_optimizer": ...,   # whole, whatever W (below)
      "rng": [torch RNG state of rank r for r < W],        # uint8 tensors
      "objective": [objective state of rank r] ,           # PCD chains; {} otherwise
      "config": resolved config as YAML, "mlflow_run_id": str | None,
    }

The optimisers are saved whole: torch's Adam.state_dict() (local, DDP, DeepSpeed stage 0), or
for DeepSpeed ZeRO ≥ 1 every rank's partition gathered into each parameter's whole fp32 master
weight and Adam moments (training/zero_state.py), so any number of workers resumes a checkpoint;
the per-rank lists are re-dealt then (training/resize.py). Checkpoints written before that held
"energy_optimizer": None and one file optim_rank{r}.pt per rank (DeepSpeed's own shard), which
still load on the same number of workers.

Older checkpoints also hold "schedules" (the learning rates at t). Nothing reads it, since
`LRSchedule.at(t)` recomputes them, and loading takes keys by name, so they load as they are.

Where the directories go is a `CheckpointSink`, the only thing the training loop sees: under Ray
(`RaySink`, launch/ray_backend.py) they are handed to `ray.train.report`; the "local" strategy
copies them itself (`LocalSink`), in the same layout.

Retention is one rule, `Retention`, whichever the strategy (Ray's own `num_to_keep` is left unset
for local storage, so Ray never deletes): after each checkpoint this process wrote, the newest
`num_to_keep` of those are kept and only directories older than all of them are removed. A
checkpoint found on disk but not written by this process (it may be the only good one, with newer
ones unreadable or missing) is never what makes an older one go.
"""

from __future__ import annotations

import math
import pickle
import re
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Protocol, TypeVar, cast

import torch
from torch import Tensor

from distributed_bism.distributed import gather_objects

T = TypeVar("T")

STATE_FILE = "state.pt"
FORMAT = 1


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file."""


class CheckpointWriteError(CheckpointError):
    """A checkpoint that could not be written (no space, no permission): the run stops with one
    line naming the directory and the OS error; every checkpoint already saved is left as it was."""


def write_error(step: int, where: str | Path, e: OSError) -> CheckpointWriteError:
    """The one-line error of a failed checkpoint write at `step` into `where`."""
    if e.strerror:
        reason = f"[Errno {e.errno}] {e.strerror}" if e.errno else e.strerror
    else:  # pyarrow's errors: "[Errno 28] Failed to open local file '...'. Detail: ..." in str(e) only
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
    return CheckpointWriteError(
        f"cannot write the checkpoint of step {step} to {where}: {reason}"
        + (f" ({e.filename})" if e.filename and str(e.filename) != str(where) else "")
    )


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
            raise FloatingPointError(
                f"refusing to write a checkpoint at step {state.get('step')}: '{key}' has non-finite weights"
            )
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
        raise CheckpointError(
            f"{Path(directory) / STATE_FILE}: not a distributed_bism checkpoint (format "
            f"{state.get('format') if isinstance(state, dict) else type(state).__name__})"
        )
    return state


_PATTERN = re.compile(r"^checkpoint_(\d{8})$")


def checkpoint_step(path: Path) -> int | None:
    """The step of a checkpoint_XXXXXXXX directory name, None for any other name."""
    m = _PATTERN.match(path.name)
    return int(m.group(1)) if m else None


class LocalCheckpoints:
    """The checkpoint_{step:08d}/ directories under `root` (a run directory), oldest first."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def named(self) -> list[Path]:
        """Every directory named like a checkpoint, state.pt or not (one cut short may lack it)."""
        if not self.root.is_dir():
            return []
        found = [p for p in self.root.iterdir() if p.is_dir() and checkpoint_step(p) is not None]
        return sorted(found, key=lambda p: checkpoint_step(p) or 0)

    def all(self) -> list[Path]:
        """The directories that hold a state.pt (readable or not)."""
        return [p for p in self.named() if (p / STATE_FILE).is_file()]

    def latest(self) -> Path | None:
        found = self.all()
        return found[-1] if found else None

    def newest_readable(self, skipped: list[tuple[Path, CheckpointError]] | None = None) -> Path | None:
        """The newest checkpoint whose state.pt loads; the unreadable newer ones are appended to
        `skipped` (nothing is moved or deleted here)."""
        for p in self.all()[::-1]:
            try:
                load_state(p)
            except CheckpointError as e:
                if skipped is not None:
                    skipped.append((p, e))
                continue
            return p
        return None

    def directory(self, step: int) -> Path:
        return self.root / checkpoint_dir_name(step)


class Retention:
    """The one retention rule for a run directory: keep the newest `num_to_keep` checkpoints this
    process wrote or resumed from, and remove only directories older than every one of them.

    Only checkpoints known to be good count (written and reported by this process, or loaded by
    its resume), so a checkpoint on disk is never removed on the strength of a newer one that is
    unreadable, was moved aside, or is missing: num_to_keep good ones always remain.
    Directories newer than the newest written one, and *.unreadable ones, are never touched."""

    def __init__(self, root: str | Path, num_to_keep: int):
        self.checkpoints = LocalCheckpoints(root)
        self.num_to_keep = num_to_keep
        self.written: list[int] = []  # steps this process saved, in order

    def resumed(self, directory: Path) -> None:
        """Count the checkpoint training resumed from, if it is one of this run directory's: it
        loaded, and every newer one was moved aside."""
        step = checkpoint_step(directory)
        if step is not None and directory.resolve().parent == self.checkpoints.root.resolve():
            self.written.append(step)

    def saved(self, step: int) -> list[Path]:
        """Record that checkpoint `step` was written completely, then prune; returns what was removed."""
        self.written.append(step)
        kept = sorted(set(self.written))[-self.num_to_keep :]
        if len(kept) < self.num_to_keep:
            return []
        removed = []
        for old in self.checkpoints.named():
            if (checkpoint_step(old) or 0) < kept[0]:
                shutil.rmtree(old, ignore_errors=True)
                removed.append(old)
        return removed


def checkpoint_dir_name(step: int) -> str:
    return f"checkpoint_{step:08d}"


def move_aside(directory: Path) -> Path:
    """Rename a checkpoint directory to <name>.unreadable[.N], so nothing writes over it and no
    retention rule counts or removes it; its bytes are kept."""
    target, n = directory.with_name(directory.name + ".unreadable"), 1
    while target.exists():
        target, n = directory.with_name(f"{directory.name}.unreadable.{n}"), n + 1
    directory.rename(target)
    return target


# --------------------------------------------------------------------------- sinks
class CheckpointSink(Protocol):
    """Where checkpoints go. Every rank calls `report` at the same steps."""

    def candidates(self) -> Iterable[Path]:
        """Checkpoint directories to resume from, newest first, each readable here (a sink may
        fetch one only when it is reached). Rank 0 only."""

    def local(self, directory: Path) -> Path:
        """The candidate rank 0 chose, as this rank can read it (another node may need a copy)."""

    def set_aside(self, directory: Path) -> str:
        """Put an unreadable candidate where nothing resumes from, counts or overwrites it; says where."""

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None, step: int) -> None:
        """Hand over this step's metrics and, at checkpoints, a directory `TrainLoop.save` filled
        (a temporary one: the sink copies or uploads what it keeps)."""

    def resumed(self, directory: Path) -> None:
        """Training resumed from `directory` (it loaded): retention may count it as good."""


class NoCheckpoints:
    """Keeps nothing (benchmarks and tests of the loop itself)."""

    def candidates(self) -> list[Path]:
        return []

    def local(self, directory: Path) -> Path:
        return directory

    def set_aside(self, directory: Path) -> str:
        return f"kept as {move_aside(directory)}"

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None, step: int) -> None:
        return None

    def resumed(self, directory: Path) -> None:
        return None


class LocalSink:
    """Checkpoints as checkpoint_XXXXXXXX/ directories under the run directory (local strategy).
    Each is copied to <name>.partial and renamed, so a directory with the checkpoint's name is
    always complete; then `Retention` prunes."""

    def __init__(self, root: Path, num_to_keep: int):
        self.retention = Retention(root, num_to_keep)
        self.checkpoints = self.retention.checkpoints
        self.last: Path | None = None

    def candidates(self) -> list[Path]:
        return self.checkpoints.named()[::-1]

    def local(self, directory: Path) -> Path:
        return directory

    def set_aside(self, directory: Path) -> str:
        return f"kept as {move_aside(directory)}"

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None, step: int) -> None:
        if checkpoint_dir is None:
            return
        target = self.checkpoints.directory(step)
        if target.exists():  # never overwrite what was saved
            raise FileExistsError(f"checkpoint {target} already exists")
        partial = target.with_name(target.name + ".partial")
        try:
            shutil.rmtree(partial, ignore_errors=True)  # left by a crash mid-copy: known incomplete
            shutil.copytree(checkpoint_dir, partial)
            partial.rename(target)
        except OSError as e:
            shutil.rmtree(partial, ignore_errors=True)
            raise write_error(step, target, e) from e
        self.last = target
        self.retention.saved(step)

    def resumed(self, directory: Path) -> None:
        self.retention.resumed(directory)


def agreed_write(step: int, write: Callable[[], T], where: str | Path | None) -> T:
    """write(), then one collective (every rank calls it): if it failed on any rank with an OS
    error, every rank raises the first rank's CheckpointWriteError, naming `where` and step `step`."""
    result, error = None, None
    try:
        result = write()
    except CheckpointWriteError as e:
        error = str(e)
    except OSError as e:
        error = str(write_error(step, where or "", e))
    errors = [e for e in gather_objects(error) if e]
    if errors:
        raise CheckpointWriteError(errors[0])
    return cast(T, result)  # write() returned: no rank failed
