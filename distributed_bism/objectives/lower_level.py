"""Lower-level (posterior) losses G(θ, φ), per example, on a perturbed batch ṽ (docs/methods.md §1).

    "kl":     E_q[ log q_φ(h|ṽ) + E_θ(ṽ, h) ]          (= KL(q ‖ p(h|ṽ)) + const in φ)
    "fisher": ½ ‖ ∇_h( −E_θ(ṽ, h) − log q_φ(h|ṽ) ) ‖²   at h ~ q_φ(h|ṽ)

Both draw h by reparameterisation, so their φ-gradient flows through h. ṽ is detached: the
lower level never differentiates in v.
"""

from __future__ import annotations

import torch
from torch import Tensor

from distributed_bism.models.posterior import PosteriorView
from distributed_bism.objectives.base import EnergyFn, LowerLevelFn

LOWER_LEVEL_LOSSES = ("kl", "fisher")


def _sample(q: PosteriorView, x: Tensor, num_particles: int) -> tuple[Tensor, Tensor]:
    """h (L, B, H) or (B, H), and the encoder output it came from."""
    params = q.encode(x)
    return q.rsample(params, None if num_particles == 1 else num_particles), params


def kl_loss(energy: EnergyFn, q: PosteriorView, x: Tensor, *, num_particles: int = 1) -> Tensor:
    """Negative unnormalised ELBO E_q[log q(h|x) + E(x, h)], x (B, ...) → (B,)."""
    h, params = _sample(q, x, num_particles)
    loss = q.log_prob(params, h) + energy(x, h)
    return loss.mean(0) if num_particles > 1 else loss


def fisher_loss(energy: EnergyFn, q: PosteriorView, x: Tensor, *, num_particles: int = 1) -> Tensor:
    """Posterior Fisher divergence ½‖∇_h log w(x, h)‖² at h ~ q, x (B, ...) → (B,)."""
    h, params = _sample(q, x, num_particles)
    if not h.requires_grad:  # φ frozen (evaluation): measure the divergence at fixed samples
        h = h.detach().requires_grad_(True)
    log_w = -energy(x, h) - q.log_prob(params, h)
    (g,) = torch.autograd.grad(log_w.sum(), h, create_graph=True)
    loss = 0.5 * (g**2).sum(-1)
    return loss.mean(0) if num_particles > 1 else loss


def get_lower_level_loss_fn(kind: str, *, num_particles: int = 1) -> LowerLevelFn:
    """Factory: the lower-level loss `fn(energy, q, x) -> (B,)` named by `kind`."""
    if kind == "kl":
        return lambda energy, q, x: kl_loss(energy, q, x, num_particles=num_particles)
    if kind == "fisher":
        return lambda energy, q, x: fisher_loss(energy, q, x, num_particles=num_particles)
    raise ValueError(f"unknown objective.lower_level {kind!r}; expected one of {LOWER_LEVEL_LOSSES}")
