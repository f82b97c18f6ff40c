"""Langevin samplers of the model: on the joint (v, h), and on the marginal v with the VaES score.

joint_langevin: x = (v, h) flattened together, annealed Langevin on E(v, h); v starts at
    N(0.5, 1) per pixel (as in the reference), h from N(0, I). Needs continuous h: a Gaussian RBM's h
    is binary (its E is linear in h, so exp(−E) over real h is not normalisable) and is refused;
    sample a GRBM with `gibbs` or `marginal_langevin`.
marginal_langevin: annealed Langevin on v with ∇ₓE replaced by −VaES(x) (objectives/vages.py,
    `num_particles` particles of q(h|x)); for a Gaussian RBM without a posterior the exact score,
    and for a marginal energy E(v) (no latent: the plain EBM) −∇ₓE.
Defaults are the reference's schedule (samplers/langevin.py), which cools to T=0 for sharp images;
for draws of p itself end at T=1 (t_max=1, anneal=cool=0, denoise_sigma=0).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import cast

import torch
from torch import Tensor, nn

from distributed_bism.models import GaussianRBM, unwrap
from distributed_bism.models.posterior import Posterior, PosteriorView
from distributed_bism.objectives.vages import vaes_score_fn
from distributed_bism.samplers.base import Sampler, SampleResult, describe_schedule, register_sampler
from distributed_bism.samplers.langevin import (
    LangevinSchedule,
    annealed_langevin,
    energy_grad_fn,
    langevin_with_grad,
    reference_start,
)


def model_score_fn(
    energy: nn.Module, posterior: nn.Module | None, *, num_particles: int = 10
) -> tuple[Callable[[Tensor], Tensor], str]:
    """(x (B, ...) ↦ ∇ₓ log p(x) (B, ...) detached, a short name of how): the VaES estimate with L =
    `num_particles` when there is a posterior, the exact score of a Gaussian RBM, −∇ₓE of a marginal
    energy E(v). `energy` and `posterior` unwrapped."""
    if posterior is not None:
        # Any q(h|v) module with Posterior's interface (rsample, log_prob), not only a subclass.
        q = PosteriorView(cast(Posterior, posterior))
        vaes = vaes_score_fn(energy, q, num_particles=num_particles, create_graph=False)
        return (lambda x: vaes(x).detach()), f"VaES score, L={num_particles}"
    if isinstance(energy, GaussianRBM):
        return (lambda x: energy.score(x).detach()), "exact score"
    if getattr(energy, "h_dim", None) is None:  # a marginal energy E(v): no latent
        grad = energy_grad_fn(energy)
        return (lambda x: -grad(x)), "−∇E"
    raise ValueError("the score of a latent-variable model needs its posterior (VaES)")


class _EvalMode:
    """Run a module in eval mode (no dropout/batch-norm updates while sampling), restoring it after."""

    def __init__(self, module: nn.Module):
        self.module, self.was_training = module, module.training

    def __enter__(self) -> nn.Module:
        self.module.eval()
        return self.module

    def __exit__(self, *exc: object) -> None:
        self.module.train(self.was_training)


INITS = ("noise", "data")


def _start(
    init: str,
    num_samples: int,
    data_shape: Sequence[int],
    v_data: Tensor | None,
    ref: Tensor,
    gen: torch.Generator,
    sampler: str,
) -> Tensor:
    """The chains' v0: the reference's N(0.5, 1) ("noise"), or the first rows of v_data ("data")."""
    if init == "noise":
        return reference_start(num_samples, data_shape, ref, gen)
    if v_data is None or len(v_data) < num_samples:
        raise ValueError(f"{sampler} with init=data needs at least {num_samples} rows of v_data")
    return v_data[:num_samples].reshape(num_samples, *data_shape).to(ref).clone()


def _check_init(init: str, sampler: str) -> None:
    if init not in INITS:
        raise ValueError(f"{sampler}: init must be one of {INITS}, got {init!r}")


@register_sampler("joint_langevin")
@dataclass(frozen=True)
class JointLangevinSampler(Sampler):
    """schedule: the annealed Langevin schedule on (v, h); init: v0 from "noise" (the reference's
    N(0.5, 1)) or "data" (v_data, to study mixing: not independent draws of the model)."""

    schedule: LangevinSchedule = field(default_factory=LangevinSchedule)
    init: str = "noise"

    def __post_init__(self) -> None:
        _check_init(self.init, "joint_langevin")

    def sample(
        self,
        energy: nn.Module,
        posterior: nn.Module | None = None,
        *,
        num_samples: int,
        data_shape: Sequence[int],
        v_data: Tensor | None = None,
        seed: int = 0,
    ) -> SampleResult:
        core = unwrap(energy)
        if isinstance(core, GaussianRBM):
            raise ValueError(
                "joint_langevin needs continuous h; a Gaussian RBM's h is binary "
                "(use the gibbs or marginal_langevin sampler)"
            )
        ref = next(core.parameters())
        gen = torch.Generator(device=ref.device).manual_seed(seed)
        d = math.prod(data_shape)
        v0 = _start(self.init, num_samples, data_shape, v_data, ref, gen, self.name).reshape(num_samples, d)
        h_dim = cast(int, core.h_dim)  # a latent-variable energy's int attribute; nn.Module's stub says Tensor | Module
        h0 = torch.randn((num_samples, h_dim), generator=gen, dtype=ref.dtype, device=ref.device)

        def joint_energy(x: Tensor) -> Tensor:
            return core(x[:, :d].reshape(num_samples, *data_shape), x[:, d:])

        with _EvalMode(core):
            x = annealed_langevin(joint_energy, torch.cat([v0, h0], 1), self.schedule, gen)
        return SampleResult(
            x[:, :d].reshape(num_samples, *data_shape),
            f"joint Langevin on (v, h): {describe_schedule(self.schedule)}",
            self.name,
            True,
        )


@register_sampler("marginal_langevin")
@dataclass(frozen=True)
class MarginalLangevinSampler(Sampler):
    """schedule: the annealed Langevin schedule on v; num_particles: L of the VaES score; init as
    joint_langevin's."""

    schedule: LangevinSchedule = field(default_factory=LangevinSchedule)
    num_particles: int = 10
    init: str = "noise"

    def __post_init__(self) -> None:
        _check_init(self.init, "marginal_langevin")

    def sample(
        self,
        energy: nn.Module,
        posterior: nn.Module | None = None,
        *,
        num_samples: int,
        data_shape: Sequence[int],
        v_data: Tensor | None = None,
        seed: int = 0,
    ) -> SampleResult:
        core = unwrap(energy)
        ref = next(core.parameters())
        gen = torch.Generator(device=ref.device).manual_seed(seed)
        score, how = model_score_fn(core, posterior, num_particles=self.num_particles)
        v0 = _start(self.init, num_samples, data_shape, v_data, ref, gen, self.name)
        with _EvalMode(core):
            v = langevin_with_grad(lambda x: -score(x), v0, self.schedule, gen)
        return SampleResult(v, f"marginal Langevin on v ({how}): {describe_schedule(self.schedule)}", self.name, True)
