"""Log-likelihood of Gaussian RBMs: AIS and reverse AIS against exact enumeration, and RAISE. The
cross-rank reduction of AIS chains (2 gloo processes): tests/distributed/test_loglik_ranks.py."""

from __future__ import annotations

import math

import pytest
import torch

from distributed_bism.evaluation.loglik import (
    LogZEstimate,
    ais_log_likelihood,
    ais_log_partition,
    ais_log_weights,
    bidirectional_log_likelihood,
    chain_share,
    exact_log_likelihood,
    raise_log_likelihood,
    reverse_ais_log_partition,
)
from distributed_bism.models import GaussianRBM

pytestmark = pytest.mark.usefixtures("float64", "one_thread")


def digits_sized_grbm(seed: int = 0) -> GaussianRBM:
    """D=64, H=12 with W ~ N(0, 0.5²): log Z ≈ 82.38, far from the base (W=c=0) and multi-modal
    enough that short schedules fail (below)."""
    torch.manual_seed(seed)
    grbm = GaussianRBM(64, 12, init_std=0.5)
    with torch.no_grad():
        grbm.b.normal_(0, 0.5)
        grbm.c.normal_(0, 1.0)
        grbm.log_sigma.normal_(-0.3, 0.1)
    return grbm


def test_ais_and_reverse_ais_agree_with_exact_log_z():
    """500 chains × 2000 β (the reference's β count), seed 0. Measured over 10 seeds on this model
    (2026-12-01), error of log Ẑ:
        forward 500×2000  mean +0.001, sd 0.011, max |err| 0.017   (300×2000: sd 0.017, max 0.035;
                                                                    300×1000: sd 0.028, max 0.047)
        reverse 500×2000  mean −0.001, sd 0.006, max |err| 0.011
    so a few hundred chains meet |err| < 0.05 with > 4 sd to spare (~2.5 s each, one thread)."""
    grbm = digits_sized_grbm()
    exact = grbm.log_partition().item()
    data = grbm.sample_exact(50, torch.Generator().manual_seed(1))
    bounds = bidirectional_log_likelihood(grbm, data, num_chains=500, num_betas=2000, seed=0)
    fwd, rev = bounds.upper.log_z, bounds.lower.log_z
    assert abs(fwd.log_z - exact) < 0.05 and abs(rev.log_z - exact) < 0.05
    exact_ll = exact_log_likelihood(grbm, data)
    assert bounds.lower.loglik - 0.05 < exact_ll < bounds.upper.loglik + 0.05
    assert (fwd.side, rev.side, fwd.num_chains, fwd.num_betas) == ("lower", "upper", 500, 2000)
    # The reported spread is the size of the seed-to-seed error (0.011 measured), and the ESS is sane.
    assert 0.003 < fwd.std_err < 0.05 and 0.003 < rev.std_err < 0.05
    assert 100 < fwd.ess <= 500


def test_short_schedules_bracket_the_exact_log_z():
    """Forward AIS is a stochastic lower bound and reverse AIS from exact model samples an upper one.
    Measured at 200 chains × 10 β over 20 seeds: forward −1.39 ± 0.95, reverse +1.65 ± 0.79 (sd); a single
    run can cross the exact value, so the test compares means over 20 runs (sd of a mean ≈ 0.2)."""
    grbm = digits_sized_grbm()
    exact = grbm.log_partition().item()
    fwd = [ais_log_partition(grbm, num_chains=200, num_betas=10, seed=s).log_z - exact for s in range(20)]
    rev = [reverse_ais_log_partition(grbm, num_chains=200, num_betas=10, seed=s).log_z - exact for s in range(20)]
    assert sum(fwd) / 20 < -0.5 and sum(rev) / 20 > 0.5


def test_log_likelihood_estimates():
    """AIS log-likelihood = −mean F − log Ẑ (so it errs high), and RAISE on the model's own samples errs low: measured −0.17..−0.27 (5 seeds) at
    10 chains × 100 β, se 0.06. On N(0, I) noise, far from the model, RAISE errs HIGH (+1.19 at 100 β,
    +0.22 at 500 β): it bounds the annealed model's likelihood, not the model's."""
    grbm = digits_sized_grbm()
    gen = torch.Generator().manual_seed(1)
    data = grbm.sample_exact(50, gen)
    exact = exact_log_likelihood(grbm, data)
    torch.testing.assert_close(exact, grbm.log_likelihood(data).mean().item(), rtol=0, atol=1e-9)

    ais = ais_log_likelihood(grbm, data, num_chains=100, num_betas=50, seed=0)
    neg_f = (-grbm.free_energy(data)).mean().item()
    assert ais.loglik == pytest.approx(neg_f - ais.log_z.log_z, abs=1e-9) and ais.num_points == 50

    model_data = raise_log_likelihood(grbm, data, num_chains=10, num_betas=100, seed=0)
    assert exact - 1.0 < model_data.loglik < exact and model_data.log_z.side == "upper"
    noise = torch.randn(50, 64, generator=gen)
    assert raise_log_likelihood(grbm, noise, num_chains=10, num_betas=100, seed=0).loglik > exact_log_likelihood(grbm, noise)


def test_log_z_estimate_spread():
    """Equal weights: no spread, ESS = n; one dominant weight: ESS ≈ 1."""
    est = LogZEstimate.from_log_weights(torch.full((8,), 2.0), 1.0, num_betas=3, side="lower")
    assert est.log_z == pytest.approx(3.0) and est.std_err == pytest.approx(0.0) and est.ess == pytest.approx(8.0)
    skewed = LogZEstimate.from_log_weights(torch.tensor([0.0, -50.0, -50.0, -50.0]), 0.0, num_betas=3, side="lower")
    assert skewed.ess == pytest.approx(1.0) and skewed.log_z == pytest.approx(-math.log(4))
    with pytest.raises(ValueError, match="from 0 to 1"):
        ais_log_weights(GaussianRBM(2, 2), torch.tensor([0.0, 0.5]), 4)


def test_chain_shares_cover_all_chains():
    for n, world in [(301, 2), (7, 3), (2, 4)]:
        shares = [chain_share(n, r, world) for r in range(world)]
        assert sum(shares) == n and max(shares) - min(shares) <= 1
