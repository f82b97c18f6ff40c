"""What a metric sees (EvalContext), what it is (Metric), and how an evaluation runs them.

    # in the metric's module, next to the estimator it wraps:
    @register_metric("test_loglik", all_ranks=True)
    def test_loglik(ctx: EvalContext) -> dict[str, float]:
        return {"eval/test_loglik": ...}

    # one line in distributed_bism/registry/metrics.py (the legal values of eval.metrics):
    "test_loglik": "distributed_bism.evaluation.loglik:test_loglik",

    values = run_metrics(["test_loglik", "samples"], ctx)      # {"eval/...": float}

A metric's module is imported when a run first asks for it, not when this module loads, so
validating a config or running one metric loads no other metric's dependencies.

Every rank of a training run calls `run_metrics` with the same names at the same step. A metric
declared with `all_ranks=True` is called on every rank and may use collectives (every rank
takes the same branches, so the collectives match; only rank 0's returned values are kept);
any other metric runs on rank 0 only. The sample-quality metrics are all-ranks metrics: each rank
draws and featurises its share of the samples (sample_shares.py) and the feature statistics are
reduced (feature_stats.py), so their cost divides by the number of ranks.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from distributed_bism.progress_bars import bar
from distributed_bism.registry import resolve
from distributed_bism.registry.metrics import METRICS

if TYPE_CHECKING:
    from distributed_bism.config import Config
    from distributed_bism.tracking import RunLogger


@dataclass
class EvalContext:
    """What a metric may use. `energy`/`posterior` are unwrapped (no DDP/DeepSpeed wrapper).

    train_data, test_data: (N, ...) in the shape the energy takes ((N, D) for a GRBM), on `device`;
    image_shape: one example as the data set has it ((C, H, W) or (2,)), for figures and classifiers;
    output_dir: where a metric writes files (figures, caches); logger: the MLflow run (rank 0), or None.
    artifacts: files a metric wrote this evaluation, by metric name (e.g. "samples" → the grid).
    """

    cfg: Config
    energy: nn.Module
    posterior: nn.Module | None
    train_data: Tensor | None
    test_data: Tensor | None
    image_shape: tuple[int, ...]
    step: int
    device: torch.device
    rank: int = 0
    world_size: int = 1
    output_dir: Path = Path("outputs")
    logger: RunLogger | None = None
    artifacts: dict[str, Path] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # one-line remarks (a metric skipped and why)
    shared: dict[str, Any] = field(default_factory=dict)  # computed once per evaluation, used by several metrics
    artifact_root: str = ""  # MLflow folder of this evaluation's artifacts ("": the run's top level)

    @property
    def run_name(self) -> str:
        return self.cfg.trainer.name or "run"

    def log_artifact(self, path: Path, artifact_path: str) -> None:
        """Log a file into folder `artifact_path` under artifact_root of the run (rank 0 with a logger only)."""
        if self.logger is not None and self.rank == 0:
            self.logger.artifact(path, "/".join(p for p in (self.artifact_root, artifact_path) if p))

    def log_image(self, path: Path, key: str) -> None:
        """Log a PNG as MLflow image `key` at this evaluation's step (rank 0 with a logger only): the
        run page's image step slider shows it beside the other steps' images of the same key."""
        if self.logger is not None and self.rank == 0:
            self.logger.image(path, key, self.step)


MetricFn = Callable[[EvalContext], dict[str, float]]


@dataclass(frozen=True)
class Metric:
    """A metric: `fn(ctx) -> {"eval/...": float}`, callable as the function itself."""

    name: str
    fn: MetricFn
    all_ranks: bool = False  # called on every rank (it has collectives); else rank 0 only

    def __call__(self, ctx: EvalContext) -> dict[str, float]:
        return self.fn(ctx)


def register_metric(name: str, *, all_ranks: bool = False) -> Callable[[MetricFn], Metric]:
    """Decorator: make `fn` the Metric `name`; its line in registry/metrics.py points at the result."""

    def declare(fn: MetricFn) -> Metric:
        return Metric(name, fn, all_ranks)

    return declare


def metric_names() -> tuple[str, ...]:
    return tuple(sorted(METRICS))


def check_metric_names(names: list[str], key: str = "eval.metrics") -> None:
    """A one-line ValueError naming `key` and the first unknown metric."""
    for name in names:
        if name not in METRICS:
            raise ValueError(f"{key}: unknown metric {name!r}; expected some of {', '.join(metric_names())}")


def get_metric(name: str) -> Metric:
    """The Metric registered as `name`, its module imported on first use."""
    check_metric_names([name])
    metric = resolve(METRICS[name])
    if not isinstance(metric, Metric) or metric.name != name:
        raise TypeError(f"registry/metrics.py: {name!r} points at {METRICS[name]}, which is not the metric {name!r}")
    return metric


def run_metrics(names: list[str], ctx: EvalContext, *, progress: bool = False) -> dict[str, float]:
    """Run the metrics `names` in order; {"eval/...": value} on rank 0, {} on the other ranks.
    `progress`: a bar over the metrics on a terminal (`bism eval`; training prints its own lines)."""
    check_metric_names(names)
    values: dict[str, float] = {}
    for name in bar(names, "eval", unit="metric") if progress else names:
        metric = get_metric(name)
        if metric.all_ranks or ctx.rank == 0:
            out = metric.fn(ctx)
            if ctx.rank == 0:
                values.update(out)
    return values
