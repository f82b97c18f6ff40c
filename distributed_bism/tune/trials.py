"""A sweep's trials and its outcome, as plain data: the layer under runner.py (which runs the
trials) and report.py (which writes what they left), so neither imports the other's callers."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distributed_bism.config import Config
from distributed_bism.tune.spec import SweepSpec

DRIVER_CPU = 0.01  # the trial's driver function; its workers take the rest of each CPU


@dataclass
class SweepContext:
    """What every trial driver needs besides its sampled params (pickled to the trial actors)."""

    spec: SweepSpec
    sweep: str
    output_dir: str
    parent_run_id: str | None
    tracking_uri: str | None = None  # the parent's store: children go to the same one


def trial_config(ctx: SweepContext, params: dict[str, Any], trial_name: str) -> Config:
    """The trial's training config: the spec's base with its overrides and `params`, named after
    the trial, its files under the sweep's directory, its workers sized by the spec's resources."""
    cfg = ctx.spec.trial_config(params)
    r = ctx.spec.resources
    # spec.trial_config already sized the workers; the trial's driver takes DRIVER_CPU of one CPU
    trainer = dataclasses.replace(
        cfg.trainer,
        name=trial_name,
        output_dir=ctx.output_dir,
        cpus_per_worker=r.cpus_per_worker - DRIVER_CPU,
        max_failures=0,
    )
    tracking = dataclasses.replace(
        cfg.tracking, run_name=trial_name, tracking_uri=ctx.tracking_uri or cfg.tracking.tracking_uri
    )
    return dataclasses.replace(cfg, trainer=trainer, tracking=tracking)


@dataclass
class SweepResult:
    """What a finished sweep leaves behind."""

    name: str
    directory: Path
    parent_run_id: str | None
    table: list[dict[str, Any]]  # one row per trial, best first
    best_config: Path | None
    plots: list[Path]
