"""Fisher divergence: the exact GRBM value against a closed form, and the VaES estimate against it."""

from __future__ import annotations

import pytest
import torch

from distributed_bism.data.synthetic import make_synthetic
from distributed_bism.evaluation.fisher import exact_fisher_divergence, synthetic_score_fn, vaes_fisher_divergence
from distributed_bism.models import GaussianRBM
from tests.helpers.tiny_models import tiny_grbm
from tests.unit.test_grbm import exact_posterior

pytestmark = pytest.mark.usefixtures("float64", "one_thread")


def test_exact_fisher_divergence_of_gaussians_matches_the_closed_form():
    """A GRBM with W = 0 is N(b, σ²); data N(m, s²). With a = 1/σ² − 1/s², k = m/s² − b/σ² the residual
    score is a·x + k, so D_F = ½ Σ_i (a_i m_i + k_i)² + a_i² s_i². 200k samples: MC error ≈ 0.3%."""
    grbm = GaussianRBM(3, 2, init_std=0.0)
    with torch.no_grad():
        grbm.b.copy_(torch.tensor([0.5, -1.0, 0.0]))
        grbm.log_sigma.copy_(torch.tensor([0.0, -0.5, 0.3]))
    m, s = torch.tensor([0.0, 0.5, 1.0]), torch.tensor([1.5, 0.7, 1.0])
    data = m + s * torch.randn(200_000, 3, generator=torch.Generator().manual_seed(0))
    var = torch.exp(2 * grbm.log_sigma.detach())
    a, k = 1 / var - 1 / s**2, m / s**2 - grbm.b.detach() / var
    closed = 0.5 * ((a * m + k) ** 2 + a**2 * s**2).sum().item()
    got = exact_fisher_divergence(grbm, data, lambda x: -(x - m) / s**2)
    assert got == pytest.approx(closed, rel=0.01)
    assert exact_fisher_divergence(grbm, data, grbm.score) == 0.0  # model = data


def test_vaes_fisher_divergence_matches_exact_with_the_exact_posterior():
    """GRBM (D=2, H=4) on 2000 points of 8gaussians, exact D_F = 15.77. Measured over 5 seeds:
        exact posterior, L=100, debiased:  15.763 ± 0.009 (rel −0.03%);  L=1 debiased: +0.5% ± 0.6%
        exact posterior, L=1, plain ½‖s_d − ŝ‖²: 16.66 (+5.7%: the particle-noise bias the debiasing removes)
        a poor posterior (untrained, τ=0.5), L=100: 16.62..16.66 (+5.4%)
    Tolerance 1% (≈ 18 sd of the exact-posterior estimate, a fifth of the poor posterior's error)."""
    grbm, poor = tiny_grbm(2, 4)
    with torch.no_grad():
        grbm.W.mul_(3)  # a posterior far from uniform, so that a poor q shows
    data = make_synthetic("8gaussians", 2000, seed=0).double()
    score = synthetic_score_fn("8gaussians")
    exact = exact_fisher_divergence(grbm, data, score)
    good = vaes_fisher_divergence(grbm, exact_posterior(grbm), data, score, num_particles=100, seed=0)
    assert good == pytest.approx(exact, rel=0.01)
    biased = vaes_fisher_divergence(grbm, exact_posterior(grbm), data, score, num_particles=1, debias=False, seed=0)
    assert biased > exact * 1.03
    bad = vaes_fisher_divergence(grbm, poor, data, score, num_particles=100, seed=0)
    assert abs(bad - exact) > 0.03 * exact


def test_synthetic_score_needs_a_smooth_density():
    with pytest.raises(ValueError, match="no closed-form score for data set 'checkerboard'"):
        synthetic_score_fn("checkerboard")
