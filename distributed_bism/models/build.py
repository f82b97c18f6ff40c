"""Fresh models from a Config: what training starts from and what a checkpoint is loaded into."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from distributed_bism.config import Config
from distributed_bism.models import build_energy, build_posterior


def build_models(
    cfg: Config, input_shape: Sequence[int], *, with_posterior: bool
) -> tuple[nn.Module, nn.Module | None]:
    """Freshly initialised (energy, posterior or None) for examples of `input_shape`: what the energy
    takes per example, flat (D,) for a GRBM (data.prepare.model_input_shape). The posterior is built
    only `with_posterior` (a bi-level objective, or a checkpoint that stored one)."""
    energy = build_energy(cfg.model, tuple(input_shape))
    posterior = build_posterior(cfg.posterior, tuple(input_shape), cfg.model.h_dim) if with_posterior else None
    return energy, posterior
