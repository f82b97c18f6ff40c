"""The reference's *conditional* sampler (docs/methods.md §2), used for the sample grids during training.

    h* = E_q[h | v_data]                       (the posterior mean at real data)
    v ~ p(v | h*)                              GRBM: exactly, N(b + σ² W h*, σ² I)
                                               deep EBLVM: annealed Langevin on E(·, h*)

Annealed Langevin:  x ← x − ½α ∇ₓE(x, h*) + √T √α ξ,  √α = step, with T held at t_max for
`hot` steps, decayed geometrically t_max → 1 over `anneal` steps, then linearly 1 → 0 over
`cool` steps, and finally one denoising step x ← x − σ0² ∇ₓE. These are samples of v given a
data point's code, not samples of the model's marginal; every artifact says so.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from distributed_bism.models import GaussianRBM, unwrap
from distributed_bism.models.posterior import Posterior
from distributed_bism.samplers.base import Sampler, SampleResult, register_sampler
from distributed_bism.samplers.langevin import LangevinSchedule, annealed_langevin, reference_start

SAMPLER_NAME = "conditional: v ~ p(v | h = E_q[h|v_data])"


@torch.no_grad()
def posterior_mean(posterior: nn.Module, v: Tensor) -> Tensor:
    """E_q[h|v], (B, h_dim)."""
    q: Posterior = unwrap(posterior)  # type: ignore[assignment]
    return q.mean(q(v))


def conditional_samples(
    energy: nn.Module, posterior: nn.Module | None, v_data: Tensor, schedule: LangevinSchedule, *, seed: int = 0
) -> Tensor:
    """One sample of v per data point in v_data (B, ...), given h* = E_q[h|v_data]. For a GRBM
    without a posterior (single-level baselines) h* is the exact posterior mean."""
    core = unwrap(energy)
    gen = torch.Generator(device=v_data.device).manual_seed(seed)
    if isinstance(core, GaussianRBM):
        with torch.no_grad():
            h = (
                posterior_mean(posterior, v_data)
                if posterior is not None
                else torch.sigmoid(core.posterior_logits(v_data))
            )
            return core.sample_v(h, generator=gen)
    if posterior is None:
        raise ValueError("the conditional sampler of a deep EBLVM needs its posterior")
    h = posterior_mean(posterior, v_data)
    x0 = reference_start(len(v_data), v_data.shape[1:], v_data, gen)  # the reference's N(0.5, 1)
    was_training = core.training
    core.eval()
    try:
        return annealed_langevin(lambda x: core(x, h), x0, schedule, generator=gen)
    finally:
        core.train(was_training)


@register_sampler("conditional")
@dataclass(frozen=True)
class ConditionalSampler(Sampler):
    """The reference's sampler: one v per data row given h* = E_q[h|v_data] (not model samples)."""

    schedule: LangevinSchedule = field(default_factory=LangevinSchedule)

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
        if v_data is None or len(v_data) < num_samples:
            raise ValueError(f"the conditional sampler needs at least {num_samples} rows of v_data")
        samples = conditional_samples(energy, posterior, v_data[:num_samples], self.schedule, seed=seed)
        return SampleResult(samples.reshape(num_samples, *data_shape), SAMPLER_NAME, self.name, False)
