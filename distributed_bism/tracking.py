"""MLflow tracking.

The driver opens the run before any worker starts (`open_run`): it checks the store, creates
or finds the experiment, and creates the run, or finds the run of the same `trainer.name` to
continue it. It closes the run as FINISHED or FAILED whatever the workers did (`close_run`),
so a run is never left RUNNING by a crashed worker; and as KILLED when SIGTERM or Ctrl-C stops
the driver. Rank 0 logs metrics and artifacts to that run id through a `RunLogger`; the other
ranks log nothing.

Default store: sqlite:///<output_dir>/mlflow.db, with artifacts under <output_dir>/mlartifacts
(with sqlite, MLflow would otherwise put them in ./mlruns of whatever directory it runs in).
"""

from __future__ import annotations

import os
import re
import socket
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from datetime import UTC
from pathlib import Path
from typing import Any

from distributed_bism.config import Config, ConfigError

RUN_TAG = "bism.run"  # trainer.name, to find the run again on resume
ENDED_BY_TAG = "bism.ended_by"  # the signal that stopped the driver (run KILLED); removed on resume


def tracking_uri(cfg: Config) -> str:
    """tracking.tracking_uri, else $MLFLOW_TRACKING_URI, else the sqlite store under output_dir."""
    uri = cfg.tracking.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    return f"sqlite:///{(Path(cfg.trainer.output_dir).resolve() / 'mlflow.db')}"


def tracking_uri_key(cfg: Config) -> str:
    """Where `tracking_uri(cfg)` came from, to name it in an error."""
    if cfg.tracking.tracking_uri:
        return "tracking.tracking_uri"
    return "$MLFLOW_TRACKING_URI" if os.environ.get("MLFLOW_TRACKING_URI") else "trainer.output_dir (its mlflow.db)"


def check_tracking(cfg: Config) -> None:
    """The store `tracking_uri(cfg)` names, checked before any worker starts or run opens
    (preflight calls this when tracking.enabled)."""
    check_tracking_uri(tracking_uri(cfg), key=tracking_uri_key(cfg))


# Schemes MLflow 3.17 has tracking stores for (mlflow.tracking._tracking_service.utils), beside
# plugins' (entry points "mlflow.tracking_store"). "" is a bare path: a file store, like "file".
DATABASES = ("sqlite", "postgresql", "mysql", "mssql")
SERVERS = ("http", "https")
HOSTED = ("databricks", "databricks-uc", "uc")
DEFAULT_PORTS = {"postgresql": 5432, "mysql": 3306, "mssql": 1433}
USE_INSTEAD = "use sqlite:///path/to/mlflow.db or http(s)://host:port (an MLflow server)"


def uri_scheme(uri: str) -> str:
    """The scheme MLflow picks a store by (mlflow.utils.uri.get_uri_scheme): "postgresql" for
    postgresql+psycopg2://..., "" for a bare path (a Windows drive letter included)."""
    if uri in HOSTED:
        return uri
    scheme = urllib.parse.urlparse(uri).scheme.lower()
    base = scheme.split("+", 1)[0]
    if base in DATABASES:
        return base
    return "" if len(scheme) == 1 else scheme


def _plugin_schemes() -> set[str]:
    from importlib.metadata import entry_points

    return {e.name for e in entry_points(group="mlflow.tracking_store")}


def check_tracking_uri(uri: str, *, key: str = "tracking.tracking_uri", timeout: float = 5.0) -> None:
    """Fail fast, with the URI and its `key` named, on a store MLflow has no backend for or that
    cannot be reached or written: a ConfigError in one line instead of an MLflow traceback (or,
    for sqlite in a directory that cannot hold files, minutes of retries and two tracebacks)."""
    scheme = uri_scheme(uri)
    if scheme in ("", "file"):
        _check_file_store(uri, key)
    elif scheme == "sqlite":
        _check_sqlite(uri, key)
    elif scheme in DATABASES:
        _check_database(uri, scheme, key, timeout)
    elif scheme in SERVERS:
        _check_server(uri, key, timeout)
    elif scheme not in HOSTED and scheme not in _plugin_schemes():
        raise ConfigError(
            f"{key}: {uri!r} has the scheme {scheme}://, for which MLflow has no tracking store; {USE_INSTEAD}"
        )


def _check_server(uri: str, key: str, timeout: float) -> None:
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as r:
            ok = r.status == 200
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise ConfigError(f"{key}: MLflow server {uri} is unreachable ({getattr(e, 'reason', e)})") from e
    if not ok:
        raise ConfigError(f"{key}: MLflow server {uri} is not healthy")


def _check_file_store(uri: str, key: str) -> None:
    """A bare path or file: URI is MLflow's file store, which MLflow 3 refuses (maintenance mode)
    unless $MLFLOW_ALLOW_FILE_STORE is true; then its directory must be writable."""
    if os.environ.get("MLFLOW_ALLOW_FILE_STORE", "").strip().lower() not in ("true", "1"):
        raise ConfigError(
            f"{key}: {uri!r} is a path, i.e. an MLflow file store, which MLflow 3 refuses "
            f"(maintenance mode) unless MLFLOW_ALLOW_FILE_STORE=true; {USE_INSTEAD}"
        )
    path = Path(urllib.request.url2pathname(urllib.parse.urlparse(uri).path)) if uri.startswith("file:") else Path(uri)
    _check_can_write_in(path.expanduser(), key, uri)


def _check_can_write_in(directory: Path, key: str, uri: str) -> None:
    """Create `directory` if needed and create a file in it: os.access says yes to root anywhere,
    /proc included, where sqlite then retries for minutes."""
    import tempfile

    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".bism-probe-"):
            pass
    except OSError as e:
        raise ConfigError(f"{key}: {uri}: cannot write in {directory} ({e.strerror or e})") from e


def _check_sqlite(uri: str, key: str) -> None:
    """A file path (an in-memory database keeps nothing, and workers could not share it), in a
    directory where files can be created; an existing file must be an SQLite database."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        database = make_url(uri).database
    except ArgumentError as e:
        raise ConfigError(f"{key}: {uri!r} is not a valid sqlite URI ({e}); {USE_INSTEAD}") from e
    if not database or database == ":memory:":
        raise ConfigError(f"{key}: {uri!r} is an in-memory database, which keeps nothing; {USE_INSTEAD}")
    path = Path(database).expanduser()
    _check_can_write_in(path.parent, key, uri)
    if path.exists():
        try:
            with path.open("r+b") as f:
                head = f.read(16)
        except OSError as e:
            raise ConfigError(f"{key}: {uri}: cannot open {path} for writing ({e.strerror or e})") from e
        if head and head != b"SQLite format 3\x00":
            raise ConfigError(f"{key}: {uri}: {path} exists and is not an SQLite database")


def _check_database(uri: str, scheme: str, key: str, timeout: float) -> None:
    """A database server: a URI sqlalchemy can parse, its driver installed, and its host answering
    (a TCP connect; MLflow would otherwise retry for minutes)."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError

    try:
        url = make_url(uri)
        dialect = url.get_dialect()
    except (ArgumentError, NoSuchModuleError) as e:
        raise ConfigError(f"{key}: {uri!r} is not a valid {scheme} URI ({e})") from e
    try:
        dialect.import_dbapi()
    except ImportError as e:
        raise ConfigError(
            f"{key}: {uri}: the {scheme} driver {url.get_driver_name()} is not installed "
            f"(no Python module {e.name or e}); install it, or {USE_INSTEAD}"
        ) from e
    if url.host:
        port = url.port or DEFAULT_PORTS[scheme]
        try:
            with socket.create_connection((url.host, port), timeout=timeout):
                pass
        except OSError as e:
            raise ConfigError(
                f"{key}: {uri}: no database server answers at {url.host}:{port} ({e.strerror or e})"
            ) from e


def _client(uri: str) -> Any:
    from mlflow import MlflowClient  # mlflow takes seconds to import; only tracking code pays it

    return MlflowClient(tracking_uri=uri)


def _experiment_id(client: Any, cfg: Config, uri: str) -> str:
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    if exp is not None:
        return exp.experiment_id
    location = None
    if uri.startswith("sqlite:"):
        location = (Path(cfg.trainer.output_dir).resolve() / "mlartifacts").as_uri()
    return client.create_experiment(cfg.tracking.experiment, artifact_location=location)


def artifact_stamp(step: int) -> str:
    """`step_XXXXXXXX_<UTC time to the microsecond>`: names what one `bism eval` or `bism diagnose`
    writes, so that a second one at the same step, even within the same second, adds files to the
    run instead of replacing the first one's."""
    from datetime import datetime

    return f"step_{step:08d}_{datetime.now(UTC).strftime('%Y%m%dT%H%M%S_%f')}"


def sanitize(name: str) -> str:
    """MLflow keys allow alphanumerics and `_ - . space /`."""
    return re.sub(r"[^A-Za-z0-9_\-. /]", "_", name)


def open_run(
    cfg: Config,
    run_name: str,
    *,
    parent_run_id: str | None = None,
    params: dict[str, Any] | None = None,
    artifact: tuple[str, str] | None = None,
) -> tuple[str, bool]:
    """(run id, resumed): the run tagged with `run_name`, set RUNNING again, or a new one (nested
    under `parent_run_id` if given) with `params` (default: the flattened config) and `artifact`
    (text, file name; default: the config as `config.yaml`)."""
    from mlflow.entities import Param

    uri = tracking_uri(cfg)
    client = _client(uri)
    exp_id = _experiment_id(client, cfg, uri)
    found = client.search_runs([exp_id], filter_string=f"tags.`{RUN_TAG}` = '{run_name}'", max_results=1)
    if found:
        run_id = found[0].info.run_id
        client.update_run(run_id, status="RUNNING")
        if ENDED_BY_TAG in found[0].data.tags:  # it runs again: no longer ended by that signal
            client.delete_tag(run_id, ENDED_BY_TAG)
        return run_id, True
    tags = {RUN_TAG: run_name} | ({"mlflow.parentRunId": parent_run_id} if parent_run_id else {})
    run = client.create_run(exp_id, run_name=cfg.tracking.run_name or run_name, tags=tags)
    run_id = run.info.run_id
    values = cfg.flat() if params is None else params
    logged = [Param(sanitize(k), str(v)[:6000]) for k, v in values.items()]
    for i in range(0, len(logged), 100):
        client.log_batch(run_id, params=logged[i : i + 100])
    text, name = artifact or (cfg.to_yaml(), "config.yaml")
    client.log_text(run_id, text, name)
    return run_id, False


def close_run(
    cfg: Config, run_id: str, *, failed: bool, checkpoint: str | None = None, ended_by: str | None = None
) -> None:
    """End the run as FINISHED or FAILED, tagging where its last checkpoint is; or, when a signal
    `ended_by` (e.g. "SIGTERM") stopped the driver, as KILLED with tag bism.ended_by saying so."""
    client = _client(tracking_uri(cfg))
    if checkpoint:
        client.set_tag(run_id, "checkpoint_path", checkpoint)
    if ended_by:
        client.set_tag(run_id, ENDED_BY_TAG, ended_by)
        client.set_terminated(run_id, status="KILLED")
        return
    client.set_terminated(run_id, status="FAILED" if failed else "FINISHED")


def close_children(cfg: Config, parent_run_id: str, failed: Callable[[str], bool]) -> int:
    """End the child runs of `parent_run_id` left RUNNING (a trial stopped early by the scheduler
    is interrupted before it can end its run): FAILED if failed(its name), else FINISHED with tag
    stopped_early=true. Returns how many were closed."""
    client = _client(tracking_uri(cfg))
    exp_id = _experiment_id(client, cfg, tracking_uri(cfg))
    left = client.search_runs(
        [exp_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent_run_id}' and attributes.status = 'RUNNING'"
    )
    for run in left:
        bad = failed(run.data.tags.get(RUN_TAG, ""))
        if not bad:
            client.set_tag(run.info.run_id, "stopped_early", "true")
        client.set_terminated(run.info.run_id, status="FAILED" if bad else "FINISHED")
    return len(left)


class RunLogger:
    """Metrics and artifacts to one run, from rank 0. `None`-safe: a logger with no run id logs nothing."""

    def __init__(self, uri: str | None, run_id: str | None):
        self.run_id = run_id
        self.client = _client(uri) if (uri and run_id) else None
        self.logged_through: dict[str, int] = {}  # metric key → the last step the run already holds

    def skip_logged_steps(self) -> None:
        """Read the run once: the last step of every metric it already holds (MLflow keeps each
        key's point of highest step as its latest). Steps up to it were logged by an earlier launch
        or attempt, past the checkpoint resumed from, and MLflow cannot delete points, so `metrics`
        leaves them out from now on instead of logging them twice."""
        if self.client is None:
            return
        for m in self.client.get_run(self.run_id).data.to_proto().metrics:
            self.logged_through[m.key] = max(int(m.step), self.logged_through.get(m.key, -1))

    def metrics(self, values: dict[str, float], step: int) -> None:
        """Log `values` at `step`, except keys the run already holds at this step or later."""
        values = {k: v for k, v in values.items() if step > self.logged_through.get(sanitize(k), -1)}
        if self.client is None or not values:
            return
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(
            self.run_id, metrics=[Metric(sanitize(k), float(v), now, step) for k, v in values.items()]
        )

    def artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        if self.client is not None:
            self.client.log_artifact(self.run_id, str(path), artifact_path)

    def text(self, text: str, artifact_file: str) -> None:
        if self.client is not None:
            self.client.log_text(self.run_id, text, artifact_file)

    def tag(self, key: str, value: str) -> None:
        if self.client is not None:
            self.client.set_tag(self.run_id, key, value)
