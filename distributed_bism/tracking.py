"""MLflow tracking.

The driver opens the run before any worker starts (`open_run`): it checks the store, creates
or finds the experiment, and creates the run, or finds the run of the same `trainer.name` to
continue it. It closes the run as FINISHED or FAILED whatever the workers did (`close_run`),
so a run is never left RUNNING by a crashed worker. Rank 0 logs metrics and artifacts to that
run id through a `RunLogger`; the other ranks log nothing.

Default store: sqlite:///<output_dir>/mlflow.db, with artifacts under <output_dir>/mlartifacts
(with sqlite, MLflow would otherwise put them in ./mlruns of whatever directory it runs in).
"""

from __future__ import annotations

import os
import re
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from distributed_bism.config import Config, ConfigError, check_writable_dir

RUN_TAG = "bism.run"  # trainer.name, to find the run again on resume


def tracking_uri(cfg: Config) -> str:
    """tracking.tracking_uri, else $MLFLOW_TRACKING_URI, else the sqlite store under output_dir."""
    uri = cfg.tracking.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    return f"sqlite:///{(Path(cfg.trainer.output_dir).resolve() / 'mlflow.db')}"


def check_tracking_uri(uri: str, *, timeout: float = 5.0) -> None:
    """Fail fast, with the URI named, on a store that cannot be reached or written."""
    if uri.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as r:
                ok = r.status == 200
        except (urllib.error.URLError, OSError) as e:
            raise ConfigError(f"tracking.tracking_uri: MLflow server {uri} is unreachable ({getattr(e, 'reason', e)})") from e
        if not ok:
            raise ConfigError(f"tracking.tracking_uri: MLflow server {uri} is not healthy")
    elif uri.startswith("sqlite:///"):
        check_writable_dir(Path(uri[len("sqlite:///"):]).parent, f"tracking.tracking_uri ({uri})")
    elif uri.startswith(("file:", "/")) or re.match(r"^[A-Za-z]:", uri):
        raise ConfigError(f"tracking.tracking_uri: {uri} is a file store, which MLflow 3 runs only in maintenance "
                          "mode; use sqlite:///path/mlflow.db or an http(s) server")


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
    from datetime import datetime, timezone

    return f"step_{step:08d}_{datetime.now(timezone.utc).strftime('%Y%m%dT%H%M%S_%f')}"


def sanitize(name: str) -> str:
    """MLflow keys allow alphanumerics and `_ - . space /`."""
    return re.sub(r"[^A-Za-z0-9_\-. /]", "_", name)


def open_run(cfg: Config, run_name: str, *, parent_run_id: str | None = None,
             params: dict[str, Any] | None = None, artifact: tuple[str, str] | None = None) -> tuple[str, bool]:
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
        return run_id, True
    tags = {RUN_TAG: run_name} | ({"mlflow.parentRunId": parent_run_id} if parent_run_id else {})
    run = client.create_run(exp_id, run_name=cfg.tracking.run_name or run_name, tags=tags)
    run_id = run.info.run_id
    values = cfg.flat() if params is None else params
    logged = [Param(sanitize(k), str(v)[:6000]) for k, v in values.items()]
    for i in range(0, len(logged), 100):
        client.log_batch(run_id, params=logged[i:i + 100])
    text, name = artifact or (cfg.to_yaml(), "config.yaml")
    client.log_text(run_id, text, name)
    return run_id, False


def close_run(cfg: Config, run_id: str, *, failed: bool, checkpoint: str | None = None) -> None:
    """End the run as FINISHED or FAILED, tagging where its last checkpoint is."""
    client = _client(tracking_uri(cfg))
    if checkpoint:
        client.set_tag(run_id, "checkpoint_path", checkpoint)
    client.set_terminated(run_id, status="FAILED" if failed else "FINISHED")


def close_children(cfg: Config, parent_run_id: str, failed: Callable[[str], bool]) -> int:
    """End the child runs of `parent_run_id` left RUNNING (a trial stopped early by the scheduler
    is interrupted before it can end its run): FAILED if failed(its name), else FINISHED with tag
    stopped_early=true. Returns how many were closed."""
    client = _client(tracking_uri(cfg))
    exp_id = _experiment_id(client, cfg, tracking_uri(cfg))
    left = client.search_runs([exp_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent_run_id}' "
                                                      "and attributes.status = 'RUNNING'")
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

    def metrics(self, values: dict[str, float], step: int) -> None:
        if self.client is None:
            return
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(sanitize(k), float(v), now, step) for k, v in values.items()])

    def artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        if self.client is not None:
            self.client.log_artifact(self.run_id, str(path), artifact_path)

    def text(self, text: str, artifact_file: str) -> None:
        if self.client is not None:
            self.client.log_text(self.run_id, text, artifact_file)

    def tag(self, key: str, value: str) -> None:
        if self.client is not None:
            self.client.set_tag(self.run_id, key, value)
