"""Two-sample statistic for checking samplers: MMD² with an RBF kernel (Gretton et al. 2012).

    MMD²_u = mean_{i≠j} k(x_i, x_j) + mean_{i≠j} k(y_i, y_j) − 2 mean_{i,j} k(x_i, y_j),
    k(a, b) = exp(−‖a − b‖² / (2 ℓ²))

the unbiased estimate (it can be slightly negative when the two samples agree). The bandwidth ℓ
defaults to the median heuristic: the median pairwise distance of the pooled samples.
"""

from __future__ import annotations

import torch
from torch import Tensor


def median_bandwidth(x: Tensor, y: Tensor) -> float:
    """Median pairwise Euclidean distance of the pooled samples x (N, ...) and y (M, ...)."""
    z = torch.cat([x.flatten(1), y.flatten(1)])
    d = torch.cdist(z, z)
    return d[torch.triu_indices(len(z), len(z), 1, device=z.device).unbind()].median().item()


def mmd2_rbf(x: Tensor, y: Tensor, bandwidth: float | None = None) -> float:
    """Unbiased MMD² between samples x (N, ...) and y (M, ...), N, M ≥ 2, with an RBF kernel."""
    x, y = x.flatten(1).double(), y.flatten(1).double()
    ell = median_bandwidth(x, y) if bandwidth is None else bandwidth

    def k(a: Tensor, b: Tensor) -> Tensor:
        return torch.exp(-torch.cdist(a, b).pow(2) / (2 * ell**2))

    n, m = len(x), len(y)
    kxx, kyy = k(x, x), k(y, y)
    within_x = (kxx.sum() - kxx.diagonal().sum()) / (n * (n - 1))
    within_y = (kyy.sum() - kyy.diagonal().sum()) / (m * (m - 1))
    return (within_x + within_y - 2 * k(x, y).mean()).item()
