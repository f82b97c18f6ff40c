"""The GRBM's initialisation (model.init, model.b_init) and its Bernoulli posterior's.

`reference` is the reference implementation's (baofff/BiSM models/rbm.py): W by
kaiming_uniform(a=√5) on the (D, H) weight, i.e. U(−1/√H, 1/√H), then its hidden bias c and its
visible bias b uniform with the same bound; log σ = 0. `small` is this package's earlier start:
W ~ N(0, init_std²), b = c = 0. The trainer set b to the training mean for every GRBM run before;
that is now `model.b_init=data_mean`, opt-in.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from distributed_bism.config import Config, ConfigError, from_dict, load_config
from distributed_bism.experiments import checkerboard_grbm
from distributed_bism.models import BernoulliPosterior, GaussianRBM
from distributed_bism.training.loop import TrainLoop


@pytest.mark.parametrize("v_dim,h_dim", [(2, 4), (64, 16)])
def test_reference_init_draws_what_the_reference_draws(v_dim, h_dim):
    torch.manual_seed(3)
    grbm = GaussianRBM(v_dim, h_dim)  # init="reference" is the default
    torch.manual_seed(3)
    W = torch.empty(v_dim, h_dim)
    nn.init.kaiming_uniform_(W, a=math.sqrt(5))  # the reference's call, on its (D, H) weight
    bound = 1 / math.sqrt(h_dim)
    c = torch.empty(h_dim).uniform_(-bound, bound)  # then its hidden bias, then its visible bias
    b = torch.empty(v_dim).uniform_(-bound, bound)
    assert torch.equal(grbm.W.detach(), W)
    assert torch.equal(grbm.c.detach(), c)
    assert torch.equal(grbm.b.detach(), b)
    assert torch.equal(grbm.log_sigma.detach(), torch.zeros(v_dim))


def test_reference_init_bounds_and_spread():
    """U(−1/√H, 1/√H) for W, b and c (H=16: bound 0.25), not a narrow or zero start."""
    torch.manual_seed(0)
    grbm = GaussianRBM(256, 16, init="reference")
    bound = 0.25
    for name in ("W", "b", "c"):
        x = getattr(grbm, name).detach()
        assert x.abs().max() <= bound, name
    W = grbm.W.detach()
    assert W.abs().max() > 0.99 * bound
    assert abs(W.std().item() - bound / math.sqrt(3)) < 0.01  # the sd of U(−a, a) is a/√3
    assert grbm.b.detach().std() > 0.1 and grbm.c.detach().std() > 0.05


def test_small_init_is_the_old_start():
    torch.manual_seed(5)
    grbm = GaussianRBM(3, 4, init="small", init_std=0.02)
    torch.manual_seed(5)
    assert torch.equal(grbm.W.detach(), torch.randn(3, 4) * 0.02)
    assert not grbm.b.detach().any() and not grbm.c.detach().any() and not grbm.log_sigma.detach().any()
    torch.manual_seed(5)
    default_std = GaussianRBM(3, 4, init="small")
    torch.manual_seed(5)
    assert torch.equal(default_std.W.detach(), torch.randn(3, 4) * 0.01)
    # init_std alone still means the old start, so GaussianRBM(D, H, init_std=s) keeps its meaning
    torch.manual_seed(5)
    assert torch.equal(GaussianRBM(3, 4, init_std=0.02).W.detach(), grbm.W.detach())


def test_module_init_errors():
    with pytest.raises(ValueError, match="init must be one of"):
        GaussianRBM(2, 4, init="xavier")
    with pytest.raises(ValueError, match="init_std applies only to init='small'"):
        GaussianRBM(2, 4, init="reference", init_std=0.1)


def test_bernoulli_posterior_is_nn_linear_default():
    """The reference's LinearBernoulliQ is nn.Linear(D, H) at its default init; ours is the same."""
    torch.manual_seed(7)
    q = BernoulliPosterior(2, 4, temperature=0.1)
    torch.manual_seed(7)
    lin = nn.Linear(2, 4)
    (layer,) = list(q.net)
    assert isinstance(layer, nn.Linear)
    assert torch.equal(layer.weight.detach(), lin.weight.detach())
    assert torch.equal(layer.bias.detach(), lin.bias.detach())


def _loop(method: str = "dsm", **model):
    d = checkerboard_grbm(method, steps=1, log_every=1, eval_every=1)
    d["data"].update(n_train=1000, n_test=100)
    d["model"].update(model)
    d["tracking"] = {"enabled": False}
    return TrainLoop.from_config(from_dict(Config, d), log=lambda s: None), from_dict(Config, d)


def _energy(loop):
    return getattr(loop.replica.energy, "module", loop.replica.energy)


def test_trainer_start_per_init():
    from distributed_bism.data import load_dataset

    loop, cfg = _loop()
    train, _ = load_dataset(cfg.data)
    grbm = _energy(loop)
    torch.manual_seed(cfg.trainer.seed)
    expected = GaussianRBM(2, 4)
    assert torch.equal(grbm.b.detach(), expected.b.detach())  # b as drawn: not the data mean
    assert torch.equal(grbm.W.detach(), expected.W.detach())

    loop, _ = _loop(b_init="data_mean")
    assert torch.allclose(_energy(loop).b.detach(), train.mean(0))
    assert torch.equal(_energy(loop).W.detach(), expected.W.detach())

    # the old start: W ~ N(0, 0.01²) from the trainer seed, c = 0, b = the training mean
    loop, _ = _loop(init="small", b_init="data_mean")
    torch.manual_seed(cfg.trainer.seed)
    assert torch.equal(_energy(loop).W.detach(), torch.randn(2, 4) * 0.01)
    assert not _energy(loop).c.detach().any()
    assert torch.allclose(_energy(loop).b.detach(), train.mean(0))


@pytest.mark.parametrize("overrides,message", [
    (["model.init=xavier"], "model.init: must be one of ('reference', 'small'), got 'xavier'"),
    (["model.init_std=0.1"], "model.init_std: applies only to model.init=small, got model.init=reference"),
    (["model.init=small", "model.init_std=-1"], "model.init_std: must be >= 0, got -1"),
    (["model.b_init=mean"], "model.b_init: must be one of ('init', 'data_mean'), got 'mean'"),
    (["model.name=conv", "model.b_init=data_mean"], "model.b_init: data_mean applies only to model.name=grbm"),
])
def test_config_errors(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_config_accepts_small_with_std():
    cfg = load_config(None, ["model.init=small", "model.init_std=0.1", "model.b_init=data_mean"])
    assert (cfg.model.init, cfg.model.init_std, cfg.model.b_init) == ("small", 0.1, "data_mean")
