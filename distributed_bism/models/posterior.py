"""Variational posteriors q_φ(h|v).

A posterior is split into a network and a distribution, so that the bi-level step can run
the network through `torch.func.functional_call` with unrolled parameters φ_k:

    params = posterior(v)                      # the network, (B, P)
    h      = posterior.rsample(params, L)      # reparameterised, (B, H) or (L, B, H)
    log_q  = posterior.log_prob(params, h)     # (B,) or (L, B)

`rsample` and `log_prob` use no module parameters, only `params`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call


def mlp(in_dim: int, hidden: Sequence[int], out_dim: int, act: type[nn.Module] = nn.ELU) -> nn.Sequential:
    """Linear layers in_dim → hidden... → out_dim with `act` between them (none after the last)."""
    layers: list[nn.Module] = []
    d = in_dim
    for width in hidden:
        layers += [nn.Linear(d, width), act()]
        d = width
    layers.append(nn.Linear(d, out_dim))
    return nn.Sequential(*layers)


def conv_encoder(in_shape: Sequence[int], channels: Sequence[int] = (64, 128, 256)) -> tuple[nn.Sequential, int]:
    """3×3 stride-2 convolutions with LeakyReLU(0.2), flattened. Returns (net, output dim)."""
    layers: list[nn.Module] = []
    c = in_shape[0]
    for width in channels:
        layers += [nn.Conv2d(c, width, 3, stride=2, padding=1), nn.LeakyReLU(0.2)]
        c = width
    layers.append(nn.Flatten())
    net = nn.Sequential(*layers)
    with torch.no_grad():
        out_dim = net(torch.zeros(1, *in_shape)).shape[1]
    return net, out_dim


class Posterior(nn.Module):
    """Base class: q_φ(h|v) over h ∈ R^H (or its relaxation)."""

    h_dim: int

    def rsample(self, params: Tensor, num_particles: int | None = None) -> Tensor:
        """Reparameterised h ~ q: (B, H), or (L, B, H) when num_particles=L."""
        raise NotImplementedError

    def log_prob(self, params: Tensor, h: Tensor) -> Tensor:
        """log q(h|v) for h of shape (..., B, H) → (..., B)."""
        raise NotImplementedError

    def mean(self, params: Tensor) -> Tensor:
        """E_q[h|v], shape (B, H)."""
        raise NotImplementedError


def _particle_shape(params: Tensor, h_dim: int, num_particles: int | None) -> tuple[int, ...]:
    batch = (params.shape[0], h_dim)
    return batch if num_particles is None else (num_particles, *batch)


class BernoulliPosterior(Posterior):
    """Factorised Bernoulli q(h|v) = Π_j Bern(h_j; sigmoid(logits_j(v))).

    Sampling is a Gumbel-sigmoid (binary concrete) relaxation at temperature τ:
        h = sigmoid((logits + log u − log(1−u)) / τ),   u ~ U(0, 1)
    and log q is the Bernoulli log-probability of the relaxed h:
        log q(h|v) = Σ_j h_j logits_j − softplus(logits_j).
    With `relaxed=False` samples are exact binary draws (not reparameterisable).

    Args:
        v_dim: flattened input size D. Inputs of shape (B, ...) are flattened.
        h_dim: H.
        hidden: () for linear logits, else the MLP's hidden widths.
        temperature: τ of the relaxation.
    """

    def __init__(
        self, v_dim: int, h_dim: int, *, hidden: Sequence[int] = (), temperature: float = 0.1, relaxed: bool = True
    ):
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"posterior temperature must be > 0, got {temperature}")
        self.h_dim, self.temperature, self.relaxed = h_dim, temperature, relaxed
        self.net = mlp(v_dim, hidden, h_dim)

    def forward(self, v: Tensor) -> Tensor:
        """Logits, (B, H)."""
        return self.net(v.flatten(1))

    def rsample(self, params: Tensor, num_particles: int | None = None) -> Tensor:
        shape = _particle_shape(params, self.h_dim, num_particles)
        if not self.relaxed:
            return torch.bernoulli(torch.sigmoid(params).detach().expand(shape))
        tiny = torch.finfo(params.dtype).tiny
        u = torch.rand(shape, dtype=params.dtype, device=params.device).clamp(tiny, 1 - 1e-7)
        logistic = torch.log(u) - torch.log1p(-u)
        return torch.sigmoid((params + logistic) / self.temperature)

    def log_prob(self, params: Tensor, h: Tensor) -> Tensor:
        return (h * params - F.softplus(params)).sum(-1)

    def mean(self, params: Tensor) -> Tensor:
        return torch.sigmoid(params)


class GaussianPosterior(Posterior):
    """Diagonal Gaussian q(h|v) = N(μ(v), diag σ(v)²), sampled as h = μ + σ ε.

    The encoder is an MLP on the flattened input (`encoder="mlp"`), or the reference's conv net
    (3×3 stride-2 convolutions 64→128→256 with LeakyReLU 0.2, `encoder="conv"`) on (B, C, H, W).
    Linear heads give μ and log σ; `forward` returns them concatenated as (B, 2H).
    """

    def __init__(
        self,
        in_shape: Sequence[int],
        h_dim: int,
        *,
        encoder: str = "conv",
        hidden: Sequence[int] = (256, 256),
        channels: Sequence[int] = (64, 128, 256),
    ):
        super().__init__()
        self.h_dim = h_dim
        if encoder == "mlp":
            d = math.prod(in_shape)
            self.body = (
                nn.Sequential(nn.Flatten(), mlp(d, hidden[:-1], hidden[-1]), nn.ELU()) if hidden else nn.Flatten()
            )
            feat = hidden[-1] if hidden else d
        elif encoder == "conv":
            if len(in_shape) != 3:
                raise ValueError(f"conv encoder needs an input shape (C, H, W), got {tuple(in_shape)}")
            self.body, feat = conv_encoder(in_shape, channels)
        else:
            raise ValueError(f"unknown posterior encoder {encoder!r}; expected 'mlp' or 'conv'")
        self.head = nn.Linear(feat, 2 * h_dim)

    def forward(self, v: Tensor) -> Tensor:
        """[μ, log σ] concatenated, (B, 2H)."""
        return self.head(self.body(v))

    def _split(self, params: Tensor) -> tuple[Tensor, Tensor]:
        return params[..., : self.h_dim], params[..., self.h_dim :]

    def rsample(self, params: Tensor, num_particles: int | None = None) -> Tensor:
        mu, log_std = self._split(params)
        eps = torch.randn(_particle_shape(params, self.h_dim, num_particles), dtype=params.dtype, device=params.device)
        return mu + torch.exp(log_std) * eps

    def log_prob(self, params: Tensor, h: Tensor) -> Tensor:
        mu, log_std = self._split(params)
        z = (h - mu) * torch.exp(-log_std)
        return (-0.5 * z**2 - log_std - 0.5 * math.log(2 * math.pi)).sum(-1)

    def mean(self, params: Tensor) -> Tensor:
        return self._split(params)[0]


@dataclass(frozen=True)
class PosteriorView:
    """q_φ at a chosen φ, as the objectives see it.

    `params=None` runs the module's own parameters through `forward` (which may be a DDP
    wrapper's forward, so that the wrapper sees the call); a dict runs
    `functional_call(module, params, v)`, which is how the unrolled φ_1..φ_K are evaluated
    without writing into the module.
    """

    module: Posterior
    params: Mapping[str, Tensor] | None = None
    forward: Callable[[Tensor], Tensor] | None = None

    def __call__(self, *args: Tensor) -> Any:
        """The module's forward at this φ, whatever its arguments (BiDVL's encoder-decoder
        takes (ĥ, v) and returns several passes)."""
        if self.params is not None:
            return functional_call(self.module, dict(self.params), args)
        return (self.forward or self.module)(*args)

    def encode(self, v: Tensor) -> Tensor:
        """Distribution parameters at v, (B, P)."""
        return self(v)

    def rsample(self, params: Tensor, num_particles: int | None = None) -> Tensor:
        return self.module.rsample(params, num_particles)

    def log_prob(self, params: Tensor, h: Tensor) -> Tensor:
        return self.module.log_prob(params, h)
