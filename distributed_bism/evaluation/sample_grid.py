"""Model samples for evaluation, and the `samples` metric: a grid per evaluation, titled with the
sampler that drew it (conditional samples are not samples of the model's marginal), and a strip
of the grids over training.

Files (training): <output_dir>/samples/<run>/step_XXXXXXXX.png, the samples themselves as
step_XXXXXXXX.pt (the strip's source), and <output_dir>/plots/<run>/samples_over_training.png;
logged as MLflow artifacts samples/step_XXXXXXXX.png and plots/samples_over_training.png.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from distributed_bism.config import Config
from distributed_bism.evaluation.figures import save_sample_figure, save_sample_strip
from distributed_bism.evaluation.metrics import EvalContext, register_metric
from distributed_bism.sampler import SAMPLER_NAME, LangevinSchedule, conditional_samples

SAMPLER_NAMES = ("conditional", "gibbs", "joint_langevin", "marginal_langevin")


@dataclass
class Samples:
    """x: (n, ...) in the shape the energy takes; label: the sampler, in words."""

    x: Tensor
    label: str


def draw_samples(cfg: Config, energy: nn.Module, posterior: nn.Module | None, data: Tensor, n: int, *,
                 sampler: str | None = None, seed: int = 0) -> Samples:
    """n samples from `sampler` (default eval.sampler), with settings from cfg.eval; `data` (N, ...)
    gives the conditional sampler its codes h = E_q[h|v] (its first n rows). Uses its own
    generator, so the training RNG is untouched."""
    name = sampler or cfg.eval.sampler
    if name not in SAMPLER_NAMES:
        raise ValueError(f"unknown sampler {name!r}; expected one of {', '.join(SAMPLER_NAMES)}")
    e = cfg.eval
    schedule = LangevinSchedule(step=e.langevin_step_size, t_max=e.langevin_t_max, hot=e.langevin_steps[0],
                                anneal=e.langevin_steps[1], cool=e.langevin_steps[2], denoise_sigma=cfg.objective.sigma0)
    if name != "conditional":
        raise ValueError(f"sampler {name!r} is not available yet")
    return Samples(conditional_samples(energy, posterior, data[:n], schedule, seed=seed), SAMPLER_NAME)


def _strip(directory: Path, image_shape: tuple[int, ...], out: Path, label: str) -> Path | None:
    """The strip of every step_*.pt in `directory`, or None with fewer than two evaluations."""
    files = sorted(directory.glob("step_*.pt"))
    if len(files) < 2:
        return None
    rows = {int(f.stem.split("_")[1]): torch.load(f, weights_only=True) for f in files}
    return save_sample_strip(rows, image_shape, out, title=f"samples over training — {label}")


@register_metric("samples")
def samples_metric(ctx: EvalContext) -> dict[str, float]:
    """A grid of eval.num_samples samples of eval.sampler, and the strip over training (rank 0)."""
    data = ctx.test_data if ctx.test_data is not None else ctx.train_data
    if data is None:
        ctx.notes.append("samples: skipped (no data to condition on)")
        return {}
    n = min(ctx.cfg.eval.num_samples, len(data))
    drawn = draw_samples(ctx.cfg, ctx.energy, ctx.posterior, data, n, seed=ctx.cfg.trainer.seed)
    directory = ctx.output_dir / "samples" / ctx.run_name
    path = save_sample_figure(drawn.x, ctx.image_shape, directory / f"step_{ctx.step:08d}.png",
                              title=f"step {ctx.step} — {drawn.label}", reference=data[:n])
    torch.save(drawn.x.detach().cpu(), path.with_suffix(".pt"))
    ctx.artifacts["samples"] = path
    ctx.log_artifact(path, "samples")
    strip = _strip(directory, ctx.image_shape, ctx.output_dir / "plots" / ctx.run_name / "samples_over_training.png",
                   drawn.label)
    if strip is not None:
        ctx.artifacts["samples_over_training"] = strip
        ctx.log_artifact(strip, "plots")
    return {}
