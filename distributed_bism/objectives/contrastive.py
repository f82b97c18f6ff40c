"""Contrastive divergence baselines for the Gaussian RBM: CD-k and PCD-k.

Both use the surrogate  L = F(v) − F(v⁻),  v⁻ detached, whose θ-gradient is the CD estimate
of the negative log-likelihood gradient E_data[∇F] − E_model[∇F]. v⁻ comes from k block-Gibbs
sweeps started at the data (CD) or at persistent chains kept in this object's state (PCD).
`build` makes the cd / pcd objectives of registry/objectives.py; the ContrastiveDivergence is
their higher-level loss, and its chains are the objective's checkpointed state.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol, cast

import torch
from torch import Tensor

from distributed_bism.config import ObjectiveConfig
from distributed_bism.models import unwrap
from distributed_bism.models.posterior import PosteriorView
from distributed_bism.objectives.base import Objective, perturbation_of
from distributed_bism.objectives.noise import NoisyBatch
from distributed_bism.registry.objectives import ObjectiveSpec


class _GibbsSampler(Protocol):
    """A model with one block-Gibbs sweep v → v⁻ (the Gaussian RBM)."""

    def gibbs_step(self, v: Tensor) -> Tensor: ...


class ContrastiveDivergence:
    """CD-k (persistent=False) or PCD-k (persistent=True) on a model with `gibbs_step`."""

    def __init__(self, *, steps: int = 1, persistent: bool = False):
        if steps < 1:
            raise ValueError(f"objective.cd_steps must be >= 1, got {steps}")
        self.steps, self.persistent = steps, persistent
        self.chains: Tensor | None = None

    def negative_samples(self, model: torch.nn.Module, v: Tensor) -> Tensor:
        """v⁻ after k Gibbs sweeps, (B, D). PCD chains start at the first batch they see."""
        start = v if not self.persistent or self.chains is None or self.chains.shape != v.shape else self.chains
        with torch.no_grad():
            x = start.detach()
            for _ in range(self.steps):
                x = cast(_GibbsSampler, model).gibbs_step(x)
        if self.persistent:
            self.chains = x
        return x

    def loss(self, energy: Callable[..., Tensor], core: torch.nn.Module, batch: NoisyBatch) -> Tensor:
        """F(v) − F(v⁻) per example, (B,). `energy(v)` is the free energy (possibly via a wrapper)."""
        neg = self.negative_samples(core, batch.v)
        return energy(batch.v) - energy(neg)

    def __call__(self, energy: Callable[..., Tensor], q: PosteriorView | None, batch: NoisyBatch) -> Tensor:
        """The higher-level loss `outer(energy, q, batch)`: F(v) − F(v⁻), (B,); q is unused."""
        return self.loss(energy, unwrap(energy), batch)

    def state_dict(self) -> dict[str, Tensor]:
        return {} if self.chains is None else {"chains": self.chains.clone()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.chains = state.get("chains")


def build(cfg: ObjectiveConfig, spec: ObjectiveSpec) -> Objective:
    """cd / pcd (spec.persistent): objective.cd_steps Gibbs sweeps, no perturbation, no lower level."""
    cd = ContrastiveDivergence(steps=cfg.cd_steps, persistent=spec.persistent)
    return Objective(cfg.name, spec, perturbation_of(cfg, spec), cd)
