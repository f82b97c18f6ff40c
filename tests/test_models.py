"""Shapes and distributions of the conv EBLVM and the posteriors."""

from __future__ import annotations

import pytest
import torch

from distributed_bism.config import ModelConfig, PosteriorConfig
from distributed_bism.models import BernoulliPosterior, ConvEBLVM, GaussianPosterior, build_energy, build_posterior


@pytest.mark.parametrize("shape", [(1, 8, 8), (1, 28, 28), (3, 32, 32), (3, 64, 64)])
def test_conv_eblvm_and_conv_posterior_work_at_every_input_size(shape):
    energy = ConvEBLVM(shape, h_dim=5, ch=4, blocks_per_stage=1)
    q = GaussianPosterior(shape, 5, encoder="conv", channels=(4, 8, 8))
    v = torch.rand(3, *shape, requires_grad=True)
    params = q(v)
    assert params.shape == (3, 10)
    h = q.rsample(params, 2)
    assert h.shape == (2, 3, 5)
    e = energy(v, h)
    assert e.shape == (2, 3)
    assert energy(v, h[0]).shape == (3,)
    (g,) = torch.autograd.grad(e.sum(), v)
    assert g.shape == v.shape and torch.isfinite(g).all()


def test_conv_eblvm_pads_28_to_32():
    energy = ConvEBLVM((1, 28, 28), h_dim=2, ch=2)
    assert energy.padding == ((2, 2), (2, 2))


def test_conv_eblvm_rejects_the_wrong_input_shape():
    energy = ConvEBLVM((1, 8, 8), h_dim=2, ch=2)
    with pytest.raises(ValueError, match=r"expects v of shape \(B, 1, 8, 8\)"):
        energy(torch.rand(2, 1, 16, 16), torch.rand(2, 2))


def test_features_path_equals_the_joint_energy():
    energy = ConvEBLVM((1, 8, 8), h_dim=3, ch=2)
    v, h = torch.rand(4, 1, 8, 8), torch.randn(4, 3)
    torch.testing.assert_close(energy.energy_from_features(energy.visible_features(v), h), energy(v, h))


def test_gaussian_posterior_log_prob_matches_torch_distributions(float64):
    q = GaussianPosterior((6,), 4, encoder="mlp", hidden=(8,))
    params = q(torch.randn(5, 6))
    h = q.rsample(params, 3)
    mu, log_std = params[:, :4], params[:, 4:]
    ref = torch.distributions.Normal(mu, log_std.exp()).log_prob(h).sum(-1)
    torch.testing.assert_close(q.log_prob(params, h), ref)


def test_bernoulli_posterior_relaxed_and_exact_samples(float64):
    q = BernoulliPosterior(6, 4, hidden=(8,), temperature=0.1)
    logits = q(torch.randn(3, 6))
    h = q.rsample(logits, 1000)
    assert h.shape == (1000, 3, 4) and ((h >= 0) & (h <= 1)).all()
    assert ((h > 0.01) & (h < 0.99)).any()  # relaxed, not binary
    # the relaxation's mean tends to the Bernoulli mean at low temperature
    torch.testing.assert_close(h.mean(0), torch.sigmoid(logits), atol=0.05, rtol=0)
    (g,) = torch.autograd.grad(h.sum(), logits)  # reparameterised
    assert g.abs().sum() > 0
    hard = BernoulliPosterior(6, 4, relaxed=False).rsample(logits, 5)
    assert set(hard.unique().tolist()) <= {0.0, 1.0}
    lp = q.log_prob(logits, hard)
    ref = torch.distributions.Bernoulli(logits=logits).log_prob(hard).sum(-1)
    torch.testing.assert_close(lp, ref)


def test_registry_builds_each_model():
    assert build_energy(ModelConfig(name="grbm", h_dim=4), (2,)).h_dim == 4
    assert build_energy(ModelConfig(name="conv", h_dim=4, ch=2), (1, 8, 8)).h_dim == 4
    assert isinstance(build_posterior(PosteriorConfig(name="bernoulli"), (2,), 4), BernoulliPosterior)
    q = build_posterior(PosteriorConfig(name="gaussian", channels=[4, 4, 4]), (1, 8, 8), 4)
    assert q(torch.rand(2, 1, 8, 8)).shape == (2, 8)
    with pytest.raises(ValueError, match="grbm needs flat data"):
        build_energy(ModelConfig(name="grbm"), (1, 8, 8))
