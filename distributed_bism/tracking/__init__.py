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

import contextlib
import os
import re
import socket
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC
from pathlib import Path
from typing import Any

from distributed_bism.config import Config, ConfigError
from distributed_bism.tracking.locks import retry_locked

RUN_TAG = "bism.run"  # trainer.name, to find the run again on resume
ENDED_BY_TAG = "bism.ended_by"  # the signal that stopped the driver (run KILLED); removed on resume
MODEL_KIND_TAG = "bism.kind"  # on a LoggedModel: "final" (the run's model) or "checkpoint"
MODEL_STEP_TAG = "bism.step"  # on a LoggedModel: the training step of its weights
MODEL_ID_TAG = "bism.model_id"  # on a registered model version: the LoggedModel it registers
MODEL_TYPE = "distributed_bism"  # LoggedModel.model_type, and the flavor name in its MLmodel file
# The MLflow 3 UI opens an experiment by its kind: without this tag it guesses, and a run with no
# traces opened in the GenAI view ("Evaluations"); "custom_model_development" (the UI's "Machine
# learning" kind; mlflow/server/js ExperimentKind) opens the runs and their training charts.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
TRAINING_KIND = "custom_model_development"


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


def experiment_of(uri: str, run_id: str) -> str | None:
    """The experiment id of run `run_id` in store `uri`, or None when the store cannot say."""
    from mlflow.exceptions import MlflowException

    try:
        return str(_client(uri).get_run(run_id).info.experiment_id)
    except MlflowException:  # the run or store is gone: the address is a convenience, the run is done
        return None


def _experiment_id(client: Any, cfg: Config, uri: str) -> str:
    """The id of experiment tracking.experiment, created if missing, and marked as a training
    experiment (EXPERIMENT_KIND_TAG) unless it already says what kind it is."""
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    if exp is not None:
        if EXPERIMENT_KIND_TAG not in exp.tags:  # created before we marked ours, or by someone else
            client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, TRAINING_KIND)
        return exp.experiment_id
    location = None
    if uri.startswith("sqlite:"):
        location = (Path(cfg.trainer.output_dir).resolve() / "mlartifacts").as_uri()
    return client.create_experiment(
        cfg.tracking.experiment, artifact_location=location, tags={EXPERIMENT_KIND_TAG: TRAINING_KIND}
    )


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


IMAGE_PREFIX = "image:"  # RunLogger.logged_through's keys of images (metric keys have no ':')


@contextlib.contextmanager
def system_metrics(cfg: Config, uri: str | None, run_id: str | None, node: int | None) -> Iterator[None]:
    """MLflow's system metrics (CPU, memory, disk, network; GPU where pynvml finds one) of this
    machine, logged to the run as system/node_<node>/... while the block runs, when
    tracking.system_metrics is on and `node` is given.

    One monitor per node, not per process: the trainer starts it in the worker of local rank 0 of
    each node (node = its node rank) and in the one process of the local strategy (node 0); the
    driver starts none, since it may sit on a head node that trains nothing. The node_<N> level is
    what the MLflow UI groups system charts by. Its step continues from the run's last system
    step (resume_logging), so a relaunch adds to the curves instead of starting them over."""
    if not (cfg.tracking.system_metrics and uri and run_id and node is not None):
        yield
        return
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    monitor = SystemMetricsMonitor(
        run_id,
        sampling_interval=cfg.tracking.system_metrics_interval_s,
        resume_logging=True,
        node_id=f"node_{node}",
        tracking_uri=uri,
    )
    monitor.start()
    try:
        yield
    finally:
        monitor.finish()


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
        for f in self.client.list_artifacts(self.run_id, "images"):  # images/<key, / as ~>+step+<step>+...
            key, _, rest = Path(f.path).name.partition("+step+")
            if rest.split("+", 1)[0].isdigit():
                key = IMAGE_PREFIX + key.replace("~", "/")
                self.logged_through[key] = max(int(rest.split("+", 1)[0]), self.logged_through.get(key, -1))

    def metrics(self, values: dict[str, float], step: int, *, model_id: str | None = None) -> None:
        """Log `values` at `step`, except keys the run already holds at this step or later; linked
        to LoggedModel `model_id` too when given (an evaluation of that model)."""
        values = {k: v for k, v in values.items() if step > self.logged_through.get(sanitize(k), -1)}
        if self.client is None or not values:
            return
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        points = [Metric(sanitize(k), float(v), now, step, model_id=model_id) for k, v in values.items()]
        # Every step of every trial of a sweep writes here: a sqlite store may be locked by another
        # trial for longer than MLflow waits (tracking/locks.py). The same points are retried.
        client, run_id = self.client, self.run_id
        retry_locked(lambda: client.log_batch(run_id, metrics=points), f"metrics of step {step}")

    def model(self, directory: Path, *, step: int, kind: str, params: dict[str, Any]) -> str | None:
        """Log `directory` (weights-only, see `log_model`) as a LoggedModel of this run; its id,
        or None when nothing was logged (no run, or the run already holds it)."""
        if self.client is None or self.run_id is None:
            return None
        return log_model(self.client, self.run_id, directory, step=step, kind=kind, params=params)

    def image(self, path: Path, key: str, step: int) -> None:
        """The PNG at `path` as image `key` at `step` (`log_image(key=, step=)`): the run page's
        step slider then shows e.g. the sample grids over training. Logged synchronously, so the
        image is in the store when the evaluation returns."""
        key = sanitize(key)
        if self.client is None or step <= self.logged_through.get(IMAGE_PREFIX + key, -1):
            return  # a relaunch's evaluation at a step the run has the image of already
        from PIL import Image

        with Image.open(path) as im:
            self.client.log_image(self.run_id, im.convert("RGB"), key=key, step=step, synchronous=True)

    def table(self, rows: list[dict[str, Any]], artifact_file: str) -> None:
        """`rows` (one dict per row, the same keys) as an MLflow table `artifact_file` (.json), which
        the run's Artifacts tab (and the Evaluations view) shows as a table; MLflow appends rows
        when the file exists."""
        if self.client is None or not rows:
            return
        columns = {k: [r.get(k) for r in rows] for k in rows[0]}
        self.client.log_table(self.run_id, columns, artifact_file)

    def artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        if self.client is not None:
            self.client.log_artifact(self.run_id, str(path), artifact_path)

    def text(self, text: str, artifact_file: str) -> None:
        if self.client is not None:
            self.client.log_text(self.run_id, text, artifact_file)

    def tag(self, key: str, value: str) -> None:
        if self.client is not None:
            self.client.set_tag(self.run_id, key, value)


# --------------------------------------------------------------------------- models
# A model is an MLflow 3 LoggedModel whose artifacts are a weights-only checkpoint directory:
# state.pt (the dict `training.checkpointing.save_state` writes, without optimiser, RNG or
# objective state) beside an MLmodel file of flavor `distributed_bism`. Loading rebuilds the
# modules from the config in state.pt and reads it with torch.load(weights_only=True)
# (commands/trained.py): no pickled nn.Module, no code run on opening.
# mlflow.pytorch.log_model is not used: it pickles the module, or (pt2) stores a torch.export
# graph that needs an input example and loads as a graph, not as our modules.

MODEL_REF = re.compile(r"m-[0-9a-f]{32}")  # a LoggedModel id
RUN_ID = re.compile(r"[0-9a-f]{32}")  # MLflow's run ids


def is_model_ref(ref: str) -> bool:
    """Whether `ref` names a model through MLflow: models:/..., a LoggedModel id m-..., or a run id."""
    return ref.startswith("models:/") or bool(MODEL_REF.fullmatch(ref) or RUN_ID.fullmatch(ref))


class ModelNotFound(ValueError):
    """A model reference that names nothing in the store (one line naming it)."""


def _finalized(client: Any, model_id: str, build: Callable[[], None]) -> None:
    """build(), then the LoggedModel READY; FAILED (and the error raised) if build() raises, so a
    model is never left PENDING."""
    try:
        build()
    except BaseException:
        client.finalize_logged_model(model_id, "FAILED")
        raise
    client.finalize_logged_model(model_id, "READY")


def run_models(client: Any, run_id: str, kind: str) -> list[tuple[int, Any]]:
    """(step, LoggedModel) of the run's READY models of `kind` ("final" or "checkpoint"), oldest step
    first: the run's outputs, as MLflow links them (log_outputs)."""
    from mlflow.entities import LoggedModelStatus

    run = client.get_run(run_id)
    found = []
    for out in run.outputs.model_outputs if run.outputs else []:
        model = client.get_logged_model(out.model_id)
        if model.tags.get(MODEL_KIND_TAG) == kind and model.status == LoggedModelStatus.READY:
            found.append((int(out.step), model))
    return sorted(found, key=lambda sm: sm[0])


def log_model(client: Any, run_id: str, directory: Path, *, step: int, kind: str, params: dict[str, Any]) -> str | None:
    """Log `directory` (a weights-only checkpoint directory) as a LoggedModel of run `run_id` at
    `step`: named "model" (kind "final") or "checkpoint-XXXXXXXX", with `params` (the flattened
    config), tags bism.kind and bism.step, linked to the run as its output at `step`, and with the
    run's metrics at `step` (the last evaluation's eval/*, the train/* of that step) linked to it.
    Returns its id, or None when the run already holds a READY model of this kind at this step (a
    relaunch or a restarted worker group that trained nothing more logs it once)."""
    from mlflow.entities import LoggedModelOutput, Metric
    from mlflow.models import Model

    if any(s == step for s, _ in run_models(client, run_id, kind)):
        return None
    run = client.get_run(run_id)
    model = client.create_logged_model(
        run.info.experiment_id,
        name="model" if kind == "final" else f"checkpoint-{step:08d}",
        source_run_id=run_id,
        params={sanitize(k): str(v)[:6000] for k, v in params.items()},
        tags={MODEL_KIND_TAG: kind, MODEL_STEP_TAG: str(step), RUN_TAG: run.data.tags.get(RUN_TAG, "")},
        model_type=MODEL_TYPE,
    )

    def build() -> None:
        client.log_outputs(run_id, [LoggedModelOutput(model.model_id, step=step)])
        # The same key, value, step and time as the run's own points: the store keeps them once in
        # the run's history and adds them to the model's metrics (as mlflow's own log_model does).
        at_step = [m for m in run.data.to_proto().metrics if int(m.step) == step]
        linked = [Metric(m.key, m.value, m.timestamp, m.step, model_id=model.model_id) for m in at_step]
        for i in range(0, len(linked), 500):
            client.log_batch(run_id, metrics=linked[i : i + 500])
        spec = Model(artifact_path=model.artifact_location, run_id=run_id, model_uuid=model.model_id)
        spec.model_id = model.model_id
        spec.add_flavor(MODEL_TYPE, data="state.pt", step=step, loader="distributed_bism.load_trained")
        spec.save(str(directory / "MLmodel"))
        client.log_model_artifacts(model.model_id, str(directory))

    _finalized(client, model.model_id, build)
    return str(model.model_id)


def register_model(cfg: Config, run_id: str) -> tuple[str, str] | None:
    """Register the run's final model (its newest READY "final" LoggedModel) as a new version of
    tracking.registered_model_name; returns (name, version), or None when the run logged none.
    The version's source is the model's artifact location, and it carries the model id (tag
    bism.model_id; the LoggedModel's tag mlflow.modelVersions lists the versions, as MLflow's
    register_model does), so `models:/NAME/VERSION` finds the model in any store."""
    import json

    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS, ErrorCode

    name = cfg.tracking.registered_model_name
    if not name:
        return None
    client = _client(tracking_uri(cfg))
    finals = run_models(client, run_id, "final")
    if not finals:
        return None
    model = finals[-1][1]
    try:
        client.create_registered_model(name)
    except MlflowException as e:
        if e.error_code != ErrorCode.Name(RESOURCE_ALREADY_EXISTS):
            raise
    version = client.create_model_version(
        name, model.artifact_location, run_id=run_id, tags={MODEL_ID_TAG: model.model_id}, model_id=model.model_id
    )
    listed = json.loads(model.tags.get("mlflow.modelVersions", "[]"))
    listed.append({"name": name, "version": str(version.version)})
    client.set_logged_model_tags(model.model_id, {"mlflow.modelVersions": json.dumps(listed)})
    return name, str(version.version)


@dataclass
class ModelSource:
    """Where a model reference led: the LoggedModel id (None for a registered version that names
    none), the artifact location to download, and the MLflow run that trained it."""

    model_id: str | None
    location: str
    run_id: str | None


def resolve_model(ref: str, uri: str) -> ModelSource | None:
    """The model `ref` names in the store at `uri`: models:/NAME/VERSION, models:/NAME@alias,
    models:/m-... or m-... (a LoggedModel id), or a run id (its newest final model). None for a
    run that logged no model (an older run: commands/trained.py falls back to its checkpoint_path
    tag). A ModelNotFound naming `ref` when it names nothing."""
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE, RESOURCE_DOES_NOT_EXIST, ErrorCode

    missing = (ErrorCode.Name(RESOURCE_DOES_NOT_EXIST), ErrorCode.Name(INVALID_PARAMETER_VALUE))
    client = _client(uri)
    body = ref.removeprefix("models:/")
    try:
        if MODEL_REF.fullmatch(body):
            model = client.get_logged_model(body)
            return ModelSource(model.model_id, model.artifact_location, model.source_run_id)
        if ref.startswith("models:/"):
            name, at, alias = body.partition("@")
            if at:
                version = client.get_model_version_by_alias(name, alias)
            else:
                name, slash, number = body.rpartition("/")
                if not slash or not number.isdigit():
                    raise ModelNotFound(
                        f"{ref}: not a model URI; use models:/NAME/VERSION, models:/NAME@alias or models:/m-<id>"
                    )
                version = client.get_model_version(name, number)
            model_id = version.model_id or version.tags.get(MODEL_ID_TAG)
            location = client.get_model_version_download_uri(version.name, version.version)
            return ModelSource(model_id, location, version.run_id or None)
        finals = run_models(client, ref, "final")
    except MlflowException as e:
        if e.error_code in missing:
            raise ModelNotFound(f"{ref}: no such model or run in the MLflow store {uri} ({e.message})") from e
        raise
    if not finals:
        return None
    model = finals[-1][1]
    return ModelSource(model.model_id, model.artifact_location, ref)


def download_model(source: ModelSource, uri: str, dst: Path) -> Path:
    """The model's files (state.pt, MLmodel) copied from its artifact location into `dst`,
    whatever the artifact store (a local path, file://, s3://, gs://, an MLflow server's
    mlflow-artifacts:/); returns the local directory."""
    from mlflow.artifacts import download_artifacts

    return Path(download_artifacts(artifact_uri=source.location, tracking_uri=uri, dst_path=str(dst)))


def checkpoint_tag(uri: str, run_id: str) -> str | None:
    """The run's checkpoint_path tag (a local path the driver tagged at the end of the run), or None."""
    return _client(uri).get_run(run_id).data.tags.get("checkpoint_path")
