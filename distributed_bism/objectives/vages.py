"""Variational estimates of the score (VaES) and of its θ-gradient (VaGES); METHODS.md §3.

    VaES(v) = ∇_v (1/L) Σ_l [−E(v, h_l)],   h_l ~ q(h|v) held fixed (not reparameterised in v)

If q is the exact posterior p(h|v), E_q[−∇_v E(v, h)] = ∇_v log p(v) exactly (Fisher's identity).
"""

from __future__ import annotations

import torch
from torch import Tensor

from distributed_bism.models.posterior import PosteriorView
from distributed_bism.objectives.score_matching import EnergyFn, ScoreFn


def vaes_score_fn(energy: EnergyFn, q: PosteriorView, *, num_particles: int = 1,
                  create_graph: bool = True) -> ScoreFn:
    """x (B, ...) ↦ VaES(x) (B, ...): the particle mean of −∇_x E(x, h_l), h_l ~ q(h|x) detached.

    With `create_graph` the result can be differentiated again in x and θ (for SM losses)."""

    def score(x: Tensor) -> Tensor:
        if not x.requires_grad:
            x = x.detach().requires_grad_(True)
        with torch.no_grad():
            h = q.rsample(q.encode(x.detach()), None if num_particles == 1 else num_particles)
        neg_e = -energy(x, h)
        if num_particles > 1:
            neg_e = neg_e.mean(0)
        (s,) = torch.autograd.grad(neg_e.sum(), x, create_graph=create_graph)
        return s

    return score
