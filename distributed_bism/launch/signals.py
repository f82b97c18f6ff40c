"""SIGTERM and SIGINT (Ctrl-C) of the training driver.

Without this, a signal kills the driver where it stands: its MLflow run stays RUNNING until a
relaunch, and a checkpoint being copied may be cut in half. While `train` runs, `stop_on_signals`
turns either signal into `Interrupted` in the main thread, so the driver unwinds: the strategy
stops its workers (the local loop simply stops; `ray_session` shuts down the Ray session it
started), and `train` closes the run as KILLED. `deferred()` holds the signal back while
something must not be cut (a checkpoint being kept, the run being opened); it is raised when
that is done. On Ray (`stop_by_request`) the signal asks Ray Train's controller to abort, and is
raised once `fit` has returned. A second signal while the driver is stopping is only acknowledged.

`Interrupted` is a SystemExit whose code is 128 + the signal number (130 for SIGINT, 143 for
SIGTERM, as a shell reports a process a signal ended), so `bism train` exits with that status
and no traceback, and no `except Exception` between the handler and `train` can swallow it.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from collections.abc import Callable, Iterator
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
    requesting = False  # inside stop_by_request()
    stop: Callable[[], Any] | None = None  # what stops that block (on_stop)
    pending: int | None = None  # a signal held back by deferred() or stop_by_request()


def _say(msg: str) -> None:
    sys.stderr.write(f"bism: {msg}\n")
    sys.stderr.flush()


def _call_stop() -> None:
    try:
        _State.stop()  # type: ignore[misc]
    except Exception as e:  # noqa: BLE001 (in a signal handler; the driver still unwinds when the block ends)
        _say(f"could not ask the workers to stop ({type(e).__name__}: {e})")


def _handler(signum: int, frame: FrameType | None) -> None:
    name = signal.Signals(signum).name
    if _State.stopping or _State.pending is not None:
        _say(f"{name}: already stopping (closing the MLflow run, stopping the workers); SIGKILL stops at once")
        return
    if _State.defer_depth or _State.requesting:
        _State.pending = signum
        if _State.requesting and _State.stop is not None:
            _call_stop()
        return
    _State.stopping = True
    raise Interrupted(signum)


def unwinding() -> None:
    """The driver is unwinding from an error: from now on a signal is only acknowledged, so it
    cannot cut the closing of the run nor hide the error behind an exit status 128 + signum."""
    _State.stopping = True


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
        for signum, h in previous.items():
            signal.signal(signum, h)
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
    if _State.defer_depth == 0 and not _State.requesting and _State.pending is not None and not _State.stopping:
        _State.stopping = True
        raise Interrupted(_State.pending)


@contextlib.contextmanager
def stop_by_request() -> Iterator[None]:
    """For a block that waits inside Ray (trainer.fit, in ray.get): an exception raised by a
    handler there comes out of Ray's C code mangled (a SystemError). So a signal only calls the
    stop that `on_stop` registered (Ray Train's controller abort: the workers stop, and fit
    returns or raises), and `Interrupted` is raised when the block ends, however it ends."""
    if not _State.active:
        yield
        return
    _State.requesting, error = True, None
    try:
        yield
    except BaseException as e:
        if _State.pending is None:
            raise
        error = e
    finally:
        _State.requesting, _State.stop = False, None
    if _State.pending is not None:
        _State.stopping = True
        raise Interrupted(_State.pending) from error


def on_stop(stop: Callable[[], Any]) -> None:
    """How to stop the running `stop_by_request` block; called at once if a signal came already."""
    if not _State.requesting:
        return
    _State.stop = stop
    if _State.pending is not None:
        _call_stop()
