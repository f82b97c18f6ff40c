"""Block-Gibbs sampling of a Gaussian RBM: v → h ~ p(h|v) → v' ~ p(v|h), repeated.

Chains start from the base N(b, σ²) (init="noise") or from data (init="data"); after
`num_steps` sweeps their v are (approximately) draws of the marginal p(v).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from distributed_bism.models import GaussianRBM, unwrap
from distributed_bism.samplers.base import Sampler, SampleResult, register_sampler


@register_sampler("gibbs")
@dataclass(frozen=True)
class GibbsSampler(Sampler):
    """num_steps: block-Gibbs sweeps per chain; init: "noise" (v ~ N(b, σ²)) or "data" (v_data)."""

    num_steps: int = 1000
    init: str = "noise"

    def __post_init__(self) -> None:
        if self.num_steps < 1 or self.init not in ("noise", "data"):
            raise ValueError(
                f"gibbs: need num_steps >= 1 and init in (noise, data), got {self.num_steps}, {self.init!r}"
            )

    @torch.no_grad()
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
        grbm = unwrap(energy)
        if not isinstance(grbm, GaussianRBM):
            raise ValueError(f"the gibbs sampler needs a Gaussian RBM, got {type(grbm).__name__}")
        gen = torch.Generator(device=grbm.W.device).manual_seed(seed)
        if self.init == "data":
            if v_data is None or len(v_data) < num_samples:
                raise ValueError(f"gibbs with init=data needs at least {num_samples} rows of v_data")
            v = v_data[:num_samples].reshape(num_samples, grbm.v_dim).to(grbm.W)
        else:
            noise = torch.randn((num_samples, grbm.v_dim), generator=gen, dtype=grbm.W.dtype, device=grbm.W.device)
            v = grbm.b + torch.exp(grbm.log_sigma) * noise
        for _ in range(self.num_steps):
            v = grbm.gibbs_step(v, gen)
        return SampleResult(
            v.reshape(num_samples, *data_shape),
            f"gibbs: v ~ p(v), {self.num_steps} block-Gibbs sweeps from {self.init}",
            self.name,
            True,
        )
