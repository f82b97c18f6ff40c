"""Score-matching losses, written once over a score function s(x) ≈ ∇_x log p(x).

The higher-level BiSM losses use the BiSM score s_w (`bism_score_fn`); the GRBM baselines use
the exact score −∇F of the free energy (`free_energy_score_fn`); `build` makes both kinds of
objective (registry/objectives.py). All losses are per example (shape (B,)), summed over every
non-batch dimension:

    DSM:   ½ ‖ s(ṽ) + ε/σ ‖²
    MDSM:  ½ ‖ s(ṽ)/σ_i + ε/σ0² ‖²                      (Li et al. 2019, as in the reference)
    SSM:   ½ ‖ s(v) ‖² + uᵀ ∇_v (s(v)ᵀ u),  u Rademacher
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from distributed_bism.config import ObjectiveConfig
from distributed_bism.models.posterior import PosteriorView
from distributed_bism.objectives.base import EnergyFn, Objective, ScoreFn, perturbation_of
from distributed_bism.objectives.lower_level import get_lower_level_loss_fn
from distributed_bism.objectives.noise import NoisyBatch
from distributed_bism.registry.objectives import ObjectiveSpec


def _sum_per_example(t: Tensor) -> Tensor:
    return t.flatten(1).sum(-1)


def dsm_loss(score_fn: ScoreFn, batch: NoisyBatch) -> Tensor:
    """½ ‖s(ṽ) + ε/σ‖² per example, (B,)."""
    assert batch.eps is not None
    s = score_fn(batch.x)
    return 0.5 * _sum_per_example((s + batch.eps / batch.sigma_like_x()) ** 2)


def mdsm_loss(score_fn: ScoreFn, batch: NoisyBatch, *, sigma0: float) -> Tensor:
    """½ ‖s(ṽ)/σ_i + ε/σ0²‖² per example, (B,)."""
    assert batch.eps is not None
    s = score_fn(batch.x)
    return 0.5 * _sum_per_example((s / batch.sigma_like_x() + batch.eps / sigma0**2) ** 2)


def ssm_loss(score_fn: ScoreFn, batch: NoisyBatch) -> Tensor:
    """½ ‖s(v)‖² + uᵀ ∇_v (s(v)ᵀu) per example, (B,). Needs s built with create_graph."""
    assert batch.u is not None
    s = score_fn(batch.x)
    (hvp,) = torch.autograd.grad((s * batch.u).sum(), batch.x, create_graph=True)
    return 0.5 * _sum_per_example(s**2) + _sum_per_example(hvp * batch.u)


def bism_score_fn(energy: EnergyFn, q: PosteriorView, *, num_particles: int = 1) -> ScoreFn:
    """s_w(x) = ∇_x [−E(x, h) − log q(h|x)], h ~ q(h|x.detach()) held fixed; (B, ...) → (B, ...).

    With L > 1 particles the score is averaged over them. h depends on φ (reparameterised), not
    on x, so the θ-gradient reaches the posterior's unrolled parameters through h.
    """

    def score(x: Tensor) -> Tensor:
        h = q.rsample(q.encode(x.detach()), None if num_particles == 1 else num_particles)
        log_w = -energy(x, h) - q.log_prob(q.encode(x), h)
        if num_particles > 1:
            log_w = log_w.mean(0)
        (s,) = torch.autograd.grad(log_w.sum(), x, create_graph=True)
        return s

    return score


def free_energy_score_fn(free_energy: Callable[[Tensor], Tensor]) -> ScoreFn:
    """s(x) = −∇_x F(x), with create_graph so that losses can be differentiated again."""

    def score(x: Tensor) -> Tensor:
        (g,) = torch.autograd.grad(free_energy(x).sum(), x, create_graph=True)
        return -g

    return score


def get_sm_loss_fn(kind: str, *, sigma0: float = 0.1) -> Callable[[ScoreFn, NoisyBatch], Tensor]:
    """The score-matching loss for a perturbation kind: dsm, mdsm or ssm."""
    if kind == "dsm":
        return dsm_loss
    if kind == "mdsm":
        return lambda score_fn, batch: mdsm_loss(score_fn, batch, sigma0=sigma0)
    if kind == "ssm":
        return ssm_loss
    raise ValueError(f"unknown score-matching loss {kind!r}; expected dsm, mdsm or ssm")


def build(cfg: ObjectiveConfig, spec: ObjectiveSpec) -> Objective:
    """bidsm / bimdsm / bissm (spec.bilevel: the loss on the BiSM score s_w, plus the lower level
    objective.lower_level) and dsm / mdsm / ssm (the loss on the exact free energy's score)."""
    assert spec.loss is not None, f"{cfg.name}: a score-matching spec names its loss"
    sm_loss = get_sm_loss_fn(spec.loss, sigma0=cfg.sigma0)
    perturbation = perturbation_of(cfg, spec)
    if not spec.bilevel:

        def free_energy_sm_loss(energy: EnergyFn, q: PosteriorView | None, batch: NoisyBatch) -> Tensor:
            return sm_loss(free_energy_score_fn(energy), batch)  # type: ignore[arg-type]

        return Objective(cfg.name, spec, perturbation, free_energy_sm_loss)

    def bism_loss(energy: EnergyFn, q: PosteriorView | None, batch: NoisyBatch) -> Tensor:
        assert q is not None, f"{cfg.name} needs a posterior"
        return sm_loss(bism_score_fn(energy, q, num_particles=cfg.num_particles), batch)

    return Objective(
        cfg.name,
        spec,
        perturbation,
        bism_loss,
        inner=get_lower_level_loss_fn(cfg.lower_level, num_particles=cfg.num_particles),
    )
