"""Models: energies E_θ(v, h) and posteriors q_φ(h|v), built from config by name.

energies:    grbm (GaussianRBM), conv (ConvEBLVM), marginal_conv / marginal_mlp (MarginalEnergy, BiDVL)
posteriors:  bernoulli (BernoulliPosterior), gaussian (GaussianPosterior),
             encoder_decoder (EncoderDecoder: BiDVL's Q(h|v) and P(v|h) together)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import cast

from torch import nn

from distributed_bism.config import ModelConfig, PosteriorConfig
from distributed_bism.models.bidvl import EncoderDecoder, MarginalEnergy
from distributed_bism.models.conv_energy import ConvEBLVM
from distributed_bism.models.grbm import GaussianRBM
from distributed_bism.models.posterior import BernoulliPosterior, GaussianPosterior, Posterior, PosteriorView

__all__ = [
    "ConvEBLVM",
    "GaussianRBM",
    "MarginalEnergy",
    "EncoderDecoder",
    "BernoulliPosterior",
    "GaussianPosterior",
    "Posterior",
    "PosteriorView",
    "build_energy",
    "build_posterior",
    "unwrap",
]


def unwrap(module: object) -> nn.Module:
    """The model inside a DDP / DeepSpeed wrapper, or the model itself."""
    return cast(nn.Module, getattr(module, "module", module))


def build_energy(cfg: ModelConfig, data_shape: Sequence[int]) -> nn.Module:
    """The energy for data of shape `data_shape` (without the batch dimension)."""
    if cfg.name == "grbm":
        if len(data_shape) != 1:
            raise ValueError(f"model.name=grbm needs flat data (D,), got shape {tuple(data_shape)}")
        return GaussianRBM(data_shape[0], cfg.h_dim, init=cfg.init, init_std=cfg.init_std)
    if cfg.name in ("marginal_conv", "marginal_mlp"):
        return MarginalEnergy(
            data_shape,
            net=cfg.name.removeprefix("marginal_"),
            hidden=cfg.hidden,
            ch=cfg.ch,
            blocks_per_stage=cfg.blocks_per_stage,
            block=cfg.block,
            readout=cfg.readout,
            head=cfg.head,
        )
    if len(data_shape) != 3:
        raise ValueError(f"model.name=conv needs image data (C, H, W), got shape {tuple(data_shape)}")
    return ConvEBLVM(
        data_shape,
        cfg.h_dim,
        ch=cfg.ch,
        blocks_per_stage=cfg.blocks_per_stage,
        coupling_dim=cfg.coupling_dim,
        block=cfg.block,
        readout=cfg.readout,
    )


def build_posterior(cfg: PosteriorConfig, data_shape: Sequence[int], h_dim: int) -> Posterior | EncoderDecoder:
    """The posterior q(h|v) over h_dim latents for data of shape `data_shape` (for BiDVL, the
    encoder-decoder pair that takes the posterior's place)."""
    if cfg.name == "bernoulli":
        return BernoulliPosterior(math.prod(data_shape), h_dim, hidden=cfg.hidden, temperature=cfg.temperature)
    encoder = cfg.encoder if len(data_shape) == 3 else "mlp"
    if cfg.name == "encoder_decoder":
        return EncoderDecoder(
            data_shape,
            h_dim,
            encoder=encoder,
            hidden=cfg.hidden or [256, 256],
            channels=cfg.channels,
            decoder_hidden=cfg.decoder_hidden,
            decoder_output=cfg.decoder_output,
        )
    return GaussianPosterior(data_shape, h_dim, encoder=encoder, hidden=cfg.hidden or [256, 256], channels=cfg.channels)
