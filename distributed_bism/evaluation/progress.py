"""Plots of a run's progress, redrawn at each evaluation and logged to its MLflow run: the test
log-likelihood against the training step. (Samples over training: sample_grid.py.)"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from distributed_bism.evaluation.figures import save_curve
from distributed_bism.evaluation.metrics import EvalContext

LOGLIK_KEY = "eval/test_loglik"


def logged_history(ctx: EvalContext, key: str) -> dict[int, float]:
    """step → value of `key` as the run's MLflow store has it (earlier launches included); {} untracked."""
    client = getattr(ctx.logger, "client", None)
    if client is None:
        return {}
    return {int(m.step): float(m.value) for m in client.get_metric_history(ctx.logger.run_id, key)}  # type: ignore[union-attr]


def log_loglik_curve(ctx: EvalContext, history: Mapping[int, float]) -> Path:
    """plots/<run>/test_loglik.png: this launch's `history` (step → nats) over what MLflow already
    holds, logged as the artifact plots/test_loglik.png (redrawn, so it always shows the whole run)."""
    points: dict[int | float, float] = dict(logged_history(ctx, LOGLIK_KEY).items())
    points.update(history.items())  # this launch's values over the logged ones
    how = "exact" if ctx.cfg.model.h_dim <= 20 else "AIS"
    path = ctx.output_dir / "plots" / ctx.run_name / "test_loglik.png"
    save_curve(
        points,
        path,
        xlabel="training step",
        ylabel="test log-likelihood (nats)",
        title=f"{ctx.run_name}: test log-likelihood ({how})",
    )
    ctx.log_artifact(path, "plots")
    return path
