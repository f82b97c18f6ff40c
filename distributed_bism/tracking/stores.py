"""MLflow tracking stores: the store a config names (`tracking_uri`), the checks run on it before
any worker starts or run opens (`check_tracking`, `check_tracking_uri`), and a client of it
(`mlflow_client`).

Default store: sqlite:///<output_dir>/mlflow.db, with artifacts under <output_dir>/mlartifacts
(with sqlite, MLflow would otherwise put them in ./mlruns of whatever directory it runs in; the
experiment's artifact location is set in runs.py).
"""

from __future__ import annotations

import os
import socket
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from distributed_bism.config import Config, ConfigError


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


def mlflow_client(uri: str) -> Any:
    """An MlflowClient of the store at `uri`."""
    from mlflow import MlflowClient  # mlflow takes seconds to import; only tracking code pays it

    return MlflowClient(tracking_uri=uri)
