"""BiDVL's two levels (Kan et al. 2022; docs/methods.md §4), per example, on the decoupled model of
models/bidvl.py: a marginal energy E_θ(v), an encoder Q_φ(h|v), a decoder P_ψ(v|h), ĥ ~ N(0, I).

    upper (θ):      E(v) − E(P(ĥ))                                   (decoder samples for MCMC)
       hinge form:  relu(m + E(v)) + relu(m − E(P(ĥ)))                (the reference's ResNet recipe)
    lower (φ, ψ):   E(P(ĥ)) + w · mean_j (μ_Q(P(ĥ)) − ĥ)_j²          (symmetric-KL surrogate)
                    + λ · ( ‖v − P(h)‖² + KL(Q(h|v) ‖ N(0, I)) ),   h ~ Q(h|v)

The encoder-decoder sits in the bi-level step's posterior slot, so `BilevelStep` runs these
unchanged: N warm-up steps of the lower level persist; K unrolled steps make P(ĥ) in the upper
level a differentiable function of θ through ψ_K(θ) (at K = 0, P(ĥ) is a constant, as in the
reference). The data are not perturbed ("none"): ṽ = v. `build` makes the bidvl objective of
registry/objectives.py.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from distributed_bism.config import ObjectiveConfig
from distributed_bism.models.bidvl import BiDVLPasses
from distributed_bism.models.posterior import PosteriorView
from distributed_bism.objectives.base import EnergyFn, Objective, perturbation_of
from distributed_bism.objectives.noise import NoisyBatch
from distributed_bism.registry.objectives import ObjectiveSpec


def _sum_per_example(t: Tensor) -> Tensor:
    return t.flatten(1).sum(-1)


def kl_to_standard_normal(q_params: Tensor) -> Tensor:
    """KL(N(μ, diag σ²) ‖ N(0, I)) = Σ_j ½(μ_j² + σ_j² − 1) − log σ_j, from [μ, log σ] (B, 2H) → (B,)."""
    mu, log_std = q_params.chunk(2, dim=-1)
    return (0.5 * (mu**2 + torch.exp(2 * log_std) - 1) - log_std).sum(-1)


def latent_reconstruction(mu_gen: Tensor, h_prior: Tensor) -> Tensor:
    """mean_j (μ_Q(P(ĥ)) − ĥ)_j², (B, H) → (B,) (the reference's squared error / h_dim)."""
    return ((mu_gen - h_prior) ** 2).mean(-1)


def reconstruction_error(v: Tensor, recon: Tensor) -> Tensor:
    """‖v − P(h)‖² summed over every non-batch dimension, (B, ...) → (B,)."""
    return _sum_per_example((v - recon) ** 2)


def upper_level_loss(e_data: Tensor, e_gen: Tensor, *, hinge: bool = False, margin: float = 1.0) -> Tensor:
    """E(v) − E(P(ĥ)), or relu(m + E(v)) + relu(m − E(P(ĥ))) with `hinge`; (B,), (B,) → (B,)."""
    if hinge:
        return F.relu(margin + e_data) + F.relu(margin - e_gen)
    return e_data - e_gen


def prior_draws(like: Tensor, h_dim: int) -> Tensor:
    """ĥ ~ N(0, I), one per example of `like` (B, ...): (B, H) in its dtype and device."""
    return torch.randn(like.shape[0], h_dim, dtype=like.dtype, device=like.device)


class BiDVLLosses:
    """The two levels as `Objective.outer(energy, q, batch)` and `Objective.inner(energy, q, x)`.

    `energy(v)` is the marginal energy (B, ...) → (B,); `q` a PosteriorView of the
    EncoderDecoder, whose call `q(ĥ, v)` returns `BiDVLPasses`.
    """

    def __init__(self, *, lam: float = 0.05, latent_weight: float = 1.0, hinge: bool = False, margin: float = 1.0):
        self.lam, self.latent_weight, self.hinge, self.margin = lam, latent_weight, hinge, margin

    def outer(self, energy: EnergyFn, q: PosteriorView | None, batch: NoisyBatch) -> Tensor:
        """Upper level per example (B,). One energy call on [v; P(ĥ)], so a DDP wrapper's
        forward runs once per backward."""
        assert q is not None, "bidvl needs the encoder-decoder in the posterior slot"
        v = batch.x
        passes: BiDVLPasses = q(prior_draws(v, q.module.h_dim))
        e = energy(torch.cat([v, passes.x_gen]))  # type: ignore[call-arg]
        return upper_level_loss(e[: len(v)], e[len(v) :], hinge=self.hinge, margin=self.margin)

    def lower_terms(self, energy: EnergyFn, q: PosteriorView, x: Tensor) -> dict[str, Tensor]:
        """The lower level's pieces per example, each (B,): energy_gen, latent, recon, kl."""
        h_prior = prior_draws(x, q.module.h_dim)
        passes: BiDVLPasses = q(h_prior, x)
        assert passes.mu_gen is not None and passes.q_params is not None and passes.recon is not None
        return {
            "energy_gen": energy(passes.x_gen),  # type: ignore[call-arg]
            "latent": latent_reconstruction(passes.mu_gen, h_prior),
            "recon": reconstruction_error(x, passes.recon),
            "kl": kl_to_standard_normal(passes.q_params),
        }

    def inner(self, energy: EnergyFn, q: PosteriorView, x: Tensor) -> Tensor:
        """Lower level per example (B,): E(P(ĥ)) + w·latent + λ·(recon + KL)."""
        t = self.lower_terms(energy, q, x)
        return t["energy_gen"] + self.latent_weight * t["latent"] + self.lam * (t["recon"] + t["kl"])


def build(cfg: ObjectiveConfig, spec: ObjectiveSpec) -> Objective:
    """The two levels an ObjectiveConfig with name=bidvl describes; the data are not perturbed."""
    losses = BiDVLLosses(
        lam=cfg.bidvl_lambda,
        latent_weight=cfg.bidvl_latent_weight,
        hinge=cfg.bidvl_hinge,
        margin=cfg.bidvl_hinge_margin,
    )
    return Objective(cfg.name, spec, perturbation_of(cfg, spec), losses.outer, inner=losses.inner)
