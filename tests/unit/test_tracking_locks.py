"""The retry of writes that meet a locked sqlite store (distributed_bism/tracking/locks.py): only
sqlite's "database is locked" is retried, a bounded number of times, and RunLogger's per-step
metrics go through it. The lock errors here are real ones, raised by sqlite on a database another
connection holds, wrapped as MLflow's sessions wrap them (mlflow/store/db/utils.py,
make_managed_session). tests/distributed/test_tracking_concurrency.py meets the lock for real."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INTERNAL_ERROR, TEMPORARILY_UNAVAILABLE

from distributed_bism.tracking import RunLogger
from distributed_bism.tracking.locks import is_locked, retry_locked


@pytest.fixture
def locked_db(tmp_path: Path) -> Iterator[Path]:
    """A sqlite file another connection holds the exclusive lock of."""
    path = tmp_path / "mlflow.db"
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("CREATE TABLE metrics (value REAL)")
    holder.execute("BEGIN EXCLUSIVE")
    try:
        yield path
    finally:
        holder.execute("COMMIT")
        holder.close()


def sqlite_error(path: Path, statement: str = "INSERT INTO metrics VALUES (1)") -> sqlalchemy.exc.OperationalError:
    """sqlalchemy's OperationalError from `statement` on `path`, without waiting for a lock."""
    engine = sqlalchemy.create_engine(f"sqlite:///{path}", connect_args={"timeout": 0})
    try:
        with engine.begin() as conn:
            conn.execute(sqlalchemy.text(statement))
    except sqlalchemy.exc.OperationalError as e:
        return e
    finally:
        engine.dispose()
    raise AssertionError(f"{statement} did not fail")


def as_mlflow_raises(error: sqlalchemy.exc.OperationalError) -> MlflowException:
    """What MLflow's managed session raises for an OperationalError."""
    try:
        raise MlflowException(message=error, error_code=TEMPORARILY_UNAVAILABLE) from error
    except MlflowException as e:
        return e


def failing(errors: list[BaseException], result: str = "ok") -> tuple[Callable[[], str], list[int]]:
    """A write that raises `errors` in turn, then returns `result`; and the list of its calls."""
    calls: list[int] = []

    def write() -> str:
        calls.append(1)
        if len(calls) <= len(errors):
            raise errors[len(calls) - 1]
        return result

    return write, calls


def test_a_real_lock_error_is_recognised(locked_db: Path, tmp_path: Path) -> None:
    locked = sqlite_error(locked_db)
    assert str(locked.orig) == "database is locked"
    assert is_locked(locked) and is_locked(as_mlflow_raises(locked)) and is_locked(locked.orig)
    other = sqlite_error(tmp_path / "other.db", "INSERT INTO missing VALUES (1)")  # no such table
    assert isinstance(other.orig, sqlite3.OperationalError)
    assert not is_locked(other) and not is_locked(as_mlflow_raises(other))
    assert not is_locked(MlflowException("database is locked", error_code=INTERNAL_ERROR))  # text alone: not sqlite's


def test_locked_writes_are_retried_then_succeed(locked_db: Path, capsys: pytest.CaptureFixture[str]) -> None:
    locked = as_mlflow_raises(sqlite_error(locked_db))
    write, calls = failing([locked, locked])
    pauses: list[float] = []
    assert retry_locked(write, "metrics of step 7", sleep=pauses.append) == "ok"
    assert len(calls) == 3 and pauses == [1.0, 2.0]
    err = capsys.readouterr().err
    assert err.count("metrics of step 7: the MLflow sqlite store is locked by another writer") == 2


def test_a_lock_that_outlasts_the_attempts_is_raised(locked_db: Path) -> None:
    locked = as_mlflow_raises(sqlite_error(locked_db))
    write, calls = failing([locked] * 10)
    pauses: list[float] = []
    with pytest.raises(MlflowException) as raised:
        retry_locked(write, "w", attempts=4, sleep=pauses.append)
    assert raised.value is locked and len(calls) == 4 and len(pauses) == 3


@pytest.mark.parametrize("kind", ["other sqlite error", "bug", "mlflow error"])
def test_other_errors_are_raised_at_once(kind: str, tmp_path: Path) -> None:
    error: BaseException = {
        "other sqlite error": lambda: as_mlflow_raises(
            sqlite_error(tmp_path / "x.db", "INSERT INTO missing VALUES (1)")
        ),
        "bug": lambda: TypeError("log_batch() got an unexpected keyword argument"),
        "mlflow error": lambda: MlflowException("Run 'abc' not found", error_code=INTERNAL_ERROR),
    }[kind]()
    write, calls = failing([error])
    pauses: list[float] = []
    with pytest.raises(type(error)) as raised:
        retry_locked(write, "w", sleep=pauses.append)
    assert raised.value is error and len(calls) == 1 and not pauses


class LockedOnceClient:
    """MlflowClient's log_batch, locked at its first call."""

    def __init__(self, error: BaseException):
        self.error: BaseException | None = error
        self.batches: list[tuple[str, list[Any]]] = []

    def log_batch(self, run_id: str, metrics: list[Any]) -> None:
        if self.error is not None:
            error, self.error = self.error, None
            raise error
        self.batches.append((run_id, metrics))


def test_run_logger_retries_its_metrics(locked_db: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import distributed_bism.tracking.locks as tracking_locks

    monkeypatch.setattr(tracking_locks.time, "sleep", lambda s: None)
    client = LockedOnceClient(as_mlflow_raises(sqlite_error(locked_db)))
    logger = RunLogger(None, None)
    logger.client, logger.run_id = client, "run"
    logger.metrics({"train/loss": 0.5, "train/lr": 0.1}, step=3)
    ((run_id, points),) = client.batches
    assert run_id == "run" and sorted((m.key, m.value, m.step) for m in points) == [
        ("train/loss", 0.5, 3),
        ("train/lr", 0.1, 3),
    ]
