"""Objectives: what the training step minimises, selected by `objective.name`.

    bidsm, bimdsm, bissm   bi-level score matching (a higher-level SM loss on s_w, plus a
                           lower-level loss for the posterior)
    dsm, mdsm, ssm         score matching on the exact free energy (GRBM baselines)
    cd, pcd                contrastive divergence (GRBM baselines)
    vages_dsm, vages_mdsm, vages_ksd
                           VaGES: DSM / MDSM / KSD of the VaES score, θ-gradient by VaGES (no
                           unroll), plus the same lower-level loss as BiSM
    bidvl                  bi-level doubly variational learning (a marginal energy, an encoder and
                           a decoder; see bidvl.py)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from torch import Tensor

from distributed_bism.config import VAGES_OBJECTIVES, ObjectiveConfig
from distributed_bism.models import unwrap
from distributed_bism.models.posterior import PosteriorView
from distributed_bism.objectives.bidvl import bidvl_objective
from distributed_bism.objectives.contrastive import ContrastiveDivergence
from distributed_bism.objectives.ksd import ksd_loss_fn
from distributed_bism.objectives.lower_level import LowerLevelFn, get_lower_level_loss_fn
from distributed_bism.objectives.noise import NoisyBatch, Perturbation
from distributed_bism.objectives.score_matching import (
    EnergyFn,
    bism_score_fn,
    free_energy_score_fn,
    get_sm_loss_fn,
)
from distributed_bism.objectives.vages import SGLD, VaGESLoss

__all__ = ["Objective", "get_objective", "NoisyBatch", "Perturbation"]

# objective name → (perturbation kind, score-matching loss); cd / pcd perturb nothing.
_SM_KINDS = {
    "bidsm": ("gaussian", "dsm"),
    "bimdsm": ("multiscale", "mdsm"),
    "bissm": ("rademacher", "ssm"),
    "dsm": ("gaussian", "dsm"),
    "mdsm": ("multiscale", "mdsm"),
    "ssm": ("rademacher", "ssm"),
    "cd": ("none", None),
    "pcd": ("none", None),
    "vages_dsm": ("gaussian", "dsm"),
    "vages_mdsm": ("multiscale", "mdsm"),
    "vages_ksd": ("none", "ksd"),
}


@dataclass
class Objective:
    """A higher-level loss and, for bi-level objectives, a lower-level one. Per-example (B,).

    outer(energy, q, batch): the loss on θ. `energy(x, h)` is the joint energy, `energy(x)` the
        free energy (GRBM baselines only); `q` is None for single-level objectives.
    inner(energy, q, x): the lower-level loss on φ at a detached noisy x (bi-level only).
    """

    name: str
    perturbation: Perturbation
    outer: Callable[[EnergyFn, PosteriorView | None, NoisyBatch], Tensor]
    inner: LowerLevelFn | None = None
    divide_inner_by_sigma: bool = False
    contrastive: ContrastiveDivergence | None = field(default=None, repr=False)

    @property
    def bilevel(self) -> bool:
        return self.inner is not None

    def inner_loss(self, energy: EnergyFn, q: PosteriorView, batch: NoisyBatch) -> Tensor:
        """G(θ, φ) per example at batch.x (detached), divided by σ_i for BiMDSM; (B,)."""
        assert self.inner is not None, f"{self.name} has no lower level"
        loss = self.inner(energy, q, batch.x.detach())
        return loss / batch.sigma if self.divide_inner_by_sigma else loss

    def state_dict(self) -> dict[str, Tensor]:
        return self.contrastive.state_dict() if self.contrastive else {}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        if self.contrastive:
            self.contrastive.load_state_dict(state)


def get_objective(cfg: ObjectiveConfig) -> Objective:
    """Build the objective named by `cfg.name` (validated by ObjectiveConfig)."""
    if cfg.name == "bidvl":
        perturbation, losses = bidvl_objective(cfg)
        return Objective(cfg.name, perturbation, losses.outer, inner=losses.inner)
    kind, sm = _SM_KINDS[cfg.name]
    perturbation = Perturbation(kind, sigma=cfg.sigma, sigma_begin=cfg.sigma_begin, sigma_end=cfg.sigma_end,
                                schedule=cfg.sigma_schedule)

    if cfg.name in ("cd", "pcd"):
        cd = ContrastiveDivergence(steps=cfg.cd_steps, persistent=cfg.name == "pcd")

        def cd_loss(energy: EnergyFn, q: PosteriorView | None, batch: NoisyBatch) -> Tensor:
            return cd.loss(energy, unwrap(energy), batch)

        return Objective(cfg.name, perturbation, cd_loss, contrastive=cd)

    if cfg.name in VAGES_OBJECTIVES:
        score_loss = ksd_loss_fn(bandwidth=cfg.ksd_bandwidth) if sm == "ksd" else get_sm_loss_fn(sm, sigma0=cfg.sigma0)
        vages = VaGESLoss(score_loss, num_particles=cfg.num_particles, biased_cov=cfg.biased_cov,
                          sgld=SGLD(cfg.sgld_steps, cfg.sgld_step_size, cfg.sgld_noise) if cfg.sgld_steps else None)
        return Objective(cfg.name, perturbation, vages,
                         inner=get_lower_level_loss_fn(cfg.lower_level, num_particles=cfg.num_particles),
                         divide_inner_by_sigma=cfg.name == "vages_mdsm")

    sm_loss = get_sm_loss_fn(sm, sigma0=cfg.sigma0)
    if not cfg.bilevel:
        def free_energy_sm_loss(energy: EnergyFn, q: PosteriorView | None, batch: NoisyBatch) -> Tensor:
            return sm_loss(free_energy_score_fn(energy), batch)

        return Objective(cfg.name, perturbation, free_energy_sm_loss)

    def bism_loss(energy: EnergyFn, q: PosteriorView | None, batch: NoisyBatch) -> Tensor:
        assert q is not None, f"{cfg.name} needs a posterior"
        return sm_loss(bism_score_fn(energy, q, num_particles=cfg.num_particles), batch)

    return Objective(cfg.name, perturbation, bism_loss,
                     inner=get_lower_level_loss_fn(cfg.lower_level, num_particles=cfg.num_particles),
                     divide_inner_by_sigma=cfg.name == "bimdsm")

