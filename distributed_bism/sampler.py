"""Samplers used during training: the reference's *conditional* sampler (METHODS.md §2).

    h* = E_q[h | v_data]                       (the posterior mean at real data)
    v ~ p(v | h*)                              GRBM: exactly, N(b + σ² W h*, σ² I)
                                               deep EBLVM: annealed Langevin on E(·, h*)

Annealed Langevin:  x ← x − ½α ∇ₓE(x, h*) + √T √α ξ,  √α = step, with T held at t_max for
`hot` steps, decayed geometrically t_max → 1 over `anneal` steps, then linearly 1 → 0 over
`cool` steps, and finally one denoising step x ← x − σ0² ∇ₓE. These are samples of v given a
data point's code, not samples of the model's marginal; every artifact says so.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from distributed_bism.models import GaussianRBM, unwrap
from distributed_bism.models.posterior import Posterior

SAMPLER_NAME = "conditional: v ~ p(v | h = E_q[h|v_data])"


@dataclass(frozen=True)
class LangevinSchedule:
    """Reference defaults: √α = 0.02, 500 steps at T=100, 2000 annealed to T=1, 200 to T=0."""

    step: float = 0.02
    t_max: float = 100.0
    hot: int = 500
    anneal: int = 2000
    cool: int = 200
    denoise_sigma: float = 0.1

    def temperatures(self) -> Tensor:
        hot = torch.full((self.hot,), self.t_max)
        anneal = torch.logspace(torch.log10(torch.tensor(self.t_max)).item(), 0.0, self.anneal) if self.anneal else torch.empty(0)
        cool = torch.linspace(1.0, 0.0, self.cool) if self.cool else torch.empty(0)
        return torch.cat([hot, anneal, cool])


def annealed_langevin(energy_fn: "callable", x: Tensor, schedule: LangevinSchedule,  # type: ignore[valid-type]
                      generator: torch.Generator | None = None) -> Tensor:
    """Run the schedule from x (B, ...) on energy_fn: x ↦ (B,) energies. Returns x (B, ...)."""
    alpha = schedule.step ** 2
    x = x.detach().clone()

    def grad(x: Tensor) -> Tensor:
        x = x.detach().requires_grad_(True)
        (g,) = torch.autograd.grad(energy_fn(x).sum(), x)
        return g

    for t in schedule.temperatures().tolist():
        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        x = x - 0.5 * alpha * grad(x) + (t * alpha) ** 0.5 * noise
    return (x - schedule.denoise_sigma ** 2 * grad(x)).detach()


@torch.no_grad()
def posterior_mean(posterior: nn.Module, v: Tensor) -> Tensor:
    """E_q[h|v], (B, h_dim)."""
    q: Posterior = unwrap(posterior)  # type: ignore[assignment]
    return q.mean(q(v))


def conditional_samples(energy: nn.Module, posterior: nn.Module | None, v_data: Tensor, schedule: LangevinSchedule,
                        *, seed: int = 0) -> Tensor:
    """One sample of v per data point in v_data (B, ...), given h* = E_q[h|v_data]. For a GRBM
    without a posterior (single-level baselines) h* is the exact posterior mean."""
    core = unwrap(energy)
    gen = torch.Generator(device=v_data.device).manual_seed(seed)
    if isinstance(core, GaussianRBM):
        with torch.no_grad():
            h = posterior_mean(posterior, v_data) if posterior is not None else torch.sigmoid(core.posterior_logits(v_data))
            return core.sample_v(h, generator=gen)
    if posterior is None:
        raise ValueError("the conditional sampler of a deep EBLVM needs its posterior")
    h = posterior_mean(posterior, v_data)
    x0 = torch.rand(v_data.shape, generator=gen, device=v_data.device, dtype=v_data.dtype)
    was_training = core.training
    core.eval()
    try:
        return annealed_langevin(lambda x: core(x, h), x0, schedule, generator=gen)
    finally:
        core.train(was_training)
