"""Gaussian-Bernoulli RBM in the reference parametrisation (docs/methods.md §2).

    E(v, h) = ½ Σ_i (v_i − b_i)² / σ_i² − cᵀh − vᵀWh,        h ∈ {0, 1}^H
    F(v)    = ½ Σ_i (v_i − b_i)² / σ_i² − Σ_j softplus(c_j + (Wᵀv)_j)
    p(h|v)  = sigmoid(c + Wᵀv)
    p(v|h)  = N(b + σ² ⊙ W h, diag σ²)
    ∇_v log p(v) = −(v − b) / σ² + W sigmoid(c + Wᵀv)

Shapes: v is (B, D); h is (B, H) or, for several particles, (L, B, H). log σ is learned.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# 2^20 configurations is the most that enumeration of h is allowed to visit.
MAX_ENUMERABLE_H = 20


INITS = ("reference", "small")


class GaussianRBM(nn.Module):
    """Gaussian RBM with learned per-pixel log σ.

    Args:
        v_dim: D, the number of visible units.
        h_dim: H, the number of binary hidden units.
        init: how W, b and c start (log σ starts at `init_log_sigma` either way):
            "reference": the reference implementation's (baofff/BiSM models/rbm.py): W by
                nn.Linear's default kaiming_uniform(a=√5), which for a D×H weight is
                U(−1/√H, 1/√H), and b, c uniform with the same bound.
            "small": W ~ N(0, init_std²), b = c = 0 (hidden units start near-identical, with
                p(h|v) ≈ ½: a symmetric saddle that learners take thousands of iterations to leave).
            None (the default): "small" when `init_std` is given, else "reference".
        init_std: standard deviation of the initial W under init="small" (default 0.01).
        init_log_sigma: initial value of every log σ_i.
    """

    def __init__(
        self,
        v_dim: int,
        h_dim: int,
        *,
        init: str | None = None,
        init_std: float | None = None,
        init_log_sigma: float = 0.0,
    ):
        super().__init__()
        if v_dim <= 0 or h_dim <= 0:
            raise ValueError(f"GaussianRBM needs v_dim > 0 and h_dim > 0, got v_dim={v_dim}, h_dim={h_dim}")
        if init is None:
            init = "small" if init_std is not None else "reference"
        if init not in INITS:
            raise ValueError(f"GaussianRBM init must be one of {INITS}, got {init!r}")
        if init_std is not None and init != "small":
            raise ValueError(f"GaussianRBM init_std applies only to init='small', got init={init!r}")
        self.v_dim, self.h_dim = v_dim, h_dim
        self.W = nn.Parameter(torch.empty(v_dim, h_dim))
        self.b = nn.Parameter(torch.zeros(v_dim))
        self.c = nn.Parameter(torch.zeros(h_dim))
        self.log_sigma = nn.Parameter(torch.full((v_dim,), float(init_log_sigma)))
        with torch.no_grad():
            if init == "reference":
                bound = 1 / math.sqrt(h_dim)  # kaiming_uniform(a=√5) of a (D, H) weight: fan_in = H
                self.W.uniform_(-bound, bound)
                self.c.uniform_(-bound, bound)
                self.b.uniform_(-bound, bound)
            else:
                self.W.copy_(torch.randn(v_dim, h_dim) * (0.01 if init_std is None else init_std))

    # ----------------------------------------------------------------- energies
    def _check_v(self, v: Tensor) -> Tensor:
        if v.dim() != 2 or v.shape[1] != self.v_dim:
            raise ValueError(f"GaussianRBM expects v of shape (B, {self.v_dim}), got {tuple(v.shape)}")
        return v

    def _quadratic(self, v: Tensor) -> Tensor:
        """½ Σ_i (v_i − b_i)²/σ_i², shape (B,)."""
        return 0.5 * (((v - self.b) * torch.exp(-self.log_sigma)) ** 2).sum(-1)

    def forward(self, v: Tensor, h: Tensor | None = None) -> Tensor:
        """Joint energy E(v, h): v (B, D), h (B, H) or (L, B, H) → (B,) or (L, B).

        With h=None this is the free energy F(v), (B,): the baselines call it through the same
        forward, so that a DDP wrapper sees the call.
        """
        self._check_v(v)
        if h is None:
            return self.free_energy(v)
        if h.shape[-1] != self.h_dim:
            raise ValueError(f"GaussianRBM expects h with last dim {self.h_dim}, got {tuple(h.shape)}")
        return self._quadratic(v) - h @ self.c - ((v @ self.W) * h).sum(-1)

    energy = forward

    def posterior_logits(self, v: Tensor) -> Tensor:
        """Logits of the exact p(h|v): c + Wᵀv, shape (B, H)."""
        return self._check_v(v) @ self.W + self.c

    def free_energy(self, v: Tensor) -> Tensor:
        """F(v) = −log Σ_h exp(−E(v, h)), shape (B,)."""
        return self._quadratic(v) - F.softplus(self.posterior_logits(v)).sum(-1)

    def score(self, v: Tensor) -> Tensor:
        """Exact marginal score ∇_v log p(v) = −(v−b)/σ² + W sigmoid(c + Wᵀv), shape (B, D)."""
        var = torch.exp(2 * self.log_sigma)
        return -(v - self.b) / var + torch.sigmoid(self.posterior_logits(v)) @ self.W.T

    # ----------------------------------------------------------------- sampling
    def visible_mean(self, h: Tensor) -> Tensor:
        """Mean of p(v|h): b + σ² ⊙ W h, for h (..., H) → (..., D)."""
        return self.b + torch.exp(2 * self.log_sigma) * (h @ self.W.T)

    def sample_h(self, v: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """h ~ p(h|v), binary, shape (B, H)."""
        probs = torch.sigmoid(self.posterior_logits(v))
        return torch.bernoulli(probs, generator=generator)

    def sample_v(self, h: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """v ~ p(v|h), shape (B, D)."""
        mean = self.visible_mean(h)
        noise = torch.randn(mean.shape, generator=generator, dtype=mean.dtype, device=mean.device)
        return mean + torch.exp(self.log_sigma) * noise

    def gibbs_step(self, v: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """One block-Gibbs sweep v → h ~ p(h|v) → v' ~ p(v|h), shape (B, D)."""
        return self.sample_v(self.sample_h(v, generator), generator)

    # ------------------------------------------------------------ partition fn
    def log_partition(self, *, chunk_size: int = 1 << 14) -> Tensor:
        """Exact log Z by enumerating all 2^H hidden states, in chunks of `chunk_size`.

        log Z = (D/2) log 2π + Σ_i log σ_i + logsumexp_h [ (c + Wᵀb)ᵀh + ½ ‖σ ⊙ (W h)‖² ]

        Memory is O(chunk_size · max(D, H)) whatever H is. Raises ValueError for H > 20.
        """
        H = self.h_dim
        if H > MAX_ENUMERABLE_H:
            raise ValueError(
                f"exact log Z enumerates 2^H hidden states; H={H} exceeds the limit of {MAX_ENUMERABLE_H}"
                " (use an AIS estimate instead)"
            )
        partial = [
            torch.logsumexp(self.hidden_log_weight(self.hidden_states(start, start + chunk_size)), 0)
            for start in range(0, 2**H, chunk_size)
        ]
        log_norm = 0.5 * self.v_dim * math.log(2 * math.pi) + self.log_sigma.sum()
        return log_norm + torch.logsumexp(torch.stack(partial), 0)

    def hidden_states(self, start: int, stop: int) -> Tensor:
        """The binary hidden states with indices start..stop-1 (bit j of the index is h_j), (n, H)."""
        idx = torch.arange(start, min(stop, 2**self.h_dim), device=self.W.device)
        bits = 2 ** torch.arange(self.h_dim, device=self.W.device)
        return ((idx[:, None] & bits) > 0).to(self.W.dtype)

    def hidden_log_weight(self, h: Tensor) -> Tensor:
        """log p(h) + const = (c + Wᵀb)ᵀh + ½ ‖σ ⊙ (W h)‖², for h (..., H) → (...)."""
        return h @ (self.c + self.b @ self.W) + 0.5 * ((h @ self.W.T) * torch.exp(self.log_sigma)).pow(2).sum(-1)

    @torch.no_grad()
    def sample_exact(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """n exact samples v ~ p(v), (n, D): h from the enumerated marginal p(h), then v ~ p(v|h). H ≤ 20."""
        if self.h_dim > MAX_ENUMERABLE_H:
            raise ValueError(
                f"exact sampling enumerates 2^H hidden states; H={self.h_dim} exceeds the limit of "
                f"{MAX_ENUMERABLE_H} (use Gibbs sampling instead)"
            )
        probs = torch.softmax(self.hidden_log_weight(self.hidden_states(0, 2**self.h_dim)), 0)
        idx = torch.multinomial(probs, n, replacement=True, generator=generator)
        return self.sample_v(self.hidden_states(0, 2**self.h_dim)[idx], generator)

    def log_likelihood(self, v: Tensor, *, log_z: Tensor | None = None) -> Tensor:
        """Exact log p(v) = −F(v) − log Z, shape (B,). Pass `log_z` to reuse it across batches."""
        if log_z is None:
            log_z = self.log_partition()
        return -self.free_energy(v) - log_z
