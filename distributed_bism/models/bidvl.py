"""BiDVL's decoupled EBLVM (Kan et al. 2022; docs/methods.md §4): a marginal energy E_θ(v), an
encoder Q_φ(h|v) and a decoder P_ψ(v|h) with prior h ~ N(0, I).

    E_θ(v)       `MarginalEnergy`: a network v → scalar, (B, ...) → (B,)
    Q_φ(h|v)     N(μ(v), diag σ(v)²), a `GaussianPosterior` (conv or MLP encoder)
    P_ψ(v|h)     a point mass at dec(h): an MLP h → v squashed into the data range, (B, H) → (B, ...)

The encoder and the decoder are one module, `EncoderDecoder`, so that they occupy the bi-level
step's posterior slot together (φ stands for (φ, ψ)): one optimiser, one checkpoint entry, one
DDP wrapper or DeepSpeed engine, and `PosteriorView` evaluates both at unrolled parameters.
Its forward runs every pass a BiDVL loss needs in one call, because a DDP wrapper averages
gradients only when its forward is the one called.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from distributed_bism.models.conv_energy import (
    Padding,
    ResNetFeatures,
    checked_pad,
    padded_sides,
    reference_coupling_dim,
    side_padding,
)
from distributed_bism.models.posterior import GaussianPosterior, mlp

ENERGY_NETS = ("conv", "mlp")
ENERGY_HEADS = ("linear", "elu_square")
DECODER_OUTPUTS = ("sigmoid", "tanh", "none")


class MarginalEnergy(nn.Module):
    """E_θ(v) ∈ R, no latent: BiDVL's energy, and the plain EBM that DSM / MDSM train.

    net="conv": the conv EBLVM's ResNet (ch → 8ch, `blocks_per_stage` extra blocks per stage,
    `block` and `readout` as in conv_energy.py, inputs zero-padded to a multiple of 8); needs (C, H, W).
    net="mlp": an ELU MLP of widths `hidden` on the flattened input; any shape.
    head="linear": E = w·φ(v) + b, one output. head="elu_square" (conv only; the reference's
    plain EBM, its EBMResNet): E = Σ_k ELU(Linear(φ(v)))_k² over D = (H/8)(W/8)·4·ch outputs.
    """

    def __init__(
        self,
        in_shape: Sequence[int],
        *,
        net: str = "mlp",
        hidden: Sequence[int] = (256, 256),
        ch: int = 64,
        blocks_per_stage: int = 1,
        block: str = "reference",
        readout: str = "flatten",
        head: str = "linear",
    ):
        super().__init__()
        self.in_shape = tuple(int(s) for s in in_shape)
        if head not in ENERGY_HEADS:
            raise ValueError(f"unknown energy head {head!r}; expected one of {ENERGY_HEADS}")
        self.square = head == "elu_square"
        if net == "conv":
            if len(self.in_shape) != 3:
                raise ValueError(f"a conv marginal energy needs image data (C, H, W), got shape {self.in_shape}")
            self.padding: Padding = side_padding(self.in_shape)
            sides = padded_sides(self.in_shape, self.padding)
            width = reference_coupling_dim(sides, ch) if self.square else 1
            self.net: nn.Module = ResNetFeatures(
                (self.in_shape[0], *sides),
                width,
                ch=ch,
                blocks_per_stage=blocks_per_stage,
                block=block,
                readout=readout,
            )
        elif net == "mlp":
            if self.square:
                raise ValueError("head elu_square is the conv energy's; net mlp has a linear head")
            self.padding = ((0, 0), (0, 0))
            self.net = nn.Sequential(nn.Flatten(), mlp(math.prod(self.in_shape), hidden, 1))
        else:
            raise ValueError(f"unknown marginal energy network {net!r}; expected one of {ENERGY_NETS}")

    def forward(self, v: Tensor) -> Tensor:
        """E(v): (B, *in_shape) → (B,)."""
        out = self.net(checked_pad(v, self.in_shape, self.padding, "MarginalEnergy"))
        return F.elu(out).pow(2).sum(-1) if self.square else out.squeeze(-1)


class BiDVLPasses(NamedTuple):
    """What one `EncoderDecoder` forward computed. B examples, H latents, data shape (...).

    x_gen:      P(ĥ), decoded prior draws, (B, ...)
    mu_gen:     μ_Q(P(ĥ)) with the encoder's parameters held fixed (the latent reconstruction
                shapes the decoder only, as in the reference), (B, H); None without v
    q_params:   Q's [μ, log σ] at the data v, (B, 2H); None without v
    recon:      P(h) at h ~ Q(h|v) (reparameterised), (B, ...); None without v
    """

    x_gen: Tensor
    mu_gen: Tensor | None = None
    q_params: Tensor | None = None
    recon: Tensor | None = None


class EncoderDecoder(nn.Module):
    """Q_φ(h|v) and P_ψ(v|h) together; see the module docstring.

    Args:
        in_shape: the data shape (without batch).
        h_dim: H.
        encoder / hidden / channels: the GaussianPosterior encoder (conv needs (C, H, W)).
        decoder_hidden: widths of the decoder MLP.
        decoder_output: sigmoid ([0, 1] data), tanh ([-1, 1]) or none (unbounded).
    """

    def __init__(
        self,
        in_shape: Sequence[int],
        h_dim: int,
        *,
        encoder: str = "mlp",
        hidden: Sequence[int] = (256, 256),
        channels: Sequence[int] = (64, 128, 256),
        decoder_hidden: Sequence[int] = (256, 256),
        decoder_output: str = "sigmoid",
    ):
        super().__init__()
        if decoder_output not in DECODER_OUTPUTS:
            raise ValueError(f"unknown decoder output {decoder_output!r}; expected one of {DECODER_OUTPUTS}")
        self.in_shape, self.h_dim, self.decoder_output = tuple(int(s) for s in in_shape), h_dim, decoder_output
        self.encoder = GaussianPosterior(self.in_shape, h_dim, encoder=encoder, hidden=hidden, channels=channels)
        self.decoder = mlp(h_dim, decoder_hidden, math.prod(self.in_shape))

    # ------------------------------------------------------------------ the two networks
    def encode(self, v: Tensor) -> Tensor:
        """Q's [μ, log σ] at v: (B, ...) → (B, 2H)."""
        return self.encoder(v)

    def decode(self, h: Tensor) -> Tensor:
        """P's output dec(h): (B, H) → (B, *in_shape)."""
        x = self.decoder(h).view(-1, *self.in_shape)
        if self.decoder_output == "sigmoid":
            return torch.sigmoid(x)
        return torch.tanh(x) if self.decoder_output == "tanh" else x

    def forward(self, h_prior: Tensor, v: Tensor | None = None) -> BiDVLPasses:
        """The passes of the BiDVL losses: P(ĥ) for prior draws ĥ (B, H); with data v (B, ...)
        also μ_Q(P(ĥ)) (encoder held fixed), Q's parameters at v and a reconstruction P(h~Q)."""
        x_gen = self.decode(h_prior)
        if v is None:
            return BiDVLPasses(x_gen)
        # Parameters detached but the graph through x_gen kept: the gradient reaches ψ only.
        fixed = {n: p.detach() for n, p in self.encoder.named_parameters()}
        mu_gen = self.encoder.mean(functional_call(self.encoder, fixed, (x_gen,)))
        q_params = self.encoder(v)
        recon = self.decode(self.encoder.rsample(q_params))
        return BiDVLPasses(x_gen, mu_gen, q_params, recon)

    # ------------------------------------------------------------------ q(h|v), as a posterior
    def rsample(self, params: Tensor, num_particles: int | None = None) -> Tensor:
        return self.encoder.rsample(params, num_particles)

    def log_prob(self, params: Tensor, h: Tensor) -> Tensor:
        return self.encoder.log_prob(params, h)

    def mean(self, params: Tensor) -> Tensor:
        return self.encoder.mean(params)

    # ------------------------------------------------------------------ capabilities
    @torch.no_grad()
    def generate(self, num: int, *, generator: torch.Generator | None = None) -> Tensor:
        """num samples P(ĥ), ĥ ~ N(0, I): (num, *in_shape)."""
        p = next(self.decoder.parameters())
        h = torch.randn(num, self.h_dim, generator=generator, dtype=p.dtype, device=p.device)
        return self.decode(h)

    @torch.no_grad()
    def reconstruct(self, v: Tensor) -> Tensor:
        """v through Q then P at the encoder mean, P(μ_Q(v)): (B, ...) → (B, ...)."""
        return self.decode(self.encoder.mean(self.encode(v)))
