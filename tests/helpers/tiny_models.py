"""Tiny float models with non-trivial parameters, for the exactness tests (GRBM, conv EBLVM)."""

from __future__ import annotations

import torch

from distributed_bism.models import BernoulliPosterior, ConvEBLVM, GaussianPosterior, GaussianRBM


def tiny_grbm(v_dim: int = 2, h_dim: int = 3, seed: int = 0) -> tuple[GaussianRBM, BernoulliPosterior]:
    """A GRBM with non-trivial parameters and a linear Bernoulli posterior (τ = 0.5)."""
    torch.manual_seed(seed)
    grbm = GaussianRBM(v_dim, h_dim, init_std=0.5)
    with torch.no_grad():
        grbm.b.normal_(0, 0.3)
        grbm.c.normal_(0, 0.3)
        grbm.log_sigma.normal_(0, 0.2)
    return grbm, BernoulliPosterior(v_dim, h_dim, temperature=0.5)


def tiny_conv(seed: int = 0) -> tuple[ConvEBLVM, GaussianPosterior]:
    """A conv EBLVM on 1×8×8 with 2 base channels and a small conv Gaussian posterior."""
    torch.manual_seed(seed)
    energy = ConvEBLVM((1, 8, 8), h_dim=3, ch=2, blocks_per_stage=0)
    q = GaussianPosterior((1, 8, 8), 3, encoder="conv", channels=(4, 4, 4))
    return energy, q
