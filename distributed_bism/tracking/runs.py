"""MLflow runs: the driver's run, opened and closed, and what else names or watches it.

The driver opens the run before any worker starts (`open_run`): it checks the store, creates
or finds the experiment, and creates the run, or finds the run of the same `trainer.name` to
continue it. It closes the run as FINISHED or FAILED whatever the workers did (`close_run`),
so a run is never left RUNNING by a crashed worker; and as KILLED when SIGTERM or Ctrl-C stops
the driver. Rank 0 logs metrics and artifacts to that run id through a `RunLogger`
(run_logger.py); the other ranks log nothing. Here too: the child runs of a sweep closed
(`close_children`), the machine's system metrics logged to the run (`system_metrics`), the run's
tags, and the names of keys (`sanitize`) and of evaluation artifacts (`artifact_stamp`).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterator
from datetime import UTC
from pathlib import Path
from typing import Any

from distributed_bism.config import Config
from distributed_bism.tracking.stores import mlflow_client, tracking_uri

RUN_TAG = "bism.run"  # trainer.name, to find the run again on resume
ENDED_BY_TAG = "bism.ended_by"  # the signal that stopped the driver (run KILLED); removed on resume
# The MLflow 3 UI opens an experiment by its kind: without this tag it guesses, and a run with no
# traces opened in the GenAI view ("Evaluations"); "custom_model_development" (the UI's "Machine
# learning" kind; mlflow/server/js ExperimentKind) opens the runs and their training charts.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
TRAINING_KIND = "custom_model_development"


def experiment_of(uri: str, run_id: str) -> str | None:
    """The experiment id of run `run_id` in store `uri`, or None when the store cannot say."""
    from mlflow.exceptions import MlflowException

    try:
        return str(mlflow_client(uri).get_run(run_id).info.experiment_id)
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
    client = mlflow_client(uri)
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
    client = mlflow_client(tracking_uri(cfg))
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
    client = mlflow_client(tracking_uri(cfg))
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
