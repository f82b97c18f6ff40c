"""Logged models: a run's models in MLflow (`log_model`, `register_model`), and a model reference
resolved and its files downloaded (`is_model_ref`, `resolve_model`, `download_model`,
`checkpoint_tag`).

A model is an MLflow 3 LoggedModel whose artifacts are a weights-only checkpoint directory:
state.pt (the dict `training.checkpointing.save_state` writes, without optimiser, RNG or
objective state) beside an MLmodel file of flavor `distributed_bism`. Loading rebuilds the
modules from the config in state.pt and reads it with torch.load(weights_only=True)
(commands/trained.py): no pickled nn.Module, no code run on opening.
mlflow.pytorch.log_model is not used: it pickles the module, or (pt2) stores a torch.export
graph that needs an input example and loads as a graph, not as our modules.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distributed_bism.config import Config
from distributed_bism.tracking.runs import RUN_TAG, sanitize
from distributed_bism.tracking.stores import mlflow_client, tracking_uri

MODEL_KIND_TAG = "bism.kind"  # on a LoggedModel: "final" (the run's model) or "checkpoint"
MODEL_STEP_TAG = "bism.step"  # on a LoggedModel: the training step of its weights
MODEL_ID_TAG = "bism.model_id"  # on a registered model version: the LoggedModel it registers
MODEL_TYPE = "distributed_bism"  # LoggedModel.model_type, and the flavor name in its MLmodel file

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
    client = mlflow_client(tracking_uri(cfg))
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
    client = mlflow_client(uri)
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
    return mlflow_client(uri).get_run(run_id).data.tags.get("checkpoint_path")
