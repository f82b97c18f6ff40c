"""Data perturbations shared by the score-matching objectives.

A `Perturbation` turns a clean batch v (B, ...) into a `NoisyBatch`:
- "gaussian" (DSM):    ṽ = v + σ ε,      one σ for the batch;
- "multiscale" (MDSM): ṽ = v + σ_i ε,    σ_i = linspace(σ_begin, σ_end, B)_i, or its
                       geometric (logspace) version; deterministic per position in the batch;
- "rademacher" (SSM):  ṽ = v, plus a Rademacher probe u;
- "none" (CD, PCD):    ṽ = v, nothing drawn.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class NoisyBatch:
    """A perturbed batch. `x` is ṽ, shape (B, ...): a fresh leaf that requires grad, except for
    the "none" perturbation, where it is v itself.

    eps: the Gaussian noise ε (B, ...), or None. sigma: per-example σ_i (B,), or None.
    u: the Rademacher probe (B, ...), or None.
    """

    v: Tensor
    x: Tensor
    eps: Tensor | None = None
    sigma: Tensor | None = None
    u: Tensor | None = None

    def sigma_like_x(self) -> Tensor:
        """σ_i broadcastable against x: (B, 1, ..., 1)."""
        assert self.sigma is not None
        return self.sigma.view(-1, *([1] * (self.x.dim() - 1)))


PERTURBATIONS = ("gaussian", "multiscale", "rademacher", "none")
SIGMA_SCHEDULES = ("linear", "geometric")


@dataclass(frozen=True)
class Perturbation:
    kind: str
    sigma: float = 0.05
    sigma_begin: float = 0.05
    sigma_end: float = 1.2
    schedule: str = "linear"

    def __post_init__(self) -> None:
        if self.kind not in PERTURBATIONS:
            raise ValueError(f"unknown perturbation {self.kind!r}; expected one of {PERTURBATIONS}")
        for name in ("sigma", "sigma_begin", "sigma_end"):
            if not getattr(self, name) > 0:
                raise ValueError(f"objective.{name} must be > 0, got {getattr(self, name)}")
        if self.schedule not in SIGMA_SCHEDULES:
            raise ValueError(f"objective.sigma_schedule must be one of {SIGMA_SCHEDULES}, got {self.schedule!r}")

    def sigmas(self, v: Tensor) -> Tensor:
        """The per-example noise levels σ_i, shape (B,)."""
        n = v.shape[0]
        if self.kind == "gaussian":
            return torch.full((n,), self.sigma, dtype=v.dtype, device=v.device)
        if self.schedule == "linear":
            return torch.linspace(self.sigma_begin, self.sigma_end, n, dtype=v.dtype, device=v.device)
        return torch.logspace(
            math.log10(self.sigma_begin), math.log10(self.sigma_end), n, dtype=v.dtype, device=v.device
        )

    def __call__(self, v: Tensor) -> NoisyBatch:
        v = v.detach()
        if self.kind == "none":
            return NoisyBatch(v=v, x=v)
        if self.kind == "rademacher":
            u = torch.randint(0, 2, v.shape, device=v.device).to(v.dtype) * 2 - 1
            return NoisyBatch(v=v, x=v.clone().requires_grad_(True), u=u)
        sigma = self.sigmas(v)
        eps = torch.randn_like(v)
        x = v + sigma.view(-1, *([1] * (v.dim() - 1))) * eps
        return NoisyBatch(v=v, x=x.requires_grad_(True), eps=eps, sigma=sigma)
