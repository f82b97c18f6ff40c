"""Cheap signs that an image model is learning, for every evaluation: `denoise` and `energy_gap`.

denoise: the model's score used as a one-step denoiser on held-out data (Tweedie's formula).
    For ṽ = v + σε at a few σ spread over the trained range,

        v̂ = ṽ + s² · ∇ₓ log p(ṽ),     s = σ0 for (Bi)MDSM (its score is trained as (E[v|ṽ] − ṽ)/σ0²
                                          at every σ_i), s = σ for the other objectives,
        gain(σ) = 1 − mean ‖v̂ − v‖² / mean ‖ṽ − v‖²

    gain > 0: the score points towards the data; 0: a zero score; < 0: worse than the noisy input.
    ∇ₓ log p is the VaES estimate for latent models (L particles of q), the exact score of a GRBM,
    −∇ₓE for a marginal energy. eval/denoise_gain is the mean over the σ levels; each level is
    logged as eval/denoise_gain@σ.

energy_gap: mean E(uniform noise) − mean E(held-out data), with E(v, h) evaluated at the posterior
    mean h = E_q[h|v] for latent models (the free energy F(v) for a GRBM, E(v) for marginal energies).
    > 0: noise is less likely than data under the model.

Both use at most MAX_EXAMPLES held-out images and fixed seeds, so two
evaluations of the same model give the same numbers. Rank 0 only.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from distributed_bism.evaluation.metrics import EvalContext, register_metric
from distributed_bism.models import GaussianRBM
from distributed_bism.samplers.conditional import posterior_mean
from distributed_bism.samplers.langevin_samplers import model_score_fn

MAX_EXAMPLES = 256  # held-out images per evaluation
NUM_LEVELS = 3
VAES_PARTICLES = 10


def _held_out(ctx: EvalContext, metric: str) -> Tensor | None:
    """At most MAX_EXAMPLES test rows (training rows without a test split); None, with a note, without data."""
    data = ctx.test_data if ctx.test_data is not None else ctx.train_data
    if data is None:
        ctx.notes.append(f"{metric}: skipped (no held-out data)")
        return None
    return data[: min(MAX_EXAMPLES, len(data))]


def denoise_levels(ctx: EvalContext) -> list[float]:
    """NUM_LEVELS σ spread geometrically over the trained range (one σ for DSM)."""
    o = ctx.cfg.objective
    if o.name in ("bidsm", "dsm", "vages_dsm"):
        return [o.sigma]
    return torch.logspace(math.log10(o.sigma_begin), math.log10(o.sigma_end), NUM_LEVELS).tolist()


def denoise_gain(
    energy: nn.Module, posterior: nn.Module | None, v: Tensor, sigma: float, step_scale: float, *, seed: int = 0
) -> float:
    """1 − E‖v̂ − v‖² / E‖ṽ − v‖² for ṽ = v + σε, v̂ = ṽ + step_scale² · score(ṽ); v (B, ...)."""
    score, _ = model_score_fn(energy, posterior, num_particles=VAES_PARTICLES)
    gen = torch.Generator(device=v.device).manual_seed(seed)
    noisy = v + sigma * torch.randn(v.shape, generator=gen, device=v.device, dtype=v.dtype)
    with torch.random.fork_rng(devices=[]):  # VaES draws particles from the global RNG: keep training's intact
        torch.manual_seed(seed)
        denoised = noisy + step_scale**2 * score(noisy)
    return 1.0 - float(((denoised - v) ** 2).sum() / ((noisy - v) ** 2).sum())


@register_metric("denoise")
def denoise_metric(ctx: EvalContext) -> dict[str, float]:
    """eval/denoise_gain (mean over σ levels) and eval/denoise_gain@σ per level."""
    v = _held_out(ctx, "denoise")
    if v is None:
        return {}
    o = ctx.cfg.objective
    mdsm = o.name in ("bimdsm", "mdsm", "vages_mdsm")
    out = {}
    for i, sigma in enumerate(denoise_levels(ctx)):
        gain = denoise_gain(
            ctx.energy, ctx.posterior, v, sigma, o.sigma0 if mdsm else sigma, seed=ctx.cfg.trainer.seed + i
        )
        out[f"eval/denoise_gain@{sigma:.3g}"] = gain
    out["eval/denoise_gain"] = sum(out.values()) / len(out)
    return out


@torch.no_grad()
def mean_energy(energy: nn.Module, posterior: nn.Module | None, v: Tensor) -> float:
    """Mean energy of v (B, ...): E(v, E_q[h|v]) with a posterior, F(v) for a GRBM, E(v) otherwise."""
    if isinstance(energy, GaussianRBM):
        return float(energy.free_energy(v).mean())
    if posterior is not None:
        return float(energy(v, posterior_mean(posterior, v)).mean())
    return float(energy(v).mean())


@register_metric("energy_gap")
def energy_gap_metric(ctx: EvalContext) -> dict[str, float]:
    """eval/energy_gap = mean E(uniform noise) − mean E(held-out data), and both means."""
    v = _held_out(ctx, "energy_gap")
    if v is None:
        return {}
    gen = torch.Generator(device=v.device).manual_seed(ctx.cfg.trainer.seed)
    noise = torch.rand(v.shape, generator=gen, device=v.device, dtype=v.dtype)
    e_data, e_noise = mean_energy(ctx.energy, ctx.posterior, v), mean_energy(ctx.energy, ctx.posterior, noise)
    return {"eval/energy_gap": e_noise - e_data, "eval/energy_data": e_data, "eval/energy_noise": e_noise}
