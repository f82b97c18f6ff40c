"""Samplers: the registry and labels, and Gibbs / marginal Langevin / joint Langevin against exact samples.

Two-sample check: unbiased MMD² with an RBF kernel (median-heuristic bandwidth), 1000 samples each,
against 1000 exact draws (seed 100). Measured (3-5 seeds each, float64):
    GRBM (D=2, H=4, W×2):  exact vs exact −0.0007..0.0001;  gibbs 100 sweeps −0.0005..0.0003;
        marginal Langevin, VaES (exact q, L=1), √α=0.15, 1000 steps at T=1: −0.0005..0.0003
    WRONG: exact draws of the model with b + 0.15: 0.009..0.016;  gibbs 2 sweeps: 0.012..0.019;
        marginal Langevin √α=0.1, 300 steps: 0.064..0.073 (the chains have not mixed)
    linear-Gaussian EBLVM: exact vs exact −0.0004..0.0004; joint Langevin √α=0.15, 1500 steps:
        −0.0007..0.0011;  WRONG: √α=0.1, 100 steps: 0.067..0.074
So the threshold 0.004 sits above every right sampler (≤ 0.0011) and below every wrong one (≥ 0.009).
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from distributed_bism.samplers import LangevinSchedule, get_sampler
from distributed_bism.samplers.mmd import mmd2_rbf
from tests.helpers.tiny_models import tiny_conv, tiny_grbm
from tests.unit.test_grbm import exact_posterior

pytestmark = pytest.mark.usefixtures("float64", "one_thread")

THRESHOLD = 0.004
N = 1000
AT_T1 = dict(t_max=1.0, hot=0, anneal=0, cool=0, denoise_sigma=0.0)  # plain Langevin at T = 1


def bimodal_grbm():
    grbm, _ = tiny_grbm(2, 4)
    with torch.no_grad():
        grbm.W.mul_(2)  # well-separated modes of p(v|h)
    return grbm


def exact(grbm, seed: int) -> Tensor:
    return grbm.sample_exact(N, torch.Generator().manual_seed(seed))


def test_gibbs_matches_the_exact_marginal():
    grbm = bimodal_grbm()
    ref = exact(grbm, 100)
    assert mmd2_rbf(ref, exact(grbm, 0)) < THRESHOLD
    good = get_sampler("gibbs", num_steps=100).sample(grbm, num_samples=N, data_shape=(2,), seed=0)
    assert mmd2_rbf(ref, good.samples) < THRESHOLD
    assert good.model_samples and good.sampler == "gibbs" and "100 block-Gibbs sweeps" in good.label
    short = get_sampler("gibbs", num_steps=2).sample(grbm, num_samples=N, data_shape=(2,), seed=0)
    assert mmd2_rbf(ref, short.samples) > THRESHOLD
    shifted = bimodal_grbm()
    with torch.no_grad():
        shifted.b.add_(0.15)
    assert mmd2_rbf(ref, exact(shifted, 0)) > THRESHOLD


def test_marginal_langevin_with_the_vaes_score_matches_the_exact_marginal():
    grbm = bimodal_grbm()
    ref = exact(grbm, 100)
    q = exact_posterior(grbm)
    good = get_sampler("marginal_langevin", num_particles=1, step=0.15, settle=1000, **AT_T1).sample(
        grbm, q, num_samples=N, data_shape=(2,), seed=0)
    assert mmd2_rbf(ref, good.samples) < THRESHOLD
    assert "VaES score, L=1" in good.label and "1000@T=1" in good.label
    short = get_sampler("marginal_langevin", num_particles=1, step=0.1, settle=300, **AT_T1).sample(
        grbm, q, num_samples=N, data_shape=(2,), seed=0)
    assert mmd2_rbf(ref, short.samples) > THRESHOLD


class LinearGaussianEBLVM(nn.Module):
    """E(v, h) = ½‖h‖² + ½‖v − A h − μ‖²/s²: h ~ N(0, I), v|h ~ N(Ah + μ, s²I), so p(v) = N(μ, AAᵀ + s²I)."""

    h_dim = 2

    def __init__(self):
        super().__init__()
        self.A = nn.Parameter(torch.tensor([[1.5, 0.0], [0.8, 0.6]]))
        self.mu = nn.Parameter(torch.tensor([0.5, -0.5]))
        self.s = 0.5

    def forward(self, v: Tensor, h: Tensor) -> Tensor:
        return 0.5 * (h**2).sum(-1) + 0.5 * ((v - h @ self.A.T - self.mu) ** 2).sum(-1) / self.s**2

    @torch.no_grad()
    def sample_exact(self, n: int, seed: int) -> Tensor:
        chol = torch.linalg.cholesky(self.A @ self.A.T + self.s**2 * torch.eye(2))
        return self.mu + torch.randn(n, 2, generator=torch.Generator().manual_seed(seed)) @ chol.T


def test_joint_langevin_matches_the_exact_marginal():
    model = LinearGaussianEBLVM()
    ref = model.sample_exact(N, 100)
    assert mmd2_rbf(ref, model.sample_exact(N, 0)) < THRESHOLD
    good = get_sampler("joint_langevin", step=0.15, settle=1500, **AT_T1).sample(model, num_samples=N,
                                                                                 data_shape=(2,), seed=0)
    assert mmd2_rbf(ref, good.samples) < THRESHOLD and good.label.startswith("joint Langevin on (v, h)")
    short = get_sampler("joint_langevin", step=0.1, settle=100, **AT_T1).sample(model, num_samples=N,
                                                                                data_shape=(2,), seed=0)
    assert mmd2_rbf(ref, short.samples) > THRESHOLD
    with pytest.raises(ValueError, match="needs continuous h; a Gaussian RBM's h is binary"):
        get_sampler("joint_langevin").sample(bimodal_grbm(), num_samples=4, data_shape=(2,))


def test_conditional_sampler_is_labelled_as_not_model_samples():
    energy, q = tiny_conv()
    data = torch.rand(3, 1, 8, 8)
    out = get_sampler("conditional", hot=2, anneal=2, cool=2).sample(energy, q, num_samples=3, data_shape=(1, 8, 8),
                                                                    v_data=data)
    assert out.samples.shape == (3, 1, 8, 8) and torch.isfinite(out.samples).all()
    assert not out.model_samples and out.label.startswith("conditional: v ~ p(v | h = E_q[h|v_data])")
    with pytest.raises(ValueError, match="needs at least 3 rows of v_data"):
        get_sampler("conditional").sample(energy, q, num_samples=3, data_shape=(1, 8, 8))


def test_registry_defaults_and_errors():
    assert get_sampler("conditional").schedule == LangevinSchedule(step=0.02, t_max=100.0, hot=500, anneal=2000,
                                                                   cool=200, denoise_sigma=0.1)
    temps = LangevinSchedule(hot=2, anneal=3, settle=2, cool=3, t_max=100.0).temperatures()
    torch.testing.assert_close(temps, torch.tensor([100.0, 100, 100, 10, 1, 1, 1, 1, 0.5, 0.0]))
    with pytest.raises(ValueError, match="unknown sampler 'hmc'; expected one of .*conditional, gibbs, joint_langevin, marginal_langevin"):
        get_sampler("hmc")
    with pytest.raises(ValueError, match="unknown setting"):
        get_sampler("gibbs", num_particles=3)
    with pytest.raises(ValueError, match="has no Langevin schedule"):
        get_sampler("gibbs", step=0.1)
    with pytest.raises(ValueError, match="gibbs sampler needs a Gaussian RBM"):
        get_sampler("gibbs").sample(LinearGaussianEBLVM(), num_samples=2, data_shape=(2,))


@pytest.mark.parametrize("name", ["marginal_langevin", "joint_langevin"])
def test_langevin_samplers_start_at_the_reference_noise_unless_told_to_start_at_data(name):
    """init=noise (default): v0 ~ N(0.5, 1) whatever v_data is given, so evaluation's model samples
    are independent of the data; init=data: the chains start at v_data."""
    model = LinearGaussianEBLVM() if name == "joint_langevin" else bimodal_grbm()  # the GRBM: its exact score
    q = None
    data = torch.full((5, 2), 7.0)
    none = dict(hot=0, anneal=0, cool=0, denoise_sigma=0.0)  # no step at all: the samples are v0
    with_data = get_sampler(name, **none).sample(model, q, num_samples=5, data_shape=(2,), v_data=data, seed=3)
    without = get_sampler(name, **none).sample(model, q, num_samples=5, data_shape=(2,), seed=3)
    assert torch.equal(with_data.samples, without.samples) and (with_data.samples - 0.5).abs().max() < 5
    started = get_sampler(name, init="data", **none).sample(model, q, num_samples=5, data_shape=(2,), v_data=data)
    assert torch.equal(started.samples, data)
    with pytest.raises(ValueError, match="init=data needs at least 5 rows of v_data"):
        get_sampler(name, init="data", **none).sample(model, q, num_samples=5, data_shape=(2,))
    with pytest.raises(ValueError, match="init must be one of"):
        get_sampler(name, init="uniform")
