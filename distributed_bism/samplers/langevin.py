"""Annealed Langevin dynamics on an energy (the reference's sampler schedule, docs/methods.md §2).

    x ← x − ½α ∇ₓE(x) + √T √α ξ,   ξ ~ N(0, I),   √α = `step`

T is held at t_max for `hot` steps, decayed geometrically t_max → 1 over `anneal` steps, held at
1 for `settle` steps (0 in the reference), then decayed linearly 1 → 0 over `cool` steps; a final
denoising step x ← x − σ0² ∇ₓE follows (σ0 = `denoise_sigma`, 0 to skip it). The reference's
schedule cools to T = 0 for sharp images; to draw from p ∝ exp(−E) itself end at T = 1 (cool = 0,
denoise_sigma = 0) after enough `settle` steps: unadjusted Langevin, exact as the step shrinks.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

GradFn = Callable[[Tensor], Tensor]


@dataclass(frozen=True)
class LangevinSchedule:
    """Reference defaults: √α = 0.02, 500 steps at T=100, 2000 annealed to T=1, 200 to T=0, σ0 = 0.1."""

    step: float = 0.02
    t_max: float = 100.0
    hot: int = 500
    anneal: int = 2000
    cool: int = 200
    denoise_sigma: float = 0.1
    settle: int = 0

    def __post_init__(self) -> None:
        if (
            self.step <= 0
            or self.t_max <= 0
            or min(self.hot, self.anneal, self.cool, self.settle) < 0
            or self.denoise_sigma < 0
        ):
            raise ValueError(f"bad Langevin schedule {self}: need step > 0, t_max > 0, counts >= 0, denoise_sigma >= 0")

    def temperatures(self) -> Tensor:
        """T of every step, (hot + anneal + settle + cool,)."""
        hot = torch.full((self.hot,), self.t_max)
        anneal = (
            torch.logspace(torch.log10(torch.tensor(self.t_max)).item(), 0.0, self.anneal)
            if self.anneal
            else torch.empty(0)
        )
        cool = torch.linspace(1.0, 0.0, self.cool) if self.cool else torch.empty(0)
        return torch.cat([hot, anneal, torch.ones(self.settle), cool])


def energy_grad_fn(energy_fn: Callable[[Tensor], Tensor]) -> GradFn:
    """x (B, ...) ↦ ∇ₓ Σ_b energy_fn(x)_b, (B, ...), detached."""

    def grad(x: Tensor) -> Tensor:
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)
            (g,) = torch.autograd.grad(energy_fn(x).sum(), x)
        return g

    return grad


def langevin_with_grad(
    grad_fn: GradFn, x: Tensor, schedule: LangevinSchedule, generator: torch.Generator | None = None
) -> Tensor:
    """Run the schedule from x (B, ...) with grad_fn: x ↦ ∇ₓE(x) (B, ...). Returns x (B, ...), detached."""
    alpha = schedule.step**2
    x = x.detach().clone()
    for t in schedule.temperatures().tolist():
        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        x = x - 0.5 * alpha * grad_fn(x) + (t * alpha) ** 0.5 * noise
    if schedule.denoise_sigma > 0:
        x = x - schedule.denoise_sigma**2 * grad_fn(x)
    return x.detach()


def annealed_langevin(
    energy_fn: Callable[[Tensor], Tensor],
    x: Tensor,
    schedule: LangevinSchedule,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Run the schedule from x (B, ...) on energy_fn: x ↦ (B,) energies. Returns x (B, ...)."""
    return langevin_with_grad(energy_grad_fn(energy_fn), x, schedule, generator)


def reference_start(num_samples: int, data_shape: Sequence[int], ref: Tensor, gen: torch.Generator) -> Tensor:
    """v0 ~ N(0.5, 1) per pixel, the reference's start for every Langevin chain; (num_samples, *data_shape)."""
    return 0.5 + torch.randn((num_samples, *data_shape), generator=gen, dtype=ref.dtype, device=ref.device)
