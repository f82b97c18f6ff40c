"""2-D synthetic data sets (N, 2), drawn reproducibly from a seed, each with its exact log-density.

checkerboard: the reference's 2-column checkerboard on [0, 1]²: uniform on the two cells
    [0, ½]² and [½, 1]². Its density is 2 on its support, so the best possible average
    log-likelihood is log 2 ≈ 0.693.
8gaussians: equal mixture of 8 isotropic Gaussians, σ = 0.25, centred on the circle of
    radius 2 at angles 2πk/8. Samples lie in about [-3, 3]².
rings: 4 concentric rings, radii 0.75, 1.5, 2.25, 3.0, each an equal mixture of isotropic
    Gaussians (σ = 0.1) spaced ≈ 1.5σ apart along the ring, so a ring is uniform in angle up to a
    ripple of about e^(-2π²/1.5²) ≈ 1e-4, and the number of points per ring grows with its
    circumference (equal mass per unit length). Samples lie in about [-3.4, 3.4]².
2spirals: two opposite Archimedean arms r = t/3, t ∈ [0, 3π] (the arms are point reflections of
    each other), each an equal mixture of isotropic Gaussians (σ = 0.1) at points t_i spaced
    evenly in t² (≈ evenly in arc length). Samples lie in about [-3.5, 3.5]².

The three mixtures are sampled exactly as their density says (pick a component uniformly, add
σ·N(0, I)), so `log_density` is the exact log-density of what `make_synthetic` draws and
`score` its exact gradient ∇ₓ log p(x). Exact Fisher divergences can be built on them.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

CHECKERBOARD_BEST_LOGLIK = 0.6931471805599453  # log 2


def checkerboard(n: int, generator: torch.Generator, n_cols: int = 2) -> Tensor:
    """n points, (n, 2), uniform on the cells (i, j) of an n_cols × n_cols grid with i + j even."""
    dx = 1.0 / n_cols
    cells = torch.tensor([(i * dx, j * dx) for i in range(n_cols) for j in range(n_cols) if (i + j) % 2 == 0])
    which = torch.randint(len(cells), (n,), generator=generator)
    return cells[which] + torch.rand(n, 2, generator=generator) * dx


def checkerboard_log_density(x: Tensor, n_cols: int = 2) -> Tensor:
    """log p(x), (N,), of `checkerboard`: log(2) on the support (density 1 / area of the cells), -inf off it."""
    dx = 1.0 / n_cols
    inside = ((x >= 0) & (x < 1)).all(-1)
    cell = torch.floor(x.clamp(0, 1 - 1e-12) / dx).long()
    on = inside & (cell.sum(-1) % 2 == 0)
    n_cells = (n_cols * n_cols + 1) // 2
    log_p = -math.log(n_cells * dx * dx)
    return torch.where(on, torch.full_like(x[:, 0], log_p), torch.full_like(x[:, 0], -math.inf))


@dataclass(frozen=True)
class GaussianMixture2D:
    """Equal-weight mixture of isotropic 2-D Gaussians N(means[k], sigma² I); means is (K, 2)."""

    means: Tensor
    sigma: float

    def sample(self, n: int, generator: torch.Generator) -> Tensor:
        """n draws, (n, 2) float32: a uniformly chosen centre plus sigma · N(0, I)."""
        which = torch.randint(len(self.means), (n,), generator=generator)
        return self.means[which] + self.sigma * torch.randn(n, 2, generator=generator)

    def log_density(self, x: Tensor) -> Tensor:
        """Exact log p(x), (N,), for x (N, 2); differentiable in x."""
        means = self.means.to(x)
        sq = (x.unsqueeze(1) - means).pow(2).sum(-1)  # (N, K)
        log_norm = -math.log(2 * math.pi * self.sigma**2) - math.log(len(means))
        return torch.logsumexp(-0.5 * sq / self.sigma**2, dim=1) + log_norm


def _eight_gaussians() -> GaussianMixture2D:
    angles = torch.arange(8, dtype=torch.float64) * (2 * math.pi / 8)
    return GaussianMixture2D(2.0 * torch.stack([angles.cos(), angles.sin()], 1).float(), 0.25)


def _rings(radii: tuple[float, ...] = (0.75, 1.5, 2.25, 3.0), sigma: float = 0.1) -> GaussianMixture2D:
    centres = []
    for r in radii:
        m = math.ceil(2 * math.pi * r / (1.5 * sigma))  # spacing ≤ 1.5σ: ripple along the ring ~1e-4
        a = torch.arange(m, dtype=torch.float64) * (2 * math.pi / m)
        centres.append(r * torch.stack([a.cos(), a.sin()], 1))
    return GaussianMixture2D(torch.cat(centres).float(), sigma)


def _two_spirals(sigma: float = 0.1, per_arm: int = 100, turns: float = 1.5) -> GaussianMixture2D:
    # Arc length of r = t/3 grows ≈ t²/6, so t_i ∝ √((i + ½)/per_arm) spaces centres ≈ evenly along the arm
    # (≈ 0.15 apart for 100 per arm, i.e. 1.5σ, so each arm is a smooth ridge, not a string of beads).
    t = 2 * math.pi * turns * torch.sqrt((torch.arange(per_arm, dtype=torch.float64) + 0.5) / per_arm)
    arm = torch.stack([-t * t.cos(), t * t.sin()], 1) / 3.0
    return GaussianMixture2D(torch.cat([arm, -arm]).float(), sigma)


MIXTURES: dict[str, GaussianMixture2D] = {
    "8gaussians": _eight_gaussians(),
    "rings": _rings(),
    "2spirals": _two_spirals(),
}

SYNTHETIC: dict[str, Callable[[int, torch.Generator], Tensor]] = {
    "checkerboard": checkerboard,
    **{name: mix.sample for name, mix in MIXTURES.items()},
}

N_TRAIN_DEFAULT = 50_000  # draws when data.n_train is None
N_TEST_DEFAULT = 10_000  # draws when data.n_test is None


def make_synthetic(name: str, n: int, *, seed: int = 0) -> Tensor:
    """n samples of the named set, (n, 2) float32, independent of the global RNG."""
    return SYNTHETIC[name](n, torch.Generator().manual_seed(seed))


def log_density(name: str, x: Tensor) -> Tensor:
    """Exact log p(x), (N,), of the named set's generative process at x (N, 2); -inf off a support."""
    if name == "checkerboard":
        return checkerboard_log_density(x)
    return MIXTURES[name].log_density(x)


def score(name: str, x: Tensor) -> Tensor:
    """Exact score ∇ₓ log p(x), (N, 2), via autograd (mixtures only: the checkerboard's is 0 or undefined)."""
    if name not in MIXTURES:
        raise ValueError(f"score: {name!r} has no smooth density; expected one of {', '.join(MIXTURES)}")
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(MIXTURES[name].log_density(x).sum(), x)
    return grad


def load_synthetic(name: str, n_train: int | None, n_test: int | None, seed: int) -> tuple[Tensor, Tensor]:
    """(train (n_train, 2), test (n_test, 2)): train drawn from `seed`, test from `seed + 1`."""
    train = make_synthetic(name, N_TRAIN_DEFAULT if n_train is None else n_train, seed=seed)
    test = make_synthetic(name, N_TEST_DEFAULT if n_test is None else n_test, seed=seed + 1)
    return train, test
