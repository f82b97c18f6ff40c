"""Gaussian RBM: exact log Z, score, exact-posterior identity of BiSM."""

from __future__ import annotations

import math

import pytest
import torch

from distributed_bism.config import ObjectiveConfig
from distributed_bism.models import BernoulliPosterior, GaussianRBM, PosteriorView
from distributed_bism.objectives import get_objective
from tests.helpers.tiny_models import tiny_grbm


def _trapezoid_log_integral(log_f: torch.Tensor, dx: float, dims: int) -> float:
    """log ∫ f over a uniform grid (trapezoid rule in each dimension), from log f values."""
    w = torch.ones(log_f.shape[0], dtype=log_f.dtype)
    w[0] = w[-1] = 0.5
    weights = w
    for _ in range(dims - 1):
        weights = weights[..., None] * w
    return (torch.logsumexp((log_f + weights.log()).flatten(), 0) + dims * math.log(dx)).item()


@pytest.mark.parametrize("v_dim,h_dim", [(1, 3), (2, 2), (2, 4)])
def test_log_partition_matches_numerical_integration(float64, v_dim, h_dim):
    grbm, _ = tiny_grbm(v_dim, h_dim)
    n = 4001 if v_dim == 1 else 801
    grid = torch.linspace(-10, 10, n)
    pts = grid[:, None] if v_dim == 1 else torch.cartesian_prod(grid, grid)
    with torch.no_grad():
        log_f = (-grbm.free_energy(pts)).view(*([n] * v_dim))
        numeric = _trapezoid_log_integral(log_f, (grid[1] - grid[0]).item(), v_dim)
        exact = grbm.log_partition().item()
    assert exact == pytest.approx(numeric, abs=1e-6)


def test_log_partition_chunks_do_not_change_the_value(float64):
    grbm, _ = tiny_grbm(5, 9)
    with torch.no_grad():
        assert grbm.log_partition(chunk_size=7).item() == pytest.approx(grbm.log_partition().item(), abs=1e-10)


def test_log_partition_refuses_large_h():
    with pytest.raises(ValueError, match="H=21 exceeds the limit of 20"):
        GaussianRBM(3, 21).log_partition()


def test_exact_score_matches_autograd_of_free_energy(float64):
    grbm, _ = tiny_grbm(4, 5)
    v = torch.randn(7, 4, requires_grad=True)
    (grad_f,) = torch.autograd.grad(grbm.free_energy(v).sum(), v)
    torch.testing.assert_close(grbm.score(v), -grad_f, rtol=0, atol=1e-12)


def test_free_energy_marginalises_the_joint(float64):
    grbm, _ = tiny_grbm(3, 4)
    v = torch.randn(5, 3)
    hs = torch.cartesian_prod(*[torch.tensor([0.0, 1.0])] * 4)  # (16, 4)
    joint = torch.stack([grbm(v, h.expand(5, 4)) for h in hs])  # (16, 5)
    torch.testing.assert_close(grbm.free_energy(v), -torch.logsumexp(-joint, 0), rtol=0, atol=1e-12)


def test_gibbs_samplers_have_the_right_moments(float64):
    grbm, _ = tiny_grbm(2, 3)
    gen = torch.Generator().manual_seed(0)
    v = torch.randn(1, 2).expand(200_000, 2)
    h = grbm.sample_h(v, gen)
    torch.testing.assert_close(h.mean(0), torch.sigmoid(grbm.posterior_logits(v[:1]))[0], atol=5e-3, rtol=0)
    hv = torch.tensor([[1.0, 0.0, 1.0]]).expand(200_000, 3)
    samples = grbm.sample_v(hv, gen)
    torch.testing.assert_close(samples.mean(0), grbm.visible_mean(hv[:1])[0], atol=1e-2, rtol=0)
    torch.testing.assert_close(samples.std(0), torch.exp(grbm.log_sigma), atol=1e-2, rtol=0)
    assert grbm.gibbs_step(v[:10], gen).shape == (10, 2)


def exact_posterior(grbm: GaussianRBM) -> BernoulliPosterior:
    """A Bernoulli posterior whose linear logits are exactly c + Wᵀv, sampled without relaxation."""
    q = BernoulliPosterior(grbm.v_dim, grbm.h_dim, relaxed=False)
    with torch.no_grad():
        q.net[0].weight.copy_(grbm.W.T)
        q.net[0].bias.copy_(grbm.c)
    return q


def test_bism_score_with_exact_posterior_is_the_marginal_score_for_every_h(float64):
    grbm, _ = tiny_grbm(3, 4)
    q = PosteriorView(exact_posterior(grbm))
    v = torch.randn(6, 3, requires_grad=True)
    binary = torch.cartesian_prod(*[torch.tensor([0.0, 1.0])] * 4)
    for h in list(binary) + [torch.rand(4) for _ in range(5)]:  # every binary h, and relaxed ones
        h = h.expand(6, 4)
        log_w = -grbm(v, h) - q.log_prob(q.encode(v), h)
        (s_w,) = torch.autograd.grad(log_w.sum(), v)
        torch.testing.assert_close(s_w, grbm.score(v), rtol=0, atol=1e-10)


@pytest.mark.parametrize("name", ["dsm", "mdsm", "ssm"])
def test_bism_loss_with_exact_posterior_equals_free_energy_score_matching(float64, name):
    grbm, _ = tiny_grbm(3, 4)
    q = PosteriorView(exact_posterior(grbm))
    bi = get_objective(ObjectiveConfig(name="bi" + name, sigma=0.2))
    baseline = get_objective(ObjectiveConfig(name=name, sigma=0.2))
    batch = bi.perturbation(torch.rand(32, 3))
    torch.testing.assert_close(bi.outer(grbm, q, batch), baseline.outer(grbm, None, batch), rtol=0, atol=1e-10)


def test_energy_rejects_mismatched_shapes():
    grbm = GaussianRBM(3, 4)
    with pytest.raises(ValueError, match=r"expects v of shape \(B, 3\)"):
        grbm(torch.randn(5, 2), torch.rand(5, 4))
    with pytest.raises(ValueError, match="last dim 4"):
        grbm(torch.randn(5, 3), torch.rand(5, 2))
