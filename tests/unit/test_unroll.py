"""The functional optimisers and the invariants of the bi-level step."""

from __future__ import annotations

import copy

import pytest
import torch

from distributed_bism.config import ObjectiveConfig
from distributed_bism.core.bilevel import BilevelStep
from distributed_bism.core.unroll import SGD, Adam, torch_optimizer_state, unroll
from distributed_bism.objectives import get_objective
from tests.helpers.tiny_models import tiny_grbm


def quadratic_loss(target: torch.Tensor):
    return lambda phi, k: ((phi["w"] - target) ** 2).sum() + 0.1 * (phi["w"] ** 4).sum()


@pytest.mark.parametrize("name", ["sgd", "adam"])
@pytest.mark.parametrize("warm", [False, True])
def test_functional_optimizers_match_torch_optim(float64, name, warm):
    torch.manual_seed(0)
    target = torch.randn(5)
    w = torch.nn.Parameter(torch.randn(5))
    make = (lambda p: torch.optim.SGD(p, lr=0.1)) if name == "sgd" else (lambda p: torch.optim.Adam(p, lr=0.1, betas=(0.8, 0.9)))
    opt = make([w])
    if warm:  # continue from an optimiser that has already taken steps, as the unroll does
        for _ in range(3):
            opt.zero_grad()
            quadratic_loss(target)({"w": w}, 0).backward()
            opt.step()
    func = SGD(0.1) if name == "sgd" else Adam(0.1, (0.8, 0.9))
    phi = {"w": w.detach().clone().requires_grad_(True)}
    state = func.init(phi, torch_optimizer_state(opt, {"w": w}))
    phi_k = unroll(phi, quadratic_loss(target), 4, func, state)
    for _ in range(4):
        opt.zero_grad()
        quadratic_loss(target)({"w": w}, 0).backward()
        opt.step()
    torch.testing.assert_close(phi_k["w"].detach(), w.detach(), rtol=1e-12, atol=1e-12)
    assert not torch.equal(w.detach(), phi["w"].detach())  # it moved


def test_adam_unroll_is_differentiable_at_zero_gradient(float64):
    """A parameter with zero gradient must not turn the hypergradient into NaN (√0 in Adam)."""
    x = torch.tensor(2.0, requires_grad=True)
    # b starts at a stationary point: its gradient 2·x·b is exactly 0 yet depends on x, so the
    # backward passes through √s at s = 0.
    phi = {"a": torch.zeros(3, requires_grad=True), "b": torch.zeros(2, requires_grad=True)}
    loss = lambda p, k: ((p["a"] - x) ** 2).sum() + x * (p["b"] ** 2).sum()  # noqa: E731
    phi_k = unroll(phi, loss, 3, Adam(0.1), Adam(0.1).init(phi))
    (g,) = torch.autograd.grad(phi_k["a"].sum() + phi_k["b"].sum(), x)
    assert torch.isfinite(g)


@pytest.mark.parametrize("K", [0, 2])
def test_step_leaves_posterior_at_its_warmup_value_and_touches_only_theta(float64, K):
    energy, q = tiny_grbm()
    objective = get_objective(ObjectiveConfig(name="bidsm", sigma=0.3, lower_level="kl"))
    v = torch.rand(20, 2)
    N = 3

    opt = torch.optim.Adam(q.parameters(), lr=0.01)
    step = BilevelStep(objective, warmup_steps=N, unroll_steps=K, unroll_optimizer=Adam(0.01))

    # Reference: N plain Adam steps on a copy, with the same draws (the step draws every noisy
    # batch of the iteration first).
    q_ref = copy.deepcopy(q)
    opt_ref = torch.optim.Adam(q_ref.parameters(), lr=0.01)
    torch.manual_seed(7)
    BilevelStep(objective, warmup_steps=N).warmup(energy, q_ref, v, opt_ref, step.draw(v).warmup)

    theta_before = [p.detach().clone() for p in energy.parameters()]
    torch.manual_seed(7)
    out = step(energy=energy, v=v, posterior=q, posterior_optimizer=opt)

    for p, r in zip(q.parameters(), q_ref.parameters()):
        torch.testing.assert_close(p, r, rtol=0, atol=0)  # φ = its warm-up value, unroll not written back
        assert p.grad is None or torch.equal(p.grad, r.grad)  # the outer backward adds nothing to φ
    for p, b in zip(energy.parameters(), theta_before):
        assert torch.equal(p, b)  # the step only computes θ's gradient; the caller steps θ
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in energy.parameters())
    assert torch.isfinite(out.loss) and out.inner_loss is not None


def test_k0_builds_no_graph_through_phi(float64):
    """K = 0 must cost one plain SM step: φ enters the outer loss as a constant."""
    energy, q = tiny_grbm()
    objective = get_objective(ObjectiveConfig(name="bidsm"))
    step = BilevelStep(objective, unroll_steps=0)
    phi_k = step.unrolled_posterior(energy, q, dict(q.named_parameters()), torch.rand(4, 2))
    assert not any(t.requires_grad for t in phi_k.values())


@pytest.mark.parametrize(("K", "name", "asked"), [(0, "adam", 0), (2, "sgd", 0), (2, "adam", 1)])
def test_step_asks_for_the_optimizer_state_only_for_an_unrolled_adam(float64, K, name, asked):
    """Under ZeRO the posterior's Adam state is a collective away; only the unrolled Adam reads it
    (SGD has no state, and K = 0 has no unroll), so only then is it collected, once per step."""
    from distributed_bism.core.unroll import get_unroll_optimizer
    from distributed_bism.training.updaters import TorchUpdater

    class Counting(TorchUpdater):
        calls = 0

        def optimizer_state(self, params):
            Counting.calls += 1
            return super().optimizer_state(params)

    energy, q = tiny_grbm()
    objective = get_objective(ObjectiveConfig(name="bidsm", sigma=0.3, lower_level="kl"))
    step = BilevelStep(objective, warmup_steps=1, unroll_steps=K, unroll_optimizer=get_unroll_optimizer(name, lr=0.01))
    step(energy=energy, v=torch.rand(8, 2), posterior=q,
         posterior_optimizer=Counting(torch.optim.Adam(q.parameters(), lr=0.01)))
    assert Counting.calls == asked


def test_single_level_objectives_need_no_posterior(float64):
    energy, _ = tiny_grbm()
    for name in ("dsm", "mdsm", "ssm", "cd", "pcd"):
        energy.zero_grad()
        out = BilevelStep(get_objective(ObjectiveConfig(name=name)))(energy=energy, v=torch.rand(8, 2))
        assert torch.isfinite(out.loss)
        assert energy.W.grad is not None


def test_pcd_keeps_its_chains_in_state():
    energy, _ = tiny_grbm()
    objective = get_objective(ObjectiveConfig(name="pcd"))
    step = BilevelStep(objective)
    step(energy=energy, v=torch.rand(8, 2))
    chains = objective.state_dict()["chains"]
    step(energy=energy, v=torch.rand(8, 2))
    assert not torch.equal(objective.state_dict()["chains"], chains)
    fresh = get_objective(ObjectiveConfig(name="pcd"))
    fresh.load_state_dict({"chains": chains})
    assert torch.equal(fresh.state_dict()["chains"], chains)


def test_bilevel_objective_without_posterior_is_an_error():
    energy, _ = tiny_grbm()
    with pytest.raises(ValueError, match="needs a posterior"):
        BilevelStep(get_objective(ObjectiveConfig(name="bidsm")))(energy=energy, v=torch.rand(4, 2))
