"""What every objective is: the `Objective` a method's builder returns, and the function types.

    ScoreFn       s(x): (B, ...) → (B, ...), a score ∇_x log p(x)
    EnergyFn      energy(x, h) → (B,): the joint energy; energy(x) the free or marginal energy
    OuterFn       outer(energy, q, batch) → (B,): the higher-level loss on θ
    LowerLevelFn  inner(energy, q, x) → (B,): the lower-level loss on φ at a detached x

The method's facts (bi-level or not, contrastive, inner loss divided by σ) are its ObjectiveSpec
in distributed_bism/registry/objectives.py; `Objective` reads them from there rather than
carrying one field per special case.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor

from distributed_bism.config import ObjectiveConfig
from distributed_bism.models.posterior import PosteriorView
from distributed_bism.objectives.noise import NoisyBatch, Perturbation
from distributed_bism.registry.objectives import ObjectiveSpec

ScoreFn = Callable[[Tensor], Tensor]
EnergyFn = Callable[[Tensor, Tensor], Tensor]
OuterFn = Callable[[EnergyFn, PosteriorView | None, NoisyBatch], Tensor]
LowerLevelFn = Callable[[EnergyFn, PosteriorView, Tensor], Tensor]


@dataclass
class Objective:
    """A higher-level loss and, for bi-level objectives, a lower-level one. Per example (B,).

    outer(energy, q, batch): the loss on θ. `energy(x, h)` is the joint energy, `energy(x)` the
        free energy (GRBM baselines only); `q` is None for single-level objectives.
    inner(energy, q, x): the lower-level loss on φ at a detached noisy x (bi-level only).
    A contrastive spec's `outer` keeps Gibbs chains: it has state_dict / load_state_dict.
    """

    name: str
    spec: ObjectiveSpec
    perturbation: Perturbation
    outer: OuterFn
    inner: LowerLevelFn | None = None

    @property
    def bilevel(self) -> bool:
        return self.inner is not None

    def inner_loss(self, energy: EnergyFn, q: PosteriorView, batch: NoisyBatch) -> Tensor:
        """G(θ, φ) per example at batch.x (detached), divided by σ_i when the spec says so; (B,)."""
        assert self.inner is not None, f"{self.name} has no lower level"
        loss = self.inner(energy, q, batch.x.detach())
        if not self.spec.divide_inner_by_sigma:
            return loss
        assert batch.sigma is not None, f"{self.name} divides by σ but its perturbation drew none"
        return loss / batch.sigma

    def state_dict(self) -> dict[str, Tensor]:
        """The state checkpoints carry: a contrastive method's Gibbs chains (kept by its outer loss)."""
        return self.outer.state_dict() if self.spec.contrastive else {}  # type: ignore[attr-defined]

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        if self.spec.contrastive:
            self.outer.load_state_dict(state)  # type: ignore[attr-defined]


def perturbation_of(cfg: ObjectiveConfig, spec: ObjectiveSpec) -> Perturbation:
    """The spec's kind of noise at the config's σ settings (the "none" kind ignores them)."""
    return Perturbation(
        spec.perturbation,
        sigma=cfg.sigma,
        sigma_begin=cfg.sigma_begin,
        sigma_end=cfg.sigma_end,
        schedule=cfg.sigma_schedule,
    )
