"""Variational estimates of the score (VaES) and of its θ-gradient (VaGES); docs/methods.md §3.

With particles h_l ~ q(h|v), held fixed (not reparameterised in v) and log p̃(v, h) = −E(v, h):

    VaES(v)  = ∇_v (1/L) Σ_l log p̃(v, h_l)
    VaGES(v) = Ê_q[∂_θ ∇_v log p̃(v, h)] + Ĉov_q(∇_v log p̃(v, h), ∂_θ log p̃(v, h))

If q is the exact posterior p(h|v), E_q[∇_v log p̃] = ∇_v log p(v) (Fisher's identity) and
E_q[∂_θ∇_v log p̃] + Cov_q(∇_v log p̃, ∂_θ log p̃) = ∂_θ ∇_v log p(v). The two VaGES terms use
independent particle sets, and the covariance of L Monte Carlo draws is rescaled by L/(L − 1) to
be unbiased (`biased_cov` drops it). Particles may also carry weights summing to one (an exact
expectation, e.g. by enumerating binary h), in which case no rescaling applies.

A score-matching loss ℓ(s) (DSM, MDSM, KSD: anything that depends on the score's values, not
its v-derivatives) then gets the θ-gradient estimate Σ_b g_bᵀ VaGES(v_b) with g = ∂ℓ/∂s at
s = VaES, from a third independent set. `VaGESLoss` returns a per-example tensor whose *value*
is ℓ at the VaES and whose θ-gradient is that estimate, so it trains through BilevelStep like
any higher-level loss (with unroll_steps = 0: φ is a constant at the higher level). `build`
makes the vages_* objectives of registry/objectives.py.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from distributed_bism.config import ObjectiveConfig
from distributed_bism.models import unwrap
from distributed_bism.models.posterior import BernoulliPosterior, PosteriorView
from distributed_bism.objectives.base import EnergyFn, Objective, ScoreFn, perturbation_of
from distributed_bism.objectives.ksd import ksd_loss_fn
from distributed_bism.objectives.lower_level import get_lower_level_loss_fn
from distributed_bism.objectives.noise import NoisyBatch
from distributed_bism.objectives.score_matching import get_sm_loss_fn
from distributed_bism.registry.objectives import ObjectiveSpec

ScoreLossFn = Callable[[ScoreFn, NoisyBatch], Tensor]


@dataclass(frozen=True)
class Particles:
    """Latent particles h (L, B, H) for a batch of B inputs.

    weight: None for L equally weighted Monte Carlo draws; else (L, B), summing to 1 over L,
    for an exact expectation (the covariance then needs no L/(L−1) correction).
    """

    h: Tensor
    weight: Tensor | None = None

    @property
    def num(self) -> int:
        return self.h.shape[0]

    def mean(self, t: Tensor) -> Tensor:
        """The (weighted) particle mean of t (L, B, ...) → (B, ...)."""
        if self.weight is None:
            return t.mean(0)
        return (self.weight.view(*self.weight.shape, *([1] * (t.dim() - 2))) * t).sum(0)


@dataclass(frozen=True)
class SGLD:
    """Refinement of q's particles by `steps` of h ← h − ½α∇_h E(v, h) + σξ, ξ ~ N(0, I).
    noise=None uses σ = √α (Langevin dynamics targeting p(h|v))."""

    steps: int
    step_size: float
    noise: float | None = None

    def __call__(self, energy: EnergyFn, x: Tensor, h: Tensor) -> Tensor:
        """h (L, B, H) after the steps, detached; x (B, ...) is held fixed."""
        sigma = math.sqrt(self.step_size) if self.noise is None else self.noise
        x = x.detach()
        for _ in range(self.steps):
            with torch.enable_grad():
                h = h.detach().requires_grad_(True)
                (grad,) = torch.autograd.grad(energy(x, h).sum(), h)
            h = h - 0.5 * self.step_size * grad + sigma * torch.randn_like(h)
        return h.detach()


ParticleSampler = Callable[[EnergyFn, PosteriorView, Tensor, int, int], list[Particles]]


def draw_particles(
    energy: EnergyFn, q: PosteriorView, x: Tensor, num_particles: int, num_sets: int = 1, *, sgld: SGLD | None = None
) -> list[Particles]:
    """`num_sets` independent sets of L = num_particles draws h ~ q(h|x), each (L, B, H), detached.

    A Bernoulli posterior is sampled exactly in {0, 1}^H: its Gumbel-sigmoid relaxation exists for
    reparameterised φ-gradients, which the VaES does not take, and p(h|v) lives on binary states.
    """
    x = x.detach()
    with torch.no_grad():
        params = q.encode(x)
        n = num_particles * num_sets
        if isinstance(q.module, BernoulliPosterior):
            # u < p rather than torch.bernoulli, which raises on a NaN p: a non-finite batch must
            # reach the loss (and have its step skipped on every rank), not stop one rank
            probs = q.module.mean(params)
            h = (torch.rand(n, *probs.shape, dtype=probs.dtype, device=probs.device) < probs).to(probs.dtype)
        else:
            h = q.rsample(params, n)
    if sgld is not None and sgld.steps > 0:
        h = sgld(unwrap(energy), x, h)  # the core module: no wrapper forward, no θ-gradient here
    return [Particles(part) for part in h.split(num_particles)]


def joint_log_density(energy: EnergyFn, x: Tensor, sets: Sequence[Particles]) -> list[Tensor]:
    """log p̃(x, h) = −E(x, h) for each set, (L_i, B) each, from ONE call of `energy` (under DDP,
    one forward of the wrapper per iteration)."""
    log_p = -energy(x, torch.cat([s.h for s in sets]))
    return list(log_p.split([s.num for s in sets]))


def vaes(x: Tensor, log_p: Tensor, particles: Particles, *, create_graph: bool) -> Tensor:
    """VaES(x) = ∇_x of the particle mean of log p̃(x, h_l), (B, ...). log_p (L, B) must have been
    computed from x; its graph is kept for further derivatives."""
    (s,) = torch.autograd.grad(particles.mean(log_p).sum(), x, create_graph=create_graph, retain_graph=True)
    return s


def vaes_score_fn(
    energy: EnergyFn, q: PosteriorView, *, num_particles: int = 1, create_graph: bool = True, sgld: SGLD | None = None
) -> ScoreFn:
    """x (B, ...) ↦ VaES(x) (B, ...): the particle mean of −∇_x E(x, h_l), h_l ~ q(h|x) detached
    (optionally refined by SGLD). With `create_graph` the result can be differentiated again in x
    and θ (for SM losses)."""

    def score(x: Tensor) -> Tensor:
        if not x.requires_grad:
            x = x.detach().requires_grad_(True)
        (particles,) = draw_particles(energy, q, x, num_particles, sgld=sgld)
        (log_p,) = joint_log_density(energy, x, [particles])
        return vaes(x, log_p, particles, create_graph=create_graph)

    return score


def covariance_scale(particles: Particles, *, biased_cov: bool) -> float:
    """L/(L−1) for Monte Carlo draws (unbiased covariance), 1 for exact weights or `biased_cov`."""
    if particles.weight is not None or biased_cov:
        return 1.0
    if particles.num < 2:
        raise ValueError(f"the unbiased VaGES covariance needs L >= 2 particles, got {particles.num}")
    return particles.num / (particles.num - 1)


def vages_surrogate(
    x: Tensor,
    g: Tensor,
    log_p_esd: Tensor,
    esd: Particles,
    log_p_cov: Tensor,
    cov: Particles,
    *,
    biased_cov: bool = False,
) -> Tensor:
    """Per-example scalars S_b (B,) whose θ-gradient is g_bᵀ VaGES(x_b).

        S_b = g_bᵀ ∇_x Ê_esd[log p̃(x_b, h)]                                 (graph kept: ∂_θ∇_x)
            + c · Σ_l w_l (a_lb − ā_b) · log p̃(x_b, h_lb),  a_lb = g_bᵀ ∇_x log p̃(x_b, h_lb)

    with a detached, ā_b = Σ_l w_l a_lb and c = L/(L−1) (see `covariance_scale`): the second
    term's θ-gradient is the sample covariance of a and ∂_θ log p̃. g (B, ...) is detached;
    log_p_esd / log_p_cov (L, B) must come from x with θ's graph.
    """
    term_esd = (g * vaes(x, log_p_esd, esd, create_graph=True)).flatten(1).sum(-1)
    # a_lb for every particle from one double backward: ∂/∂u_lb of gᵀ∇_x Σ u_lb log p̃_lb, since
    # each log p̃_lb depends on x_b alone (no duplicated x per particle).
    u = torch.ones_like(log_p_cov, requires_grad=True)
    (s_u,) = torch.autograd.grad((u * log_p_cov).sum(), x, create_graph=True)
    (a,) = torch.autograd.grad((s_u * g).sum(), u, retain_graph=True)
    centred = a - cov.mean(a)
    weight = cov.weight if cov.weight is not None else torch.full_like(a, 1.0 / cov.num)
    coef = covariance_scale(cov, biased_cov=biased_cov) * weight * centred
    return term_esd + (coef.detach() * log_p_cov).sum(0)


class VaGESLoss:
    """The VaGES higher-level loss for a score loss ℓ (dsm_loss, mdsm_loss, rbf_ksd_loss ...).

    `__call__(energy, q, batch)` returns ℓ per example (or per KSD pair) at the VaES, with the
    VaGES θ-gradient of mean ℓ attached (value + surrogate − surrogate.detach()).

    Args:
        score_loss: ℓ(score_fn, batch) → per-example values, depending on the score's values only.
        num_particles: L per particle set; three independent sets are drawn per call.
        biased_cov: drop the L/(L−1) correction.
        sgld: optional refinement of q's particles.
        sampler: how particles are drawn (`draw_particles`; tests pass exact enumerations).
    """

    def __init__(
        self,
        score_loss: ScoreLossFn,
        *,
        num_particles: int,
        biased_cov: bool = False,
        sgld: SGLD | None = None,
        sampler: ParticleSampler | None = None,
    ):
        if num_particles < 1:
            raise ValueError(f"objective.num_particles must be >= 1, got {num_particles}")
        self.score_loss, self.num_particles, self.biased_cov = score_loss, num_particles, biased_cov
        self.sampler: ParticleSampler = sampler or (
            lambda energy, q, x, num, sets: draw_particles(energy, q, x, num, sets, sgld=sgld)
        )

    def __call__(self, energy: EnergyFn, q: PosteriorView | None, batch: NoisyBatch) -> Tensor:
        assert q is not None, "VaGES needs a posterior"
        x = batch.x if batch.x.requires_grad else batch.x.detach().requires_grad_(True)
        sets = self.sampler(energy, q, x, self.num_particles, 3)
        log_p = joint_log_density(energy, x, sets)
        score = vaes(x, log_p[0], sets[0], create_graph=False).detach().requires_grad_(True)
        value = self.score_loss(lambda _x: score, batch)
        (g,) = torch.autograd.grad(value.sum(), score)
        surrogate = vages_surrogate(x, g, log_p[1], sets[1], log_p[2], sets[2], biased_cov=self.biased_cov)
        # every element gets the same scalar, so the mean's θ-gradient is ∇θ(Σ S_b)/n ≈ ∇θ mean ℓ
        total = surrogate.sum() / value.numel()
        return value.detach() + (total - total.detach())


def build(cfg: ObjectiveConfig, spec: ObjectiveSpec) -> Objective:
    """vages_dsm / vages_mdsm / vages_ksd: ℓ = spec.loss at the VaES score with the VaGES
    θ-gradient, and BiSM's lower level (objective.lower_level) for the posterior."""
    assert spec.loss is not None, f"{cfg.name}: a VaGES spec names its score loss"
    score_loss = (
        ksd_loss_fn(bandwidth=cfg.ksd_bandwidth) if spec.loss == "ksd" else get_sm_loss_fn(spec.loss, sigma0=cfg.sigma0)
    )
    vages = VaGESLoss(
        score_loss,
        num_particles=cfg.num_particles,
        biased_cov=cfg.biased_cov,
        sgld=SGLD(cfg.sgld_steps, cfg.sgld_step_size, cfg.sgld_noise) if cfg.sgld_steps else None,
    )
    return Objective(
        cfg.name,
        spec,
        perturbation_of(cfg, spec),
        vages,
        inner=get_lower_level_loss_fn(cfg.lower_level, num_particles=cfg.num_particles),
    )
