"""`bism eval` and `bism sample`: evaluation and sampling of a trained model, outside training.

bism eval CHECKPOINT_OR_MODEL [--metrics m1 m2 ...]    a table, logged into the model's own MLflow
    run at the model's step (no new run; artifacts under eval/step_XXXXXXXX_<time>/, beside, never
    over, what training logged) and, for a model named through MLflow (models:/..., m-..., a run
    id), linked to that LoggedModel too; and as rows of the run's MLflow table eval_results.json
    (evaluation, step, metric, value), which gains rows with each `bism eval`
bism sample CHECKPOINT -n 64 --sampler NAME -o grid.png|samples.npz|samples.pt [--force]
    .png: the figure; .npz / .pt: the samples themselves (see `write_samples`) and the figure
    beside them (same name, .png)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from distributed_bism.commands.trained import load_trained
from distributed_bism.data.prepare import prepare_data
from distributed_bism.evaluation.figures import save_sample_figure
from distributed_bism.evaluation.metrics import EvalContext, check_metric_names, run_metrics
from distributed_bism.evaluation.sample_grid import draw_samples
from distributed_bism.samplers import SAMPLERS
from distributed_bism.training.checkpointing import STATE_FILE

EVAL_TABLE = "eval_results.json"  # the MLflow table of every `bism eval` of a run, one row per metric (appended)


@dataclass
class EvalReport:
    """What `bism eval` measured: eval/* values, remarks, files, and the run they were logged to."""

    values: dict[str, float]
    step: int
    source: str  # the checkpoint directory, or the MLflow model, evaluated
    run_id: str | None
    notes: list[str] = field(default_factory=list)
    artifacts: dict[str, Path] = field(default_factory=dict)

    def table(self) -> str:
        width = max([len(k) for k in self.values] + [6])
        lines = [
            f"model {self.source} (step {self.step})",
            f"{'metric':<{width}}  value",
            f"{'-' * width}  {'-' * 12}",
        ]
        lines += [f"{k:<{width}}  {v:.6g}" for k, v in self.values.items()]
        lines += [f"note: {n}" for n in self.notes]
        lines += [f"{name}: {path}" for name, path in self.artifacts.items()]
        return "\n".join(lines)


def evaluate_checkpoint(
    ref: str | Path,
    *,
    metrics: list[str] | None = None,
    tracking_uri: str | None = None,
    log: bool = True,
    output_dir: Path | None = None,
    use_ema: bool = False,
) -> EvalReport:
    """Run `metrics` (default: the run's eval.metrics) on checkpoint `ref` in this process and log
    them to the checkpoint's MLflow run at its step. Bad metric names and refs raise before any work."""
    from distributed_bism.tracking import RunLogger, artifact_stamp, check_tracking_uri, tracking_uri_key
    from distributed_bism.tracking import tracking_uri as default_uri

    if metrics:
        check_metric_names(metrics, "--metrics")
    trained = load_trained(ref, tracking_uri=tracking_uri, use_ema=use_ema)
    cfg = trained.cfg
    names = metrics or cfg.eval.metrics
    stamp = artifact_stamp(trained.step)
    out = output_dir or Path(cfg.trainer.output_dir) / "evals" / str(cfg.trainer.name) / stamp
    run_id = trained.run_id if log else None
    uri = tracking_uri or default_uri(cfg)
    if run_id:  # the store is checked before any work, as `bism train` checks it
        check_tracking_uri(uri, key="--tracking-uri" if tracking_uri else tracking_uri_key(cfg))
    logger = RunLogger(uri, run_id) if run_id else None
    data = prepare_data(cfg)
    ctx = EvalContext(
        cfg=cfg,
        energy=trained.energy,
        posterior=trained.posterior,
        train_data=data.train,
        test_data=data.test,
        image_shape=data.image_shape,
        step=trained.step,
        device=torch.device("cpu"),
        output_dir=out,
        logger=logger,
        artifact_root=f"eval/{stamp}",
    )
    values = run_metrics(names, ctx, progress=True)
    if logger is not None and values:
        logger.metrics(values, trained.step, model_id=trained.model_id)
        logger.table(
            [{"evaluation": stamp, "step": trained.step, "metric": k, "value": v} for k, v in values.items()],
            EVAL_TABLE,
        )
    return EvalReport(values, trained.step, trained.source, run_id, ctx.notes, ctx.artifacts)


SAMPLE_SUFFIXES = (".png", ".npz", ".pt")


def sample_outputs(out: Path) -> list[Path]:
    """The files `bism sample -o out` writes: out itself, and for .npz / .pt the figure beside it."""
    if out.suffix not in SAMPLE_SUFFIXES:
        raise ValueError(
            f"-o {out}: the file name must end in {', '.join(SAMPLE_SUFFIXES)} "
            "(a figure, or the samples as numpy or torch arrays with a figure beside them)"
        )
    return [out] if out.suffix == ".png" else [out, out.with_suffix(".png")]


def check_sample_outputs(out: Path, *, force: bool) -> list[Path]:
    """The files `-o out` will write, refused before any work: an unknown suffix, a directory, a
    checkpoint directory (even with --force: samples must never replace a model), an existing
    file without `force`, or a directory where no file can be created (else the error would come
    after sampling, as a traceback)."""
    import tempfile

    outputs = sample_outputs(out)
    if any(p.is_dir() for p in outputs):
        raise FileExistsError(f"{next(p for p in outputs if p.is_dir())} is a directory; -o names a file")
    if (out.parent / STATE_FILE).exists():
        raise FileExistsError(f"-o {out}: {out.parent} is a checkpoint directory; write samples elsewhere")
    existing = [p for p in outputs if p.exists()]
    if existing and not force:
        raise FileExistsError(f"{existing[0]} exists; choose another -o or pass --force to replace it")
    # Probe the nearest directory that exists: creating out.parent now would write before the
    # other arguments are checked (save_sample_figure creates it).
    there = next(p for p in (out.parent, *out.parent.parents) if p.exists() or p == Path(p.anchor or "."))
    try:
        if not there.is_dir():
            raise NotADirectoryError(20, f"{there} is not a directory")
        with tempfile.NamedTemporaryFile(dir=there, prefix=".bism-probe-"):
            pass
    except OSError as e:
        raise FileExistsError(f"-o {out}: cannot write in {out.parent} ({e.strerror or e})") from e
    return outputs


def write_samples(
    path: Path, samples: Tensor, *, label: str, step: int, value_range: tuple[float, float] | None
) -> None:
    """The samples as arrays: `samples` (n, *shape) clipped to the data's range (images: [0, 1]),
    `raw` as the sampler left them, and `sampler`, `step`, `range`. .npz (numpy) or .pt (torch)."""
    raw = samples.detach().float().cpu()
    clipped = raw.clamp(*value_range) if value_range else raw
    if path.suffix == ".npz":
        import numpy as np

        np.savez(
            path,
            samples=clipped.numpy(),
            raw=raw.numpy(),
            sampler=np.array(label),
            step=np.array(step),
            range=np.array(value_range if value_range else (np.nan, np.nan)),
        )
    else:
        torch.save({"samples": clipped, "raw": raw, "sampler": label, "step": step, "range": value_range}, path)


def sample_checkpoint(
    ref: str | Path,
    out: Path,
    *,
    n: int = 64,
    sampler: str = "conditional",
    seed: int = 0,
    force: bool = False,
    tracking_uri: str | None = None,
    use_ema: bool = False,
) -> list[Path]:
    """Draw n samples of checkpoint `ref` with `sampler` and write them to `out` (.png: a figure titled
    with the sampler; .npz / .pt: the samples, and the figure beside them). Returns the files written.
    Existing files are refused unless `force`, and bad arguments too, before any work."""
    from distributed_bism.data import data_range

    outputs = check_sample_outputs(out, force=force)
    if sampler not in SAMPLERS:
        raise ValueError(f"--sampler: unknown sampler {sampler!r}; expected one of {', '.join(sorted(SAMPLERS))}")
    if n < 1:
        raise ValueError(f"-n must be >= 1, got {n}")
    trained = load_trained(ref, tracking_uri=tracking_uri, use_ema=use_ema)
    test = prepare_data(trained.cfg).test
    drawn = draw_samples(trained.cfg, trained.energy, trained.posterior, test, n, sampler=sampler, seed=seed)
    title = f"{trained.cfg.trainer.name} at step {trained.step}: {len(drawn.samples)} samples — {drawn.label}"
    value_range = data_range(trained.cfg.data.name)
    samples = drawn.samples.reshape(len(drawn.samples), *trained.image_shape)
    if len(outputs) == 2:
        write_samples(out, samples, label=drawn.label, step=trained.step, value_range=value_range)
    save_sample_figure(samples, trained.image_shape, outputs[-1], title=title, reference=test[:n])
    return outputs
