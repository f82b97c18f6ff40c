"""SIGTERM and SIGINT (Ctrl-C) of the training driver.

Without this, a signal kills the driver where it stands: its MLflow run stays RUNNING until a
relaunch, and a checkpoint being copied may be cut in half. While `train` runs, `stop_on_signals`
turns either signal into `Interrupted` in the main thread, so the driver unwinds: the strategy
stops its workers (the local loop simply stops; `ray_session` shuts down the Ray session it
started or connected), and `train` closes the run as KILLED. `deferred()` holds the signal back
while something must not be cut (a checkpoint being kept, the run being opened); it is raised
when that is done. A second signal while the driver is stopping is only acknowledged.

`Interrupted` is a SystemExit whose code is 128 + the signal number (130 for SIGINT, 143 for
SIGTERM, as a shell reports a process a signal ended), so `bism train` exits with that status
and no traceback, and no `except Exception` between the handler and `train` can swallow it.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from collections.abc import Iterator
from types import FrameType
from typing import Any

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Interrupted(SystemExit):
    """The driver was asked to stop by `signum`; `.name` is e.g. "SIGTERM"."""

    def __init__(self, signum: int) -> None:
        super().__init__(128 + signum)
        self.signum = signum
        self.name = signal.Signals(signum).name


class _State:
    active = False  # inside stop_on_signals
    stopping = False  # an Interrupted was raised: the driver is unwinding
    defer_depth = 0  # inside deferred()
    pending: int | None = None  # a signal that came during deferred()


def _handler(signum: int, frame: FrameType | None) -> None:
    name = signal.Signals(signum).name
    if _State.stopping:
        sys.stderr.write(f"bism: {name}: already stopping (closing the MLflow run, stopping the workers)\n")
        sys.stderr.flush()
        return
    if _State.defer_depth:
        _State.pending = signum
        return
    _State.stopping = True
    raise Interrupted(signum)


def handling() -> bool:
    """Whether the driver's handlers are in charge (inside `stop_on_signals`)."""
    return _State.active


def reinstall() -> None:
    """Put the driver's handlers back after a library replaced them (ray.init sets SIGTERM to
    sys.exit(15)); nothing outside `stop_on_signals`."""
    if _State.active and threading.current_thread() is threading.main_thread():
        for s in SIGNALS:
            signal.signal(s, _handler)


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """SIGTERM and SIGINT raise `Interrupted` here while the block runs; the previous handlers are
    restored after. Only the main thread can handle signals: elsewhere (a Ray Tune trial) this
    changes nothing."""
    if threading.current_thread() is not threading.main_thread() or _State.active:
        yield
        return
    previous: dict[int, Any] = {s: signal.getsignal(s) for s in SIGNALS}
    _State.active, _State.stopping, _State.pending, _State.defer_depth = True, False, None, 0
    for s in SIGNALS:
        signal.signal(s, _handler)
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        _State.active, _State.stopping, _State.pending = False, False, None


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """Hold a signal back until the block is done (it must not be cut), then raise it. An
    exception from the block wins: the driver unwinds anyway."""
    _State.defer_depth += 1
    try:
        yield
    finally:
        _State.defer_depth -= 1
    if _State.defer_depth == 0 and _State.pending is not None and not _State.stopping:
        signum, _State.pending = _State.pending, None
        _State.stopping = True
        raise Interrupted(signum)
