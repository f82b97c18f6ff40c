"""A trained model, rebuilt from a checkpoint: what `bism eval`, `bism sample` and `bism diagnose` start from.

    load_trained("outputs/ray_results/run/checkpoint_00001000")   a checkpoint directory
    load_trained("outputs/ray_results/run")                       its newest checkpoint
    load_trained("3f2a...")                                        an MLflow run id, through the
                                                                  run's `checkpoint_path` tag

The modules are built from the config stored in the checkpoint by the same builder the trainer
uses (`models.build.build_models`), then loaded with the checkpoint's θ (or its EMA) and φ.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from torch import nn

from distributed_bism.config import Config, ConfigError, from_dict
from distributed_bism.data.prepare import example_shapes
from distributed_bism.models.build import build_models
from distributed_bism.training.checkpointing import STATE_FILE, CheckpointError, LocalCheckpoints, load_state

RUN_ID = re.compile(r"[0-9a-f]{32}")  # MLflow's run ids


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
    checkpoint: Path
    data_shape: tuple[int, ...]
    image_shape: tuple[int, ...] = ()


def _checkpoint_of_run(run_id: str, tracking_uri: str | None) -> Path:
    from distributed_bism.tracking import tracking_uri as default_uri

    uri = tracking_uri or default_uri(Config())
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///") :]).is_file():  # never create a store here
        raise CheckpointError(
            f"{run_id}: not a checkpoint directory, and there is no MLflow store at {uri} "
            "to look the run id up in (pass --tracking-uri)"
        )
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    try:
        run = MlflowClient(uri).get_run(run_id)
    except MlflowException as e:
        raise CheckpointError(f"{run_id}: neither a checkpoint directory nor an MLflow run in {uri}") from e
    tag = run.data.tags.get("checkpoint_path")
    if not tag:
        raise CheckpointError(f"MLflow run {run_id} has no checkpoint_path tag (it never finished with a checkpoint)")
    return Path(tag)


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


def resolve_checkpoint(ref: str | Path, *, tracking_uri: str | None = None) -> Path:
    """The checkpoint directory `ref` names: a checkpoint directory, a run directory (its newest
    readable checkpoint), or an MLflow run id. A one-line CheckpointError naming `ref` otherwise."""
    path = Path(ref).expanduser()
    if path.is_dir():
        if (path / STATE_FILE).is_file():
            return path
        return newest_readable(path)
    if path.exists() or not RUN_ID.fullmatch(str(ref)):
        raise CheckpointError(f"{ref}: neither a checkpoint directory nor an MLflow run id")
    return _checkpoint_of_run(str(ref), tracking_uri)


def load_trained(
    ref: str | Path, *, tracking_uri: str | None = None, use_ema: bool = False, device: str | torch.device = "cpu"
) -> TrainedModel:
    """Rebuild the model of checkpoint `ref` (see resolve_checkpoint); θ is the EMA weights when
    `use_ema` and the checkpoint kept them. Raises CheckpointError with one line naming `ref`."""
    directory = resolve_checkpoint(ref, tracking_uri=tracking_uri)
    state = load_state(directory)
    try:
        cfg = from_dict(Config, yaml.safe_load(state["config"]))
    except (ConfigError, yaml.YAMLError, KeyError) as e:
        raise CheckpointError(f"{directory}: its stored config is not usable ({e})") from e
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
            f"{directory}: weights do not fit the stored config ({str(e).strip().splitlines()[0]})"
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
    )
