"""Writes to an MLflow sqlite store that meet a lock held longer than MLflow waits for it.

Every trial of a sweep writes to the one sqlite file of the default store
(sqlite:///<output_dir>/mlflow.db). sqlite lets one writer in at a time; MLflow's sessions wait
up to 20 s for the lock (`PRAGMA busy_timeout = 20000`, mlflow/store/db/utils.py) and then raise
an MlflowException (TEMPORARILY_UNAVAILABLE) caused by sqlite3.OperationalError "database is
locked". With 8 processes each logging 150 steps as fast as they could, on a 2-core machine
busy with other work (load ~10), the slowest log_batch waited 10 s, half that limit; a slower
disk, a busier machine or a long transaction of another client passes it, and the trial would
then fail. So a write that fails on the lock is tried again, a bounded number of times
(tests/distributed/test_tracking_concurrency.py holds the lock 24 s while 8 trials log).

It is safe to try again: sqlite rolled the failed transaction back, and where an earlier session
of the same call had committed (log_batch writes metrics, then their model links, in separate
sessions), the same points again (same key, value, step and timestamp) are kept once by MLflow.
Any other error, another sqlite error included, is raised at once as it is.

A database server (PostgreSQL, with `mlflow server` in front of it for a team) has no such lock;
an `mlflow server` client retries the server's 503s itself (MLFLOW_HTTP_REQUEST_MAX_RETRIES).
"""

from __future__ import annotations

import sqlite3
import sys
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

LOCKED = "database is locked"  # sqlite3.OperationalError's text for SQLITE_BUSY
ATTEMPTS = 6  # each waits up to MLflow's 20 s busy timeout: with the pauses, ~2.5 min in all
PAUSE_S = 1.0  # before the second attempt; doubled before each later one


def is_locked(error: BaseException) -> bool:
    """Whether `error` is, or was caused by, sqlite3.OperationalError "database is locked" (MLflow
    raises MlflowException from sqlalchemy's OperationalError, which wraps the sqlite3 one)."""
    seen: set[int] = set()
    e: BaseException | None = error
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        orig = getattr(e, "orig", None)  # sqlalchemy.exc.DBAPIError keeps the driver's error here
        for candidate in (e, orig):
            if isinstance(candidate, sqlite3.OperationalError) and str(candidate).startswith(LOCKED):
                return True
        e = e.__cause__ or e.__context__
    return False


def retry_locked(
    write: Callable[[], T],
    what: str,
    *,
    attempts: int = ATTEMPTS,
    pause_s: float = PAUSE_S,
    sleep: Callable[[float], None] | None = None,
) -> T:
    """write(), tried again (up to `attempts` in all, pausing pause_s, 2 pause_s, ...) while it
    fails with sqlite's "database is locked"; a note on stderr names `what` at each retry. The
    last lock error, or any other error at once, is raised unchanged. `sleep`: time.sleep, unless given."""
    for attempt in range(1, attempts + 1):
        try:
            return write()
        except Exception as e:
            if attempt == attempts or not is_locked(e):
                raise
            pause = pause_s * 2 ** (attempt - 1)
            print(
                f"bism: note: {what}: the MLflow sqlite store is locked by another writer; "
                f"trying again in {pause:g} s ({attempt + 1}/{attempts})",
                file=sys.stderr,
                flush=True,
            )
            (sleep or time.sleep)(pause)
    raise AssertionError("unreachable: the last attempt returns or raises")
