"""Model samples for evaluation, and the `samples` metric: a grid per evaluation, titled with the
sampler that drew it (conditional samples are not samples of the model's marginal), and a strip
of the grids over training.

Files (training): <output_dir>/samples/<run>/step_XXXXXXXX.png, the samples themselves as
step_XXXXXXXX.pt (the strip's source), and <output_dir>/plots/<run>/samples_over_training.png;
logged as MLflow artifacts samples/step_XXXXXXXX.png and plots/samples_over_training.png, and
each grid as MLflow image "samples" at its step (`log_image(key=, step=)`: the run page's step
slider shows the samples over training). Each sampler of eval.compare_samplers adds its grid as
samples/<run>/<sampler>/step_XXXXXXXX.png, image "samples_<sampler>" (no "/":
in the same section of the run page's charts as "samples", side by side).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from distributed_bism.config import Config
from distributed_bism.evaluation.figures import save_sample_figure, save_sample_strip
from distributed_bism.evaluation.metrics import EvalContext, register_metric
from distributed_bism.samplers import SAMPLERS, SampleResult, get_sampler, sampler_class


def sampler_settings(cfg: Config, name: str) -> dict[str, Any]:
    """eval.langevin_* as the schedule of a Langevin-based sampler (σ0 denoises); {} for the others."""
    if "schedule" not in {f.name for f in dataclasses.fields(sampler_class(name))}:  # type: ignore[arg-type]
        return {}
    e = cfg.eval
    hot, anneal, cool = e.langevin_steps
    return {
        "step": e.langevin_step_size,
        "t_max": e.langevin_t_max,
        "hot": hot,
        "anneal": anneal,
        "cool": cool,
        "denoise_sigma": cfg.objective.sigma0,
    }


def draw_samples(
    cfg: Config,
    energy: nn.Module,
    posterior: nn.Module | None,
    data: Tensor,
    n: int,
    *,
    sampler: str | None = None,
    seed: int = 0,
) -> SampleResult:
    """n samples (n, *data.shape[1:]) of `sampler` (default eval.sampler) with cfg.eval's schedule;
    `data` (N, ...) gives the conditional sampler its codes h = E_q[h|v] (its first n rows) and
    the shape. The samplers use their own generators: the training RNG is untouched."""
    name = sampler or cfg.eval.sampler
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; expected one of {', '.join(sorted(SAMPLERS))}")
    return get_sampler(name, **sampler_settings(cfg, name)).sample(
        energy, posterior, num_samples=n, data_shape=tuple(data.shape[1:]), v_data=data, seed=seed
    )


def _strip(directory: Path, image_shape: tuple[int, ...], out: Path, label: str) -> Path | None:
    """The strip of every step_*.pt in `directory`, or None with fewer than two evaluations."""
    files = sorted(directory.glob("step_*.pt"))
    if len(files) < 2:
        return None
    rows = {int(f.stem.split("_")[1]): torch.load(f, weights_only=True) for f in files}
    return save_sample_strip(rows, image_shape, out, title=f"samples over training — {label}")


def out_of_range(samples: Tensor, value_range: tuple[float, float] | None) -> float:
    """The fraction of sample values outside the data's range (0 when the set has none)."""
    if value_range is None:
        return 0.0
    lo, hi = value_range
    return float(((samples < lo) | (samples > hi)).float().mean())


@register_metric("samples")
def samples_metric(ctx: EvalContext) -> dict[str, float]:
    """A grid of eval.num_samples samples of eval.sampler, and the strip over training (rank 0);
    eval/samples_out_of_range, the fraction of sample values outside the data's range (the grid
    clips them; no sampler clamps its chain, as in the reference)."""
    from distributed_bism.data import data_range

    data = ctx.test_data if ctx.test_data is not None else ctx.train_data
    if data is None:
        ctx.notes.append("samples: skipped (no data to condition on)")
        return {}
    n = min(ctx.cfg.eval.num_samples, len(data))
    directory = ctx.output_dir / "samples" / ctx.run_name
    drawn = draw_samples(ctx.cfg, ctx.energy, ctx.posterior, data, n, seed=ctx.cfg.trainer.seed)
    path = save_sample_figure(
        drawn.samples,
        ctx.image_shape,
        directory / f"step_{ctx.step:08d}.png",
        title=f"step {ctx.step} — {drawn.label}",
        reference=data[:n],
    )
    torch.save(drawn.samples.detach().cpu(), path.with_suffix(".pt"))
    ctx.artifacts["samples"] = path
    ctx.log_artifact(path, "samples")
    ctx.log_image(path, "samples")
    for name in ctx.cfg.eval.compare_samplers:  # e.g. model samples beside conditional ones, in a folder each
        if name != ctx.cfg.eval.sampler:
            other = draw_samples(ctx.cfg, ctx.energy, ctx.posterior, data, n, sampler=name, seed=ctx.cfg.trainer.seed)
            grid = save_sample_figure(
                other.samples,
                ctx.image_shape,
                directory / name / f"step_{ctx.step:08d}.png",
                title=f"step {ctx.step} — {other.label}",
                reference=data[:n],
            )
            ctx.artifacts[f"samples_{name}"] = grid
            ctx.log_artifact(grid, f"samples/{name}")
            ctx.log_image(grid, f"samples_{name}")
    strip = _strip(
        directory, ctx.image_shape, ctx.output_dir / "plots" / ctx.run_name / "samples_over_training.png", drawn.label
    )
    if strip is not None:
        ctx.artifacts["samples_over_training"] = strip
        ctx.log_artifact(strip, "plots")
    return {"eval/samples_out_of_range": out_of_range(drawn.samples, data_range(ctx.cfg.data.name))}
