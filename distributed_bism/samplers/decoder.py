"""BiDVL's generator as a sampler (`bidvl_decoder`): v = P_ψ(ĥ), ĥ ~ N(0, I), one decoder pass
(Kan et al. 2022; models/bidvl.py). Draws of the decoder, which BiDVL trains to match the
energy's marginal; the energy itself is not sampled."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from distributed_bism.models import EncoderDecoder, unwrap
from distributed_bism.samplers.base import Sampler, SampleResult, register_sampler

SAMPLER_NAME = "bidvl_decoder: v = P(ĥ), ĥ ~ N(0, I)"


@register_sampler("bidvl_decoder")
@dataclass(frozen=True)
class DecoderSampler(Sampler):
    """num_samples decoder draws P(ĥ); needs BiDVL's EncoderDecoder as the posterior."""

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
        core = unwrap(posterior) if posterior is not None else None
        if not isinstance(core, EncoderDecoder):
            raise ValueError("the bidvl_decoder sampler needs BiDVL's encoder-decoder (posterior.name=encoder_decoder)")
        device = next(core.parameters()).device
        samples = core.generate(num_samples, generator=torch.Generator(device=device).manual_seed(seed))
        return SampleResult(samples.reshape(num_samples, *data_shape), SAMPLER_NAME, self.name, True)
