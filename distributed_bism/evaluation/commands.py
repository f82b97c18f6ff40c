"""`bism eval` and `bism sample`: evaluation and sampling of a trained model, outside training.

    bism eval CHECKPOINT_OR_RUN_ID [--metrics m1 m2 ...]    a table, logged into the checkpoint's
        own MLflow run at the checkpoint's step (no new run; artifacts under eval/step_XXXXXXXX_<time>/,
        beside, never over, what training logged)
    bism sample CHECKPOINT -n 64 --sampler NAME -o grid.png [--force]
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from distributed_bism.evaluation.figures import save_sample_figure
from distributed_bism.evaluation.metrics import EvalContext, check_metric_names, run_metrics
from distributed_bism.evaluation.sample_grid import draw_samples
from distributed_bism.samplers import SAMPLERS
from distributed_bism.trained import TrainedModel, load_trained


@dataclass
class EvalReport:
    """What `bism eval` measured: eval/* values, remarks, files, and the run they were logged to."""

    values: dict[str, float]
    step: int
    checkpoint: Path
    run_id: str | None
    notes: list[str] = field(default_factory=list)
    artifacts: dict[str, Path] = field(default_factory=dict)

    def table(self) -> str:
        width = max([len(k) for k in self.values] + [6])
        lines = [f"checkpoint {self.checkpoint} (step {self.step})", f"{'metric':<{width}}  value",
                 f"{'-' * width}  {'-' * 12}"]
        lines += [f"{k:<{width}}  {v:.6g}" for k, v in self.values.items()]
        lines += [f"note: {n}" for n in self.notes]
        lines += [f"{name}: {path}" for name, path in self.artifacts.items()]
        return "\n".join(lines)


def _data(trained: TrainedModel) -> tuple[Tensor, Tensor]:
    """(train, test) of the run's data set, in the shape its energy takes."""
    from distributed_bism.data import load_dataset

    train, test = load_dataset(trained.cfg.data)
    return train.reshape(len(train), *trained.data_shape), test.reshape(len(test), *trained.data_shape)


def evaluate_checkpoint(ref: str | Path, *, metrics: list[str] | None = None, tracking_uri: str | None = None,
                        log: bool = True, output_dir: Path | None = None, use_ema: bool = False) -> EvalReport:
    """Run `metrics` (default: the run's eval.metrics) on checkpoint `ref` in this process and log
    them to the checkpoint's MLflow run at its step. Bad metric names and refs raise before any work."""
    from distributed_bism.tracking import RunLogger, artifact_stamp
    from distributed_bism.tracking import tracking_uri as default_uri

    if metrics:
        check_metric_names(metrics, "--metrics")
    trained = load_trained(ref, tracking_uri=tracking_uri, use_ema=use_ema)
    cfg = trained.cfg
    names = metrics or cfg.eval.metrics
    stamp = artifact_stamp(trained.step)
    out = output_dir or Path(cfg.trainer.output_dir) / "evals" / str(cfg.trainer.name) / stamp
    run_id = trained.run_id if log else None
    logger = RunLogger(tracking_uri or default_uri(cfg), run_id) if run_id else None
    train, test = _data(trained)
    ctx = EvalContext(cfg=cfg, energy=trained.energy, posterior=trained.posterior, train_data=train, test_data=test,
                      image_shape=trained.image_shape, step=trained.step, device=torch.device("cpu"),
                      output_dir=out, logger=logger, artifact_root=f"eval/{stamp}")
    values = run_metrics(names, ctx)
    if logger is not None and values:
        logger.metrics(values, trained.step)
    return EvalReport(values, trained.step, trained.checkpoint, run_id, ctx.notes, ctx.artifacts)


def sample_checkpoint(ref: str | Path, out: Path, *, n: int = 64, sampler: str = "conditional", seed: int = 0,
                      force: bool = False, tracking_uri: str | None = None, use_ema: bool = False) -> Path:
    """Draw n samples of checkpoint `ref` with `sampler` and write them to `out` as a figure titled
    with the sampler. An existing `out` is refused unless `force`; checked before any work."""
    if out.exists() and not force:
        raise FileExistsError(f"{out} exists; choose another -o or pass --force to replace it")
    if sampler not in SAMPLERS:
        raise ValueError(f"--sampler: unknown sampler {sampler!r}; expected one of {', '.join(sorted(SAMPLERS))}")
    if n < 1:
        raise ValueError(f"-n must be >= 1, got {n}")
    trained = load_trained(ref, tracking_uri=tracking_uri, use_ema=use_ema)
    _, test = _data(trained)
    drawn = draw_samples(trained.cfg, trained.energy, trained.posterior, test, n, sampler=sampler, seed=seed)
    title = f"{trained.cfg.trainer.name} at step {trained.step}: {len(drawn.samples)} samples — {drawn.label}"
    return save_sample_figure(drawn.samples, trained.image_shape, out, title=title, reference=test[:n])
