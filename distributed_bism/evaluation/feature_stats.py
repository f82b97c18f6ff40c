"""The Gaussian a Fréchet distance fits to feature rows, from sums that add across ranks.

    n = Σ_i 1,   s = Σ_i x_i  (F,),   S = Σ_i x_i x_iᵀ  (F, F)          over the rows x_i of (N, F)
    μ = s / n,   Σ = (S − n μ μᵀ) / (n − 1)                             (unbiased, as torch.cov)
    FD = ‖μ_a − μ_b‖² + tr(Σ_a + Σ_b − 2 (Σ_a Σ_b)^{1/2})

The three sums of a rank's rows add up to those of all rows, so each rank of an evaluation
computes the features of its own share of the samples and one SUM all-reduce of (n, s, S)
(`FeatureStats.reduced`) gives every rank the statistics of the whole set: no rank holds all the
features. Everything is float64: S − n μ μᵀ cancels, and float64 keeps that error near 1e-16 × ‖x‖².
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from distributed_bism.distributed import sum_over_ranks


@dataclass(frozen=True)
class FeatureStats:
    """count n, total s = Σ x (F,) and outer S = Σ x xᵀ (F, F) of feature rows, float64."""

    count: int
    total: Tensor
    outer: Tensor

    @classmethod
    def of(cls, x: Tensor) -> FeatureStats:
        """The sums of the rows of x (N, F); N may be 0 (a rank without samples)."""
        x = x.detach().double()
        return cls(len(x), x.sum(0), x.T @ x)

    def reduced(self) -> FeatureStats:
        """The sums over every rank's rows (one all-reduce of n, s and S packed together; a
        collective: every rank calls it with the same F). Itself in one process."""
        f = len(self.total)
        packed = torch.cat([self.total.new_tensor([float(self.count)]), self.total, self.outer.flatten()])
        packed = sum_over_ranks(packed)
        return FeatureStats(int(packed[0].item()), packed[1 : f + 1], packed[f + 1 :].view(f, f))

    @property
    def mean(self) -> Tensor:
        """μ = s / n (F,)."""
        return self.total / self.count

    @property
    def cov(self) -> Tensor:
        """Σ = (S − n μ μᵀ) / (n − 1) (F, F), unbiased; needs n ≥ 2."""
        mu = self.mean
        return (self.outer - self.count * torch.outer(mu, mu)) / (self.count - 1)

    def finite(self) -> bool:
        """Whether every sum is finite (a non-finite feature makes them inf or NaN)."""
        return bool(torch.isfinite(self.total).all() and torch.isfinite(self.outer).all())


def frechet_of_stats(a: FeatureStats, b: FeatureStats) -> float:
    """‖μ_a − μ_b‖² + tr(Σ_a + Σ_b − 2 (Σ_a Σ_b)^{1/2}) of the Gaussians of a and b; NaN when a
    sum is not finite (features of a diverged model's samples) or a set has fewer than 2 rows.

    tr (Σ_a Σ_b)^{1/2} = Σ √λ_i(Σ_a^{1/2} Σ_b Σ_a^{1/2}): a symmetric PSD matrix, so two eigen-
    decompositions in float64 give it without the complex round-off of a general sqrtm."""
    if not (a.finite() and b.finite()) or min(a.count, b.count) < 2:
        return math.nan
    cov_a, cov_b = a.cov, b.cov
    lam, vec = torch.linalg.eigh(cov_a)
    root_a = (vec * lam.clamp_min(0).sqrt()) @ vec.T
    cross = torch.linalg.eigvalsh(root_a @ cov_b @ root_a).clamp_min(0).sqrt().sum()
    return float((a.mean - b.mean).pow(2).sum() + cov_a.trace() + cov_b.trace() - 2 * cross)
