"""A trained model leaving the training loop: its weights dict, the MLflow LoggedModel of a step,
and the final model file. Rank 0 only; nothing here is a collective."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from distributed_bism.models import unwrap
from distributed_bism.training.checkpointing import save_state

if TYPE_CHECKING:
    from distributed_bism.training.loop import TrainLoop


def model_weights(loop: TrainLoop) -> dict[str, Any]:
    """What a model is, without what only resuming needs (θ's optimiser, RNG streams, PCD
    chains): θ, EMA θ, φ and φ's Adam state (`bism diagnose` continues the unroll from it, as
    training does; None when ZeRO shards it), the step, the config and the MLflow run id.
    Rank 0's; a checkpoint dict (checkpointing.py) in every key it has."""
    r = loop.replica
    sharded = r.sharded_optimizer
    return {
        "step": loop.step,
        "energy": unwrap(r.energy).state_dict(),
        "ema": loop.ema.state_dict(),
        "posterior": unwrap(r.posterior).state_dict() if r.posterior is not None else None,
        "posterior_optimizer": None if sharded or r.posterior_updater is None else r.posterior_updater.state_dict(),
        "config": loop.cfg.to_yaml(),
        "mlflow_run_id": loop.run_id,
    }


def log_model(loop: TrainLoop, kind: str) -> str | None:
    """The weights at the loop's step as an MLflow LoggedModel of its run (tracking.log_model:
    state.pt, loaded with weights_only=True), with the config as its params and this step's
    metrics; `kind` "final" or "checkpoint". Returns its id; None without a run, or when the
    run already holds this model."""
    with tempfile.TemporaryDirectory(prefix="bism_model_") as tmp:
        save_state(tmp, model_weights(loop))
        return loop.logger.model(Path(tmp), step=loop.step, kind=kind, params=loop.cfg.flat())


def export_model(loop: TrainLoop, *, trained: bool) -> Path | None:
    """The final weights (θ, EMA θ, φ) and config as one safe-to-load file,
    <output_dir>/models/<name>/model.pt, and as the run's final MLflow LoggedModel (`log_model`;
    logged once per step, so a relaunch that trained nothing adds none). A relaunch that
    trained nothing (`trained` false) leaves an existing file alone. Returns the path written,
    None when nothing was."""
    log_model(loop, "final")
    cfg = loop.cfg.trainer
    path = Path(cfg.output_dir).resolve() / "models" / str(cfg.name) / "model.pt"
    if path.exists() and not trained:
        return None
    path.parent.mkdir(parents=True, exist_ok=True)
    weights = model_weights(loop)
    torch.save({k: weights[k] for k in ("step", "energy", "ema", "posterior", "config")}, path)
    return path
