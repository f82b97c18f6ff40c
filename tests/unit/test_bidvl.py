"""BiDVL (objectives/bidvl.py, models/bidvl.py, evaluation/ood.py, the bidvl_decoder sampler):
the loss pieces against their formulas, the unrolled hypergradient against finite differences,
the encoder-decoder at unrolled parameters, bad config input and a checkpoint round trip. The
short digits run (reconstruction error, OOD AUROC, classifier-FID): tests/e2e/test_learning_bidvl.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from distributed_bism.config import Config, ConfigError, ObjectiveConfig, from_dict
from distributed_bism.core.bilevel import BilevelStep
from distributed_bism.core.unroll import SGD
from distributed_bism.evaluation.ood import ood_data
from distributed_bism.models import EncoderDecoder, MarginalEnergy, PosteriorView, build_energy, unwrap
from distributed_bism.objectives import get_objective
from distributed_bism.objectives.bidvl import (
    BiDVLLosses,
    kl_to_standard_normal,
    latent_reconstruction,
    reconstruction_error,
    upper_level_loss,
)
from distributed_bism.training.loop import TrainLoop


def tiny_pair(seed: int = 0, shape: tuple[int, ...] = (1, 4, 4), h_dim: int = 3) -> tuple[MarginalEnergy, EncoderDecoder]:
    torch.manual_seed(seed)
    return (MarginalEnergy(shape, net="mlp", hidden=(8,)),
            EncoderDecoder(shape, h_dim, encoder="mlp", hidden=(8,), decoder_hidden=(8,)))


def digits_config(tmp_path: Path, **sections: dict) -> Config:
    raw = {
        "data": {"name": "digits"},
        "model": {"name": "marginal_mlp", "h_dim": 8, "hidden": [64, 64]},
        "posterior": {"name": "encoder_decoder", "encoder": "mlp", "hidden": [64], "decoder_hidden": [64]},
        "objective": {"name": "bidvl", "warmup_steps": 1, "bidvl_hinge": True},
        "optim": {"lr": 1e-3, "posterior_lr": 1e-3, "betas": [0.0, 0.9], "posterior_betas": [0.0, 0.9]},
        "trainer": {"strategy": "local", "batch_size": 100, "steps": 250, "ema_decay": 0,
                    "output_dir": str(tmp_path / "out")},
        "tracking": {"enabled": False},
        "eval": {"metrics": [], "sampler": "bidvl_decoder"},
    }
    for section, values in sections.items():
        raw[section] = {**raw[section], **values}
    return from_dict(Config, raw)


# --------------------------------------------------------------------------- the loss pieces
def test_kl_to_standard_normal_matches_torch_distributions(float64):
    torch.manual_seed(0)
    mu, log_std = torch.randn(5, 3), 0.5 * torch.randn(5, 3)
    q = torch.distributions.Normal(mu, log_std.exp())
    expected = torch.distributions.kl_divergence(q, torch.distributions.Normal(0.0, 1.0)).sum(-1)
    assert torch.allclose(kl_to_standard_normal(torch.cat([mu, log_std], -1)), expected, atol=1e-12)


def test_upper_level_difference_and_hinge():
    e_data, e_gen = torch.tensor([-2.0, 0.5, 3.0]), torch.tensor([2.0, 0.5, -1.0])
    assert torch.equal(upper_level_loss(e_data, e_gen), e_data - e_gen)
    # relu(m + E(v)) + relu(m − E(P(ĥ))) at m = 1 and m = 2
    assert torch.equal(upper_level_loss(e_data, e_gen, hinge=True), torch.tensor([0.0, 2.0, 6.0]))
    assert torch.equal(upper_level_loss(e_data, e_gen, hinge=True, margin=2.0), torch.tensor([0.0, 4.0, 8.0]))
    # a satisfied margin gives no gradient: the hinge stops pushing separated energies apart
    e = torch.tensor([-3.0], requires_grad=True)
    upper_level_loss(e, torch.tensor([3.0]), hinge=True).sum().backward()
    assert e.grad is not None and e.grad.item() == 0.0


def test_lower_level_terms_and_weights(float64):
    energy, q = tiny_pair()
    x = torch.rand(6, 1, 4, 4)
    losses = BiDVLLosses(lam=0.3, latent_weight=2.0)
    view = PosteriorView(q)
    torch.manual_seed(1)
    h_prior = torch.randn(6, q.h_dim)  # the first draw the lower level makes
    torch.manual_seed(1)
    terms = losses.lower_terms(energy, view, x)
    with torch.no_grad():
        x_gen = q.decode(h_prior)
        assert torch.allclose(terms["energy_gen"], energy(x_gen))
        assert torch.allclose(terms["latent"], ((q.mean(q.encode(x_gen)) - h_prior) ** 2).mean(-1))
        assert torch.allclose(terms["kl"], kl_to_standard_normal(q.encode(x)))
    assert torch.all(terms["recon"] > 0)
    torch.manual_seed(1)
    total = losses.inner(energy, view, x)
    assert torch.allclose(total, terms["energy_gen"] + 2.0 * terms["latent"] + 0.3 * (terms["recon"] + terms["kl"]))
    assert torch.allclose(reconstruction_error(x, torch.zeros_like(x)), (x**2).flatten(1).sum(-1))
    assert torch.allclose(latent_reconstruction(torch.ones(2, 4), torch.zeros(2, 4)), torch.ones(2))


def test_latent_reconstruction_shapes_the_decoder_only():
    """As in the reference, μ_Q(P(ĥ)) is taken with the encoder's parameters held fixed."""
    _, q = tiny_pair()
    losses = BiDVLLosses(lam=0.0, latent_weight=1.0)
    zero_energy = lambda x: 0.0 * x.flatten(1).sum(-1)  # noqa: E731
    losses.inner(zero_energy, PosteriorView(q), torch.rand(6, 1, 4, 4)).mean().backward()
    assert all(p.grad is None or not p.grad.any() for p in q.encoder.parameters())
    assert all(p.grad is not None and p.grad.any() for p in q.decoder.parameters())


# --------------------------------------------------------------------------- unrolling
def test_posterior_view_evaluates_the_encoder_decoder_at_given_parameters():
    _, q = tiny_pair()
    h = torch.randn(4, q.h_dim)
    own = {n: p.detach().clone() for n, p in q.named_parameters()}
    assert torch.allclose(PosteriorView(q, params=own)(h).x_gen, q(h).x_gen)
    moved = {n: (p + 1.0 if n.startswith("decoder") else p) for n, p in own.items()}
    assert not torch.allclose(PosteriorView(q, params=moved)(h).x_gen, q(h).x_gen)
    assert all(torch.equal(p, own[n]) for n, p in q.named_parameters())  # the module is never written


def test_unrolled_hypergradient_matches_finite_differences(float64):
    """dJ(θ, ψ_K(θ))/dθ from BilevelStep at K = 1 equals the directional finite difference of the
    whole composite, and differs from the K = 0 gradient (where P(ĥ) is a constant)."""
    energy, q = tiny_pair(seed=3)
    v = torch.rand(8, 1, 4, 4)
    objective = get_objective(ObjectiveConfig(name="bidvl", bidvl_lambda=0.1))
    phi = dict(q.named_parameters())
    torch.manual_seed(5)
    direction = [torch.randn_like(p) for p in energy.parameters()]

    def loss_and_grad(k: int) -> tuple[float, float]:
        step = BilevelStep(objective, unroll_steps=k, unroll_optimizer=SGD(0.5))
        energy.zero_grad()
        torch.manual_seed(7)
        out = step.hypergradient(energy, q, phi, v)
        return out.loss.item(), sum((p.grad * d).sum().item() for p, d in zip(energy.parameters(), direction))

    def shifted_loss(eps: float) -> float:
        with torch.no_grad():
            for p, d in zip(energy.parameters(), direction):
                p.add_(eps * d)
        try:
            return loss_and_grad(1)[0]
        finally:
            with torch.no_grad():
                for p, d in zip(energy.parameters(), direction):
                    p.sub_(eps * d)

    eps = 1e-5
    finite_difference = (shifted_loss(eps) - shifted_loss(-eps)) / (2 * eps)
    _, k1 = loss_and_grad(1)
    _, k0 = loss_and_grad(0)
    assert k1 == pytest.approx(finite_difference, rel=1e-6, abs=1e-9)
    assert abs(k1 - k0) > 1e-4 * abs(k1), "the unrolled step did not change the hypergradient"


# --------------------------------------------------------------------------- models and config
@pytest.mark.parametrize("shape,net", [((1, 8, 8), "conv"), ((1, 28, 28), "conv"), ((2,), "mlp")])
def test_marginal_energy_shapes(shape, net):
    energy = MarginalEnergy(shape, net=net, hidden=(8,), ch=2, blocks_per_stage=0)
    assert energy(torch.rand(3, *shape)).shape == (3,)


def test_generation_and_reconstruction_shapes():
    _, q = tiny_pair()
    x = q.generate(5, generator=torch.Generator().manual_seed(0))
    assert x.shape == (5, 1, 4, 4) and 0 <= x.min() and x.max() <= 1  # the sigmoid output
    assert torch.equal(x, q.generate(5, generator=torch.Generator().manual_seed(0)))
    assert q.reconstruct(torch.rand(3, 1, 4, 4)).shape == (3, 1, 4, 4)


@pytest.mark.parametrize("section,values,key", [
    ("model", {"name": "grbm"}, "model.name"),
    ("posterior", {"name": "gaussian"}, "posterior.name"),
    ("objective", {"bidvl_lambda": -1.0}, "objective.bidvl_lambda"),
    ("objective", {"bidvl_latent_weight": -0.5}, "objective.bidvl_latent_weight"),
    ("objective", {"bidvl_hinge_margin": 0.0}, "objective.bidvl_hinge_margin"),
    ("objective", {"name": "bidsm"}, "model.name"),
    ("posterior", {"decoder_output": "relu"}, "posterior.decoder_output"),
    ("posterior", {"decoder_hidden": [0]}, "posterior.decoder_hidden"),
    ("model", {"hidden": [16, -1]}, "model.hidden"),
    ("eval", {"ood_dataset": "svhn"}, "eval.ood_dataset"),
])
def test_bad_config_names_the_key(tmp_path, section, values, key):
    with pytest.raises(ConfigError) as err:
        digits_config(tmp_path, **{section: values})
    message = str(err.value)
    assert message.startswith(f"{key}:") and "\n" not in message


def test_conv_energy_on_flat_data_is_refused(tmp_path):
    cfg = digits_config(tmp_path, model={"name": "marginal_conv"})
    with pytest.raises(ValueError, match=r"needs image data \(C, H, W\), got shape \(2,\)"):
        build_energy(cfg.model, (2,))


def test_ood_data_is_resized_and_shaped_like_the_data(tmp_path):
    like = torch.rand(10, 1, 8, 8) * 0.5
    noise = ood_data("uniform_noise", like, digits_config(tmp_path).data)
    assert noise.shape == like.shape and noise.min() >= like.min() and noise.max() <= like.max()
    assert torch.equal(noise, ood_data("uniform_noise", like, digits_config(tmp_path).data))  # fixed seed
    with pytest.raises(ValueError, match="eval.ood_dataset: checkerboard examples have shape"):
        ood_data("checkerboard", like, digits_config(tmp_path).data)


# --------------------------------------------------------------------------- training
def params_of(loop: TrainLoop) -> dict[str, torch.Tensor]:
    r = loop.replica
    return {f"{which}.{n}": p.detach().clone() for which, m in (("energy", r.energy), ("posterior", r.posterior))
            for n, p in unwrap(m).named_parameters()}


def test_checkpoint_round_trip_continues_identically(tmp_path):
    cfg = digits_config(tmp_path, model={"hidden": [16]}, posterior={"hidden": [16], "decoder_hidden": [16]},
                        objective={"unroll_steps": 1}, trainer={"batch_size": 20})
    loop = TrainLoop.from_config(cfg)
    for _ in range(3):
        loop.run_step(loop.batches(loop.step))
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    loop.save(ckpt)
    for _ in range(2):
        loop.run_step(loop.batches(loop.step))
    reloaded = TrainLoop.from_config(cfg)
    reloaded.load(ckpt)
    for _ in range(2):
        reloaded.run_step(reloaded.batches(reloaded.step))
    expected, got = params_of(loop), params_of(reloaded)
    assert any(n.startswith("posterior.decoder") for n in got)
    for n, p in expected.items():
        assert torch.equal(p, got[n]), f"{n} differs after a checkpoint round trip"


def test_decoder_sampler_and_ood_metric_refuse_other_models(tmp_path):
    """bidvl_decoder needs the encoder-decoder; ood_auroc skips (with a note) an energy that is not
    a function of v alone, such as the conv EBLVM's E(v, h)."""
    from distributed_bism.evaluation.metrics import EvalContext, run_metrics
    from distributed_bism.models import ConvEBLVM, GaussianPosterior
    from distributed_bism.samplers import get_sampler

    energy, q = ConvEBLVM((1, 8, 8), 2, ch=2, blocks_per_stage=0), GaussianPosterior((1, 8, 8), 2, encoder="mlp", hidden=[4])
    with pytest.raises(ValueError, match="bidvl_decoder sampler needs BiDVL's encoder-decoder"):
        get_sampler("bidvl_decoder").sample(energy, q, num_samples=2, data_shape=(1, 8, 8))
    ctx = EvalContext(cfg=digits_config(tmp_path), energy=energy, posterior=q, train_data=None,
                      test_data=torch.rand(4, 1, 8, 8), image_shape=(1, 8, 8), step=0, device=torch.device("cpu"))
    assert run_metrics(["ood_auroc"], ctx) == {}
    assert ctx.notes == ["ood_auroc: skipped (the energy is not a function of v alone)"]
