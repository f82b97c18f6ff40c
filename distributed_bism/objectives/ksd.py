"""Kernelised Stein discrepancy (KSD) with an RBF kernel, written over a score function s(x).

For a pair of independent points (x, y) and k(x, y) = exp(−‖x − y‖² / (2h²)):

    u(x, y) = k s(x)ᵀs(y) + s(x)ᵀ∇_y k + s(y)ᵀ∇_x k + tr ∇_x∇_y k
    ∇_x k = −k (x − y)/h²,   ∇_y k = k (x − y)/h²,   tr ∇_x∇_y k = k (D/h² − ‖x − y‖²/h⁴)

E[u(x, y)] over independent x, y ~ data is KSD²(data ‖ model), zero iff s is the data score.
A batch x (B, ...) is split into the pairs (x_i, x_{m+i}), i < m = ⌊B/2⌋ (with B odd, the last
example is left out); sums run over every non-batch dimension, D of them.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from distributed_bism.objectives.noise import NoisyBatch
from distributed_bism.objectives.score_matching import ScoreFn


def rbf_ksd_loss(score_fn: ScoreFn, batch: NoisyBatch, *, bandwidth: float) -> Tensor:
    """u(x_i, y_i) per pair, (m,) with m = ⌊B/2⌋; its mean is the U-statistic estimate of KSD²."""
    x = batch.x
    m = x.shape[0] // 2
    if m == 0:
        raise ValueError(f"KSD pairs the two halves of a batch; it needs at least 2 examples, got {x.shape[0]}")
    s = score_fn(x).flatten(1)
    flat = x.flatten(1)
    a, b, sa, sb = flat[:m], flat[m : 2 * m], s[:m], s[m : 2 * m]
    diff = a - b  # (m, D)
    sq = (diff**2).sum(-1)
    h2 = bandwidth**2
    k = torch.exp(-sq / (2 * h2))
    dims = flat.shape[1]
    return k * ((sa * sb).sum(-1) + ((sa - sb) * diff).sum(-1) / h2 + dims / h2 - sq / h2**2)


def ksd_loss_fn(*, bandwidth: float) -> Callable[[ScoreFn, NoisyBatch], Tensor]:
    """The KSD loss with a fixed kernel bandwidth, in the signature of `get_sm_loss_fn`'s losses."""
    if not bandwidth > 0:
        raise ValueError(f"objective.ksd_bandwidth must be > 0, got {bandwidth}")
    return lambda score_fn, batch: rbf_ksd_loss(score_fn, batch, bandwidth=bandwidth)
