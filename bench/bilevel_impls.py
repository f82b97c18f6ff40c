"""The bi-level iteration written two ways for bench_bilevel.py: ours and on `higher`.

    ours          distributed_bism.core.bilevel.step_from_config (functional Adam unroll on dicts)
    ours_shared   the same with share_inner_noise=True (a different estimator)
    higher        the reference formulation (baofff/BiSM `_update`) on the `higher` library,
                  reusing our loss functions so that it computes the same estimator as "ours"

Each implementation owns identically seeded models; `equivalence_check` shows that ours and
higher give the same θ-gradient from the same RNG stream.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

IMPLS = ("ours", "ours_shared", "higher")
IMPL_LABELS = {
    "ours": "ours (functional unroll)",
    "ours_shared": "ours, share_inner_noise=True (different estimator)",
    "higher": "higher 0.2.1 (reference formulation)",
}
WARMUP_STEPS = 5  # N, as in the reference configs

# ============================================================================ the models
@dataclass
class Setup:
    """Models, optimisers and data of one implementation (each owns its own copies)."""

    energy: Any
    posterior: Any
    opt_energy: Any
    opt_posterior: Any
    v: Any
    lr: float
    betas: tuple[float, float]
    objective_kwargs: dict[str, Any]


def build_setup(model: str, batch: int, seed: int) -> Setup:
    """Identically seeded models and data for configuration `model` at batch size `batch`."""
    import torch

    from distributed_bism.models import BernoulliPosterior, ConvEBLVM, GaussianPosterior, GaussianRBM

    torch.manual_seed(seed)
    if model == "grbm":
        # Checkerboard GRBM (docs/methods.md §2): Adam 1e-3 with the reference's betas (0.9, 0.95),
        # BiDSM σ = 0.05, KL lower level.
        energy, posterior = GaussianRBM(2, 4), BernoulliPosterior(2, 4, temperature=0.1)
        v = torch.rand(batch, 2)
        lr, betas = 1e-3, (0.9, 0.95)
        obj = dict(name="bidsm", sigma=0.05, lower_level="kl")
    elif model == "conv":
        # MNIST-sized deep EBLVM: BiMDSM σ ∈ linspace[0.05, 1.2], σ0 = 0.1, Fisher lower level.
        energy = ConvEBLVM((1, 32, 32), 20, ch=64, blocks_per_stage=1)
        posterior = GaussianPosterior((1, 32, 32), 20, encoder="conv")
        v = torch.rand(batch, 1, 32, 32)
        lr, betas = 1e-4, (0.9, 0.95)
        obj = dict(name="bimdsm", sigma_begin=0.05, sigma_end=1.2, sigma_schedule="linear", sigma0=0.1,
                   lower_level="fisher")
    else:
        raise ValueError(f"unknown model {model!r}")
    return Setup(energy, posterior, torch.optim.Adam(energy.parameters(), lr, betas=betas),
                 torch.optim.Adam(posterior.parameters(), lr, betas=betas), v, lr, betas, obj)


def objective_config(setup: Setup, unroll_steps: int, share_inner_noise: bool = False) -> Any:
    from distributed_bism.config import ObjectiveConfig

    return ObjectiveConfig(**setup.objective_kwargs, warmup_steps=WARMUP_STEPS, unroll_steps=unroll_steps,
                           unroll_optimizer="adam", share_inner_noise=share_inner_noise)


# ============================================================================ implementations
class Impl(Protocol):
    s: Setup

    def set_unroll(self, k: int) -> None: ...

    def iteration(self, *, step_theta: bool = True) -> float:
        """One whole iteration; returns the higher-level loss (to check it stays finite)."""
        ...

    def plain_step(self) -> None:
        """One ordinary lower-level optimiser step on φ (θ frozen)."""
        ...


class Ours:
    """distributed_bism's BilevelStep, built exactly as the trainer builds it."""

    def __init__(self, setup: Setup, *, share_inner_noise: bool = False):
        from distributed_bism.core.bilevel import BilevelStep
        from distributed_bism.objectives import get_objective

        self.s, self.share = setup, share_inner_noise
        self.objective = get_objective(objective_config(setup, 0, share_inner_noise))
        self.plain = BilevelStep(self.objective, warmup_steps=1)  # one warm-up step = one plain step
        self.set_unroll(0)

    def set_unroll(self, k: int) -> None:
        from distributed_bism.core.bilevel import step_from_config
        from distributed_bism.objectives import get_objective

        cfg = objective_config(self.s, k, self.share)
        self.objective = get_objective(cfg)
        self.step = step_from_config(self.objective, cfg, posterior_lr=self.s.lr, posterior_betas=self.s.betas)

    def iteration(self, *, step_theta: bool = True) -> float:
        s = self.s
        s.opt_energy.zero_grad(set_to_none=True)
        out = self.step(energy=s.energy, v=s.v, posterior=s.posterior, posterior_optimizer=s.opt_posterior)
        if step_theta:
            s.opt_energy.step()
        return float(out.loss)

    def plain_step(self) -> None:
        self.plain.warmup(self.s.energy, self.s.posterior, self.s.v, self.s.opt_posterior)


class Higher:
    """The reference formulation (baofff/BiSM `_update`) on `higher`, with our loss functions.

        warm-up: energy.requires_grad_(False); N × (zero_grad, inner_loss(v).backward(), opt_q.step())
        with higher.innerloop_ctx(q, opt_q) as (fq, diffopt):
            K × diffopt.step(inner_loss(v) using fq)
            loss = outer(v) using fq; loss.backward(); opt_θ.step()
        q.load_state_dict(backup)

    inner_loss(v) draws fresh noise on every call, as the reference does. The energy is called
    as a whole module (f(ṽ) recomputed inside each loss), as the reference does.
    """

    def __init__(self, setup: Setup):
        self.s = setup
        self.set_unroll(0)

    def set_unroll(self, k: int) -> None:
        from distributed_bism.objectives import get_objective

        self.k = k
        self.objective = get_objective(objective_config(self.s, k))

    def _inner_loss(self, q: Any) -> Any:
        from distributed_bism.models.posterior import PosteriorView

        batch = self.objective.perturbation(self.s.v)  # fresh noise per call
        return self.objective.inner_loss(self.s.energy, PosteriorView(module=q), batch).mean()

    def _warmup_step(self) -> None:
        s = self.s
        s.opt_posterior.zero_grad()
        self._inner_loss(s.posterior).backward()
        s.opt_posterior.step()

    def iteration(self, *, step_theta: bool = True) -> float:
        import higher

        from distributed_bism.models.posterior import PosteriorView

        s = self.s
        s.energy.requires_grad_(False)
        s.posterior.requires_grad_(True)
        for _ in range(WARMUP_STEPS):
            self._warmup_step()

        s.energy.requires_grad_(True)
        # As in the reference: state_dict() holds references, not copies; innerloop_ctx never
        # writes q's own parameters (copy_initial_weights=True), so the restore is a no-op copy.
        backup = s.posterior.state_dict()
        with higher.innerloop_ctx(s.posterior, s.opt_posterior) as (fq, diffopt):
            for _ in range(self.k):
                diffopt.step(self._inner_loss(fq))
            batch = self.objective.perturbation(s.v)
            loss = self.objective.outer(s.energy, PosteriorView(module=fq), batch).mean()
            s.opt_energy.zero_grad(set_to_none=True)
            s.posterior.requires_grad_(False)
            loss.backward()
            if step_theta:
                s.opt_energy.step()
        s.posterior.load_state_dict(backup)
        s.posterior.requires_grad_(True)
        return float(loss.detach())

    def plain_step(self) -> None:
        self.s.energy.requires_grad_(False)
        self._warmup_step()
        self.s.energy.requires_grad_(True)


def make_impl(name: str, model: str, batch: int, seed: int) -> Impl:
    setup = build_setup(model, batch, seed)
    if name == "ours":
        return Ours(setup)
    if name == "ours_shared":
        return Ours(setup, share_inner_noise=True)
    if name == "higher":
        return Higher(setup)
    raise ValueError(name)


def equivalence_check(model: str, batch: int, seed: int, k: int = 2) -> dict[str, Any]:
    """Run one iteration of ours and of higher from the same models and the same RNG stream
    and compare dJ/dθ and the persistent φ. Equal up to float error means both compute the same
    estimator (higher's Adam puts eps outside the bias correction, so not bit-for-bit)."""
    import torch

    grads, phis, losses = {}, {}, {}
    for name in ("ours", "higher"):
        impl = make_impl(name, model, batch, seed)
        impl.set_unroll(k)
        torch.manual_seed(seed + 1)  # the same noise stream for both
        losses[name] = impl.iteration(step_theta=False)
        s = impl.s
        # A parameter J does not reach has no .grad (the GRBM's hidden bias c at K=0): count it as 0.
        grads[name] = torch.cat([(torch.zeros_like(p) if p.grad is None else p.grad).flatten()
                                 for p in s.energy.parameters()])
        phis[name] = torch.cat([p.detach().flatten() for p in s.posterior.parameters()])
    g, gh = grads["ours"].double(), grads["higher"].double()  # float32 sums over 11M entries drift
    return {
        "K": k,
        "loss_ours": losses["ours"],
        "loss_higher": losses["higher"],
        "grad_rel_err": float((g - gh).norm() / gh.norm().clamp_min(1e-30)),
        "grad_cosine": float(torch.nn.functional.cosine_similarity(g, gh, dim=0)),
        "phi_max_abs_diff": float((phis["ours"] - phis["higher"]).abs().max()),
    }
