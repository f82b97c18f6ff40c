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


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_conv_eblvm_has_the_reference_mnist_parameter_counts():
    """The reference's MNIST model (ch 64, one extra block per stage, 1×32×32, h_dim 50), counted from
    its code: energy 9,859,250 parameters, Conv3GaussQ posterior 779,364."""
    energy = ConvEBLVM((1, 32, 32), h_dim=50, ch=64, blocks_per_stage=1)
    q = GaussianPosterior((1, 32, 32), 50, encoder="conv", channels=(64, 128, 256))
    assert _count(energy) == 9_859_250
    assert _count(q) == 779_364
    assert energy.coupling.out_features == 4096  # (32/8)² · 4 · 64
    assert energy.features.out.in_features == 4 * 4 * 512  # the last 4×4×8ch map, flattened


def test_reference_block_has_a_bias_free_first_conv_and_a_1x1_shortcut_everywhere():
    from distributed_bism.models.conv_energy import ResidualBlock

    block = ResidualBlock(8, 8, downsample=False, form="reference")
    assert block.conv1.bias is None and block.conv1.out_channels == 8
    assert isinstance(block.shortcut, torch.nn.Conv2d) and block.shortcut.kernel_size == (1, 1)
    wide = ResidualBlock(8, 8, downsample=False, form="wide")
    assert isinstance(wide.shortcut, torch.nn.Identity) and wide.conv1.bias is not None


@pytest.mark.parametrize("block", ["reference", "wide"])
@pytest.mark.parametrize("readout", ["flatten", "pool"])
def test_every_block_and_readout_gives_energies(block, readout):
    energy = ConvEBLVM((1, 16, 16), h_dim=3, ch=2, blocks_per_stage=1, block=block, readout=readout, coupling_dim=7)
    v, h = torch.rand(4, 1, 16, 16, requires_grad=True), torch.randn(2, 4, 3)
    assert energy(v, h).shape == (2, 4)
    assert energy.coupling.out_features == 7
    # flatten keeps the 2×2 map's positions: 4 × 16 inputs; pool averages them away
    assert energy.features.out.in_features == (64 if readout == "flatten" else 16)


def test_flatten_readout_sees_where_features_are():
    """Moving a digit changes f(v) under flatten even where pooling over space is blind to it."""
    torch.manual_seed(0)
    v = torch.zeros(1, 1, 16, 16)
    v[..., 2:6, 2:6] = 1.0
    moved = torch.roll(v, shifts=(8, 8), dims=(2, 3))
    flat = ConvEBLVM((1, 16, 16), 4, ch=2, blocks_per_stage=0, readout="flatten")
    assert not torch.allclose(flat.visible_features(v), flat.visible_features(moved), atol=1e-4)


def test_config_builds_the_reference_model_by_default_and_rejects_unknown_forms():
    from distributed_bism.config import ConfigError

    energy = build_energy(ModelConfig(name="conv", h_dim=20, ch=16, blocks_per_stage=0), (1, 8, 8))
    assert energy.coupling.out_features == 64  # (8/8)² · 4 · 16
    assert energy.features.body[1].conv1.bias is None
    with pytest.raises(ConfigError, match="model.readout"):
        ModelConfig(name="conv", readout="max")
    with pytest.raises(ConfigError, match="model.block"):
        ModelConfig(name="conv", block="bottleneck")
    with pytest.raises(ConfigError, match="model.head"):
        ModelConfig(name="conv", head="elu_square")


def test_plain_ebm_head_is_a_sum_of_squared_elus():
    from distributed_bism.models import MarginalEnergy

    ebm = MarginalEnergy((1, 8, 8), net="conv", ch=2, blocks_per_stage=0, head="elu_square")
    v = torch.rand(5, 1, 8, 8)
    feats = ebm.net(v)
    assert feats.shape == (5, 8)  # (8/8)² · 4 · 2 outputs
    torch.testing.assert_close(ebm(v), torch.nn.functional.elu(feats).pow(2).sum(-1))
