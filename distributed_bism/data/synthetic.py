"""2-D synthetic data sets, drawn reproducibly from a seed.

checkerboard: the reference's 2-column checkerboard on [0, 1]²: uniform on the two cells
[0, ½]² and [½, 1]². Its density is 2 on its support, so the best possible average
log-likelihood is log 2 ≈ 0.693.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

CHECKERBOARD_BEST_LOGLIK = 0.6931471805599453  # log 2


def checkerboard(n: int, generator: torch.Generator, n_cols: int = 2) -> Tensor:
    """n points, (n, 2), uniform on the cells (i, j) of an n_cols × n_cols grid with i + j even."""
    dx = 1.0 / n_cols
    cells = torch.tensor([(i * dx, j * dx) for i in range(n_cols) for j in range(n_cols) if (i + j) % 2 == 0])
    which = torch.randint(len(cells), (n,), generator=generator)
    return cells[which] + torch.rand(n, 2, generator=generator) * dx


SYNTHETIC: dict[str, Callable[[int, torch.Generator], Tensor]] = {"checkerboard": checkerboard}


def make_synthetic(name: str, n: int, *, seed: int = 0) -> Tensor:
    """n samples of the named set, (n, 2), independent of the global RNG."""
    return SYNTHETIC[name](n, torch.Generator().manual_seed(seed))
