"""VaES / VaGES (docs/methods.md §3) on tiny float64 Gaussian RBMs.

The oracle is the exact posterior p(h|v) = Bern(sigmoid(c + Wᵀv)) with the expectation over h
taken by enumerating {0, 1}^H (weighted particles), where the estimators must be exact:
  * VaES = the exact marginal score;
  * the VaGES surrogate's θ-gradient = autograd of the exact DSM / MDSM / KSD loss, and its
    value = that loss;
  * the L/(L−1) correction makes the Monte Carlo covariance unbiased (expectation over every
    pair of draws, enumerated), and dropping it (biased_cov) does not.
Then: SGLD refines particles towards p(h|v); bad settings fail in one line. VaGES-DSM learning the
checkerboard GRBM: tests/e2e/test_learning_vages.py.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from distributed_bism.config import Config, ConfigError, ObjectiveConfig, from_dict, load_config
from distributed_bism.experiments import checkerboard_grbm
from distributed_bism.models import GaussianPosterior, GaussianRBM, PosteriorView
from distributed_bism.objectives import NoisyBatch, get_objective
from distributed_bism.objectives.ksd import rbf_ksd_loss
from distributed_bism.objectives.vages import (
    SGLD,
    Particles,
    VaGESLoss,
    draw_particles,
    joint_log_density,
    vaes,
    vaes_score_fn,
    vages_surrogate,
)
from distributed_bism.registry.objectives import objective_spec
from distributed_bism.training.loop import TrainLoop
from tests.helpers.tiny_models import tiny_grbm
from tests.unit.test_grbm import exact_posterior

H = 4


def binary_states(h_dim: int) -> torch.Tensor:
    """Every h ∈ {0, 1}^H, (2^H, H)."""
    return torch.cartesian_prod(*[torch.tensor([0.0, 1.0])] * h_dim).view(-1, h_dim)


def enumerated(q: PosteriorView, x: torch.Tensor) -> Particles:
    """All 2^H binary states for every example, weighted by q(h|x): an exact expectation."""
    params = q.encode(x.detach())
    h = binary_states(q.module.h_dim)[:, None, :].expand(-1, x.shape[0], -1)
    return Particles(h, q.log_prob(params, h).exp())


def enumerating_sampler(energy, q, x, num_particles, num_sets):
    return [enumerated(q, x)] * num_sets


def exact_setup(v_dim: int = 3, h_dim: int = H, seed: int = 0, *, relaxed: bool = False) -> tuple[GaussianRBM, PosteriorView]:
    """A GRBM and its exact posterior; `relaxed`: with the Gumbel-sigmoid rsample (τ = 0.5) that
    training builds, which VaES must still sample in {0, 1}^H."""
    grbm, _ = tiny_grbm(v_dim, h_dim, seed=seed)
    q = exact_posterior(grbm)
    q.relaxed, q.temperature = relaxed, 0.5
    return grbm, PosteriorView(q)


def grads(loss: torch.Tensor, module: torch.nn.Module) -> list[torch.Tensor]:
    return list(torch.autograd.grad(loss, list(module.parameters()), allow_unused=True, materialize_grads=True))


# ----------------------------------------------------------------------------- VaES
def test_vaes_with_the_exact_posterior_enumerated_is_the_exact_score(float64):
    grbm, q = exact_setup()
    x = torch.randn(8, 3, requires_grad=True)
    particles = enumerated(q, x)
    torch.testing.assert_close(particles.weight.sum(0), torch.ones(8), rtol=0, atol=1e-12)
    (log_p,) = joint_log_density(grbm, x, [particles])
    torch.testing.assert_close(vaes(x, log_p, particles, create_graph=False), grbm.score(x), rtol=0, atol=1e-8)


def test_vaes_score_fn_with_exact_posterior_draws_converges_to_the_exact_score(float64):
    """Monte Carlo with L binary draws: the error is within 5 standard errors, and the standard
    error is small. The posterior is the relaxed one training builds (τ = 0.5): its Gumbel-sigmoid
    samples would be biased by far more."""
    torch.manual_seed(1)
    grbm, q = exact_setup(relaxed=True)
    x = torch.randn(8, 3)
    L = 20_000
    est = vaes_score_fn(grbm, q, num_particles=L, create_graph=False)(x)
    # per-particle scores −(x−b)/σ² + W h_l have spread W·sd(h): the standard error of their mean
    p = torch.sigmoid(grbm.posterior_logits(x))
    se = ((grbm.W**2) @ (p * (1 - p)).T).T.sqrt() / math.sqrt(L)
    err = (est - grbm.score(x)).abs()
    assert (err <= 5 * se).all(), f"VaES error {err.max():.2e} exceeds 5 standard errors ({(5 * se).max():.2e})"
    assert se.max() < 5e-3


# ----------------------------------------------------------------------------- VaGES
def exact_batch(name: str, v: torch.Tensor) -> NoisyBatch:
    if name == "vages_ksd":  # no noise; x must require grad for the exact score's autograd
        return NoisyBatch(v=v, x=v.clone().requires_grad_(True))
    return get_objective(ObjectiveConfig(name=name, num_particles=2, sigma=0.2, sigma_begin=0.1, sigma_end=1.0)).perturbation(v)


@pytest.mark.parametrize("name", ["vages_dsm", "vages_mdsm", "vages_ksd"])
def test_vages_surrogate_with_exact_expectations_gives_the_exact_loss_and_its_gradient(float64, name):
    grbm, q = exact_setup()
    cfg = ObjectiveConfig(name=name, num_particles=2, sigma=0.2, sigma_begin=0.1, sigma_end=1.0, ksd_bandwidth=0.7)
    objective = get_objective(cfg)
    score_loss = objective.outer.score_loss  # the DSM / MDSM / KSD loss the objective was built with
    vages_loss = VaGESLoss(score_loss, num_particles=2, sampler=enumerating_sampler)
    torch.manual_seed(3)
    batch = exact_batch(name, torch.randn(10, 3))

    exact = score_loss(grbm.score, batch)  # the closed-form marginal score
    estimate = vages_loss(grbm, q, batch)
    torch.testing.assert_close(estimate, exact, rtol=1e-10, atol=1e-10)
    for g_est, g_exact, (n, _) in zip(grads(estimate.mean(), grbm), grads(exact.mean(), grbm), grbm.named_parameters()):
        assert g_exact.abs().max() > 1e-3, f"{n}: the exact gradient is ~0; the check would be empty"
        torch.testing.assert_close(g_est, g_exact, rtol=1e-8, atol=1e-10, msg=lambda m, n=n: f"{name} d/d{n}: {m}")


def test_the_objective_draws_the_same_estimate_by_monte_carlo(float64):
    """The registered objective (Monte Carlo particles) agrees with the exact loss and gradient to
    within Monte Carlo error at large L; measured: relative gradient error ~1e-3 at L = 4000."""
    grbm, q = exact_setup(relaxed=True)
    objective = get_objective(ObjectiveConfig(name="vages_dsm", num_particles=4000, sigma=0.2))
    torch.manual_seed(5)
    batch = objective.perturbation(torch.randn(10, 3))
    exact = objective.outer.score_loss(grbm.score, batch).mean()
    estimate = objective.outer(grbm, q, batch).mean()
    assert abs(estimate.item() - exact.item()) < 0.02 * abs(exact.item())
    g_est, g_exact = torch.cat([g.flatten() for g in grads(estimate, grbm)]), torch.cat([g.flatten() for g in grads(exact, grbm)])
    rel = ((g_est - g_exact).norm() / g_exact.norm()).item()
    assert rel < 0.02, f"relative gradient error {rel:.2e}"


@pytest.mark.parametrize("biased", [False, True])
def test_the_covariance_correction_makes_two_draws_unbiased(float64, biased):
    """E over every pair (h_1, h_2) ~ q of the L = 2 covariance term, weighted by q(h_1)q(h_2),
    must give the exact θ-gradient gᵀ∂_θ∇_v log p(v) with the L/(L−1) correction, and not without."""
    grbm, q = exact_setup(v_dim=2, h_dim=3, seed=1)
    torch.manual_seed(7)
    x = torch.randn(5, 2, requires_grad=True)
    g = torch.randn(5, 2)
    exact = grads((g * grbm.score(x)).sum(), grbm)
    esd = enumerated(q, x)
    params = q.encode(x.detach())
    states = binary_states(3)
    total = 0.0
    for i, j in itertools.product(range(len(states)), repeat=2):
        pair = torch.stack([states[i], states[j]])[:, None, :].expand(-1, 5, -1)  # (2, B, H)
        prob = (q.log_prob(params, pair).sum(0)).exp()  # q(h_i|x_b) q(h_j|x_b), (B,)
        cov = Particles(pair)
        log_p_esd, log_p_cov = joint_log_density(grbm, x, [esd, cov])
        total = total + (prob * vages_surrogate(x, g, log_p_esd, esd, log_p_cov, cov, biased_cov=biased)).sum()
    got = grads(total, grbm)
    close = all(torch.allclose(a, b, rtol=1e-8, atol=1e-10) for a, b in zip(got, exact))
    assert close != biased, "the unbiased estimator must match in expectation; the biased one must not"


# ----------------------------------------------------------------------------- KSD
def test_rbf_ksd_matches_the_stein_kernel_by_autograd(float64):
    """u(x, y) = ∇_x·∇_y (k(x, y) p(x)p(y)) / (p(x)p(y)), computed term by term with autograd."""
    grbm, _ = tiny_grbm(3, H)
    torch.manual_seed(2)
    v, bw = torch.randn(6, 3), 0.8
    got = rbf_ksd_loss(grbm.score, NoisyBatch(v=v, x=v), bandwidth=bw)
    for i in range(3):
        xa = v[i].clone().requires_grad_(True)
        xb = v[3 + i].clone().requires_grad_(True)
        k = torch.exp(-((xa - xb) ** 2).sum() / (2 * bw**2))
        gx, gy = torch.autograd.grad(k, (xa, xb), create_graph=True)
        trace = sum(torch.autograd.grad(gx[d], xb, retain_graph=True)[0][d] for d in range(3))
        sa, sb = grbm.score(xa[None])[0], grbm.score(xb[None])[0]
        u = k * sa @ sb + sa @ gy + sb @ gx + trace
        torch.testing.assert_close(got[i], u.detach(), rtol=1e-12, atol=1e-12)


def test_ksd_needs_two_examples(float64):
    grbm, _ = tiny_grbm(3, H)
    v = torch.randn(1, 3)
    with pytest.raises(ValueError, match="at least 2 examples"):
        rbf_ksd_loss(grbm.score, NoisyBatch(v=v, x=v), bandwidth=1.0)


# ----------------------------------------------------------------------------- SGLD
def test_sgld_refines_particles_towards_the_posterior(float64):
    """E(v, h) = ½‖h − Av‖² has p(h|v) = N(Av, I). Particles of a Gaussian q far from it move to
    that mean and unit variance (to Monte Carlo error of 4000 draws and the step's small bias)."""
    torch.manual_seed(4)
    A = torch.randn(3, 2)
    energy = lambda x, h: 0.5 * ((h - x @ A) ** 2).sum(-1)  # noqa: E731
    q = PosteriorView(GaussianPosterior((3,), 2, encoder="mlp", hidden=()))
    x = torch.randn(4, 3)
    (raw,) = draw_particles(energy, q, x, 4000)
    (refined,) = draw_particles(energy, q, x, 4000, sgld=SGLD(steps=300, step_size=0.05))
    target = x @ A
    assert (raw.h.mean(0) - target).abs().max() > 0.3, "q already matches p(h|v); the test would be empty"
    assert (refined.h.mean(0) - target).abs().max() < 0.1
    assert (refined.h.var(0) - 1).abs().max() < 0.1


# ----------------------------------------------------------------------------- training
@pytest.fixture
def one_thread():
    """Tiny models run faster on one thread (less scheduling on a shared 2-core machine)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def vages_checkerboard(name: str, steps: int, **objective) -> Config:
    d = checkerboard_grbm("bidsm_k0", steps=steps, log_every=steps, eval_every=steps)
    d["objective"] = {**d["objective"], "name": name, "unroll_steps": 0, **objective}
    d["tracking"] = {"enabled": False}
    return from_dict(Config, d)


@pytest.mark.parametrize("name", ["vages_mdsm", "vages_ksd"])
def test_each_vages_objective_trains_both_levels_through_the_train_loop(one_thread, name):
    loop = TrainLoop.from_config(vages_checkerboard(name, 3, num_particles=2, warmup_steps=2), log=lambda s: None)
    energy0 = {n: p.detach().clone() for n, p in loop.replica.energy.named_parameters()}
    posterior0 = {n: p.detach().clone() for n, p in loop.replica.posterior.named_parameters()}
    for step in range(3):
        out = loop.run_step(loop.batches(step))
        assert torch.isfinite(out.loss) and out.inner_loss is not None and torch.isfinite(out.inner_loss)
    assert loop.bad_steps == 0
    for n, p in loop.replica.energy.named_parameters():
        assert not torch.equal(p, energy0[n]), f"θ.{n} did not move"
    assert any(not torch.equal(p, posterior0[n]) for n, p in loop.replica.posterior.named_parameters()), "φ did not move"


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("override,key", [
    (["objective.unroll_steps=2"], "objective.unroll_steps"),
    (["objective.num_particles=1"], "objective.num_particles"),
    (["objective.ksd_bandwidth=0"], "objective.ksd_bandwidth"),
    (["objective.ksd_bandwidth=-1"], "objective.ksd_bandwidth"),
    (["objective.sgld_steps=-1"], "objective.sgld_steps"),
    (["objective.sgld_step_size=0"], "objective.sgld_step_size"),
    (["objective.sgld_noise=-0.1"], "objective.sgld_noise"),
    (["objective.sgld_steps=5"], "objective.sgld_steps"),  # a Bernoulli posterior has binary h
])
def test_bad_vages_settings_fail_in_one_line_naming_the_key(override, key):
    base = ["objective.name=vages_ksd", "objective.num_particles=2", "objective.unroll_steps=0", "posterior.name=bernoulli"]
    with pytest.raises(ConfigError) as err:
        load_config(None, base + override)
    message = str(err.value)
    assert message.startswith(f"{key}:") and "\n" not in message, message


def test_valid_vages_settings_load():
    cfg = load_config(None, ["objective.name=vages_dsm", "objective.num_particles=1", "objective.biased_cov=true"])
    assert objective_spec(cfg.objective.name).bilevel
    cfg = load_config(None, ["objective.name=vages_mdsm", "objective.num_particles=2", "objective.sgld_steps=5",
                             "posterior.name=gaussian", "model.name=conv", "data.name=digits"])
    assert get_objective(cfg.objective).spec.divide_inner_by_sigma


def test_a_non_finite_batch_gives_a_non_finite_loss_not_an_error(float64):
    """The trainer skips a step whose loss is non-finite on any rank; sampling must not raise first."""
    grbm, q = exact_setup(relaxed=True)
    objective = get_objective(ObjectiveConfig(name="vages_dsm", num_particles=2))
    loss = objective.outer(grbm, q, objective.perturbation(torch.full((4, 3), float("nan"))))
    assert not torch.isfinite(loss).any()
