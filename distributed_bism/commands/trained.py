"""A trained model, rebuilt from a checkpoint or an MLflow model: what `bism eval`, `bism sample`
and `bism diagnose` start from.

    load_trained("outputs/ray_results/run/checkpoint_00001000")   a checkpoint directory
    load_trained("outputs/ray_results/run")                       its newest checkpoint
    load_trained("models:/grbm/3"), ("models:/grbm@best")         a registered model version
    load_trained("m-3f2a..."), ("models:/m-3f2a...")              a logged model (MLflow 3 LoggedModel)
    load_trained("3f2a...")                                        an MLflow run id: its final model
                                                                  (an older run that logged none: its
                                                                  `checkpoint_path` tag)

MLflow references are resolved in the store --tracking-uri names (else $MLFLOW_TRACKING_URI, else
outputs/mlflow.db) and the model's files downloaded from wherever its artifacts are (a local
directory, s3://, gs://, an MLflow server), into a temporary directory that is gone once loaded.
Either way the modules are built from the config stored beside the weights by the same builder the
trainer uses (`models.build.build_models`), then loaded with θ (or its EMA) and φ read by
`torch.load(weights_only=True)`: opening a model runs no code from it.
"""

from __future__ import annotations

import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from distributed_bism.config import Config, ConfigError, from_dict
from distributed_bism.data.prepare import example_shapes
from distributed_bism.models.build import build_models
from distributed_bism.training.checkpointing import STATE_FILE, CheckpointError, LocalCheckpoints, load_state

MODEL_REFS = "models:/NAME/VERSION, models:/NAME@alias, a model id m-... or an MLflow run id"


@dataclass
class TrainedModel:
    """A model at one checkpoint. `energy` and `posterior` are in eval mode on `device`.

    data_shape: what the energy takes per example, (D,) for a GRBM or (C, H, W) (data.prepare);
    image_shape: the data set's own example shape, for drawing samples.
    """

    cfg: Config
    energy: nn.Module
    posterior: nn.Module | None
    step: int
    run_id: str | None
    checkpoint: Path | None  # the local checkpoint directory; None for a model loaded through MLflow
    data_shape: tuple[int, ...]
    image_shape: tuple[int, ...] = ()
    source: str = ""  # what it was loaded from, for messages: the directory, or the reference and its model id
    model_id: str | None = None  # the MLflow LoggedModel, when loaded through MLflow
    posterior_optimizer: dict[str, Any] | None = None  # φ's Adam state, when stored


def _state_through_mlflow(ref: str, tracking_uri: str | None) -> tuple[dict[str, Any], str, Path | None, str | None]:
    """(state, source, local checkpoint directory or None, model id) of an MLflow reference (see
    the module's docstring), resolved in the store at `tracking_uri`."""
    from distributed_bism.tracking import ModelNotFound, checkpoint_tag, download_model, resolve_model
    from distributed_bism.tracking import tracking_uri as default_uri

    uri = tracking_uri or default_uri(Config())
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///") :]).is_file():  # never create a store here
        raise CheckpointError(
            f"{ref}: not a checkpoint directory, and there is no MLflow store at {uri} "
            "to look it up in (pass --tracking-uri)"
        )
    try:
        source = resolve_model(ref, uri)
    except ModelNotFound as e:
        raise CheckpointError(str(e)) from e
    if source is None:  # a run trained before models were logged: the checkpoint its driver tagged
        tag = checkpoint_tag(uri, ref)
        if not tag:
            raise CheckpointError(
                f"MLflow run {ref} has no logged model and no checkpoint_path tag (it never finished with a checkpoint)"
            )
        return load_state(tag), tag, Path(tag), None
    with tempfile.TemporaryDirectory(prefix="bism_model_") as tmp:
        state = load_state(download_model(source, uri, Path(tmp)))
    named = source.model_id and source.model_id not in ref
    return state, ref + (f" (model {source.model_id})" if named else ""), None, source.model_id


def newest_readable(run_dir: Path) -> Path:
    """The newest checkpoint of a run directory that loads. Newer ones that do not (cut short by a
    crash) are named on stderr and passed over, as training itself does on resume; an error
    naming the newest one's problem if none loads."""
    skipped: list[tuple[Path, CheckpointError]] = []
    found = LocalCheckpoints(run_dir).newest_readable(skipped)
    for _, error in skipped:
        print(f"bism: note: skipping unreadable checkpoint ({error})", file=sys.stderr)
    if found is not None:
        return found
    if skipped:
        raise CheckpointError(f"{run_dir}: no readable checkpoint; the newest: {skipped[0][1]}")
    raise CheckpointError(f"{run_dir}: no {STATE_FILE} and no checkpoint_XXXXXXXX/ directory in it")


def resolve_checkpoint(ref: str | Path) -> Path:
    """The local checkpoint directory `ref` names: a checkpoint directory, or a run directory (its
    newest readable checkpoint). A one-line CheckpointError naming `ref` otherwise."""
    path = Path(ref).expanduser()
    if not path.is_dir():
        raise CheckpointError(f"{ref}: not a checkpoint directory")
    if (path / STATE_FILE).is_file():
        return path
    return newest_readable(path)


def load_trained(
    ref: str | Path, *, tracking_uri: str | None = None, use_ema: bool = False, device: str | torch.device = "cpu"
) -> TrainedModel:
    """Rebuild the model `ref` names (see the module's docstring); θ is the EMA weights when
    `use_ema` and the checkpoint kept them. Raises CheckpointError with one line naming `ref`."""
    from distributed_bism.tracking import is_model_ref

    path = Path(ref).expanduser()
    directory: Path | None
    if path.is_dir():
        directory = resolve_checkpoint(path)
        state, source, model_id = load_state(directory), str(directory), None
    elif path.exists() or not is_model_ref(str(ref)):
        raise CheckpointError(f"{ref}: neither a checkpoint directory nor an MLflow model ({MODEL_REFS})")
    else:
        state, source, directory, model_id = _state_through_mlflow(str(ref), tracking_uri)
    try:
        cfg = from_dict(Config, yaml.safe_load(state["config"]))
    except (ConfigError, yaml.YAMLError, KeyError) as e:
        raise CheckpointError(f"{source}: its stored config is not usable ({e})") from e
    image_shape, input_shape = example_shapes(cfg)
    energy, posterior = build_models(cfg, input_shape, with_posterior=state.get("posterior") is not None)
    try:
        energy.load_state_dict(state["energy"])
        if use_ema and state.get("ema"):  # the EMA holds parameters only; buffers come from θ
            energy.load_state_dict(state["ema"], strict=False)
        if posterior is not None:
            posterior.load_state_dict(state["posterior"])
    except RuntimeError as e:  # shapes that do not match the stored config
        raise CheckpointError(
            f"{source}: weights do not fit the stored config ({str(e).strip().splitlines()[0]})"
        ) from e
    energy.to(device).eval()
    if posterior is not None:
        posterior.to(device).eval()
    return TrainedModel(
        cfg=cfg,
        energy=energy,
        posterior=posterior,
        step=int(state["step"]),
        run_id=state.get("mlflow_run_id"),
        checkpoint=directory,
        data_shape=input_shape,
        image_shape=image_shape,
        source=source,
        model_id=model_id,
        posterior_optimizer=state.get("posterior_optimizer"),
    )
