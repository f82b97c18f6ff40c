"""What a sweep leaves: a results table (best first), the best trial as a training YAML, and
plots of the metric against each searched key (unroll depth K, learning rates ...), written
under <output_dir>/sweeps/<sweep>/ and logged to the parent MLflow run (the table also as the
MLflow table sweep_results.json, which the run's Artifacts tab shows as a table)."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from distributed_bism.tune.trials import SweepContext, SweepResult, trial_config

if TYPE_CHECKING:
    from distributed_bism.tune.spec import SweepSpec


def _rows(spec: SweepSpec, grid: Any) -> list[dict[str, Any]]:
    """One row per trial: name, status, its sampled params, the last and best reported metric."""
    rows = []
    for result in grid:
        history = result.metrics_dataframe
        values = (
            [] if history is None or spec.metric not in history else [float(v) for v in history[spec.metric] if v == v]
        )  # drop NaN
        best = (max if spec.mode == "max" else min)(values) if values else None
        metrics = result.metrics or {}
        iterations = int(metrics.get("training_iteration", 0))
        max_t = spec.scheduler.max_t
        status = "ERROR" if result.error else "stopped early" if max_t is not None and iterations < max_t else "done"
        rows.append(
            {
                "trial": metrics.get("trial_id") or (Path(result.path).name if result.path else "?"),
                "status": status,
                "iterations": iterations,
                spec.metric: best,
                "last": values[-1] if values else None,
                **{k: result.config.get(k) for k in spec.search},
            }
        )
    sign = -1 if spec.mode == "max" else 1
    return sorted(rows, key=lambda r: (r[spec.metric] is None, sign * (r[spec.metric] or 0.0)))


def markdown_table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "(no trials)\n"
    cols = list(rows[0])

    def fmt(v: Any) -> str:
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r[c]) for c in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def plot(spec: SweepSpec, rows: list[dict[str, Any]], path: Path) -> Path:
    """The best metric of each trial against each searched key (log x for loguniform keys)."""
    from distributed_bism.evaluation.figures import finish_figure, pyplot

    plt = pyplot()
    keys = list(spec.search)
    fig, axes = plt.subplots(1, len(keys), figsize=(3.6 * len(keys), 3.2), squeeze=False)
    for ax, key in zip(axes[0], keys):
        pts = [(r[key], r[spec.metric]) for r in rows if r[spec.metric] is not None and r[key] is not None]
        ax.scatter([p[0] for p in pts], [p[1] for p in pts])
        if spec.search[key].kind == "loguniform":
            ax.set_xscale("log")
        ax.set_xlabel(key)
        ax.set_ylabel(f"{spec.metric} ({spec.mode})")
        ax.grid(alpha=0.3)
    fig.suptitle(f"sweep {spec.name}: {len(rows)} trials", fontsize=9)
    finish_figure(fig, path, dpi=110)
    return path


LOGLIK = "eval/test_loglik"
SWEEP_TABLE = "sweep_results.json"  # the results table as an MLflow table of the parent run
UNROLL_KEY = "objective.unroll_steps"


def loglik_vs_unroll(spec: SweepSpec, grid: Any, path: Path) -> Path | None:
    """For sweeps that search K (objective.unroll_steps) and report eval/test_loglik (GRBMs): each
    trial's last test log-likelihood against K, mean ± sd over the trials of each K; else None."""
    from distributed_bism.evaluation.figures import save_curve

    if UNROLL_KEY not in spec.search:
        return None
    by_k: dict[int, list[float]] = {}
    for result in grid:
        history = result.metrics_dataframe
        k = result.config.get(UNROLL_KEY)
        values = [] if history is None or LOGLIK not in history else [float(v) for v in history[LOGLIK] if v == v]
        if values and k is not None:
            by_k.setdefault(int(k), []).append(values[-1])
    if not by_k:
        return None
    means: dict[int | float, float] = {k: sum(v) / len(v) for k, v in by_k.items()}
    sds: dict[int | float, float] = {
        k: (sum((x - means[k]) ** 2 for x in v) / (len(v) - 1)) ** 0.5 if len(v) > 1 else 0.0 for k, v in by_k.items()
    }
    trials = sum(len(v) for v in by_k.values())
    return save_curve(
        means,
        path,
        xlabel="unrolled steps K",
        ylabel="last test log-likelihood (nats)",
        spread=sds,
        title=f"sweep {spec.name}: test log-likelihood against K ({trials} trials; mean ± sd over trials)",
    )


def write_results(
    spec: SweepSpec, sweep: str, sweep_dir: Path, grid: Any, ctx: SweepContext, *, parent_uri: str | None
) -> SweepResult:
    """Table (Markdown + JSON), best_config.yaml, plot; printed, written and logged to the parent run."""
    from distributed_bism.tracking import RunLogger

    sweep_dir.mkdir(parents=True, exist_ok=True)
    rows = _rows(spec, grid)
    table = markdown_table(rows)
    (sweep_dir / "results.md").write_text(table)
    (sweep_dir / "results.json").write_text(json.dumps(rows, indent=1, default=str))
    best_path = None
    if (
        rows
        and rows[0][spec.metric] is not None
        and not (isinstance(rows[0][spec.metric], float) and math.isnan(rows[0][spec.metric]))
    ):
        params = {k: rows[0][k] for k in spec.search}
        cfg = trial_config(ctx, params, "best")
        # ready to use: a fresh name and the default places, the trial's set-up otherwise
        cfg = dataclasses.replace(
            cfg,
            trainer=dataclasses.replace(
                cfg.trainer, name=None, output_dir="outputs", max_failures=2, cpus_per_worker=1.0
            ),
            tracking=dataclasses.replace(cfg.tracking, run_name=None),
        )
        best_path = sweep_dir / "best_config.yaml"
        best_path.write_text(
            f"# best trial of sweep {sweep}: {rows[0]['trial']}, "
            f"{spec.metric} = {rows[0][spec.metric]:.6g}\n" + cfg.to_yaml()
        )
    plots = [plot(spec, rows, sweep_dir / "metric_vs_params.png")] if rows else []
    by_k = loglik_vs_unroll(spec, grid, sweep_dir / "test_loglik_vs_K.png")
    plots += [by_k] if by_k else []
    logger = RunLogger(parent_uri, ctx.parent_run_id)
    logger.table(rows, SWEEP_TABLE)
    for f in [sweep_dir / "results.md", sweep_dir / "results.json", *([best_path] if best_path else []), *plots]:
        logger.artifact(f)
    print(f"sweep {sweep!r}: {len(rows)} trials, best first\n{table}", flush=True)
    if best_path:
        print(f"best config: {best_path}  (train it: bism train {best_path})", flush=True)
    return SweepResult(
        name=sweep, directory=sweep_dir, parent_run_id=ctx.parent_run_id, table=rows, best_config=best_path, plots=plots
    )
