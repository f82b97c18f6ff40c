"""The bi-level iteration written several ways for bench_bilevel.py.

    ours             distributed_bism.core.bilevel.step_from_config, as the trainer builds it:
                     exact batching of the inner feature passes (stacked calls capped by
                     objective.inner_pass_elements, by default 32768 input elements on a CPU),
                     functional Adam unroll on dicts
    ours_stacked     the same step with no cap: every stage's inner inputs in one call
    ours_unbatched   the same step with inner_pass_elements=0 (one f(ṽ) call per inner step)
    ours_checkpoint  the same step with objective.unroll_checkpoint=True (memory-bounded unroll)
    ours_shared      share_inner_noise=True: a different, cheaper estimator (one inner draw)
    higher           the reference formulation (baofff/BiSM `_update`) on the `higher` library
    torchopt         the same unroll on torchopt's functional Adam (`torchopt.adam`, update +
                     apply_updates with create_graph); its C++ op does not load on our torch, so
                     the Python path runs (recorded by the bench)
    floor            the same forward and backward passes as straight-line code: the draws, f(ṽ)
                     in the stacked calls ours makes, the loss functions, autograd.grad and an
                     inline Adam, with none of the step's bookkeeping

All but ours_shared compute one estimator; each owns identically seeded models, and
`equivalence_check` compares their θ-gradients from the same RNG stream. ours, ours_stacked,
ours_unbatched, ours_checkpoint and floor draw every noisy batch of an iteration first; higher and torchopt
draw as the reference does (one per loss), so they are compared on their own stream.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

IMPLS = ("ours", "ours_stacked", "ours_unbatched", "ours_checkpoint", "ours_shared", "higher", "torchopt", "floor")
IMPL_LABELS = {
    "ours": "ours (batched inner passes, capped by device: the default)",
    "ours_stacked": "ours, every stage's inner passes in one call",
    "ours_unbatched": "ours, unbatched inner passes",
    "ours_checkpoint": "ours, unroll_checkpoint=True",
    "ours_shared": "ours, share_inner_noise=True (different estimator)",
    "higher": "higher 0.2.1 (reference formulation)",
    "torchopt": "torchopt 0.7.3 functional Adam",
    "floor": "floor: the same passes, no bookkeeping",
}

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
    warmup_steps: int  # N


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
        n = 5
    elif model == "demo":
        # configs/demo.yaml's model (1×8×8 digits, ch 16, no extra blocks) at the N = 2.
        energy = ConvEBLVM((1, 8, 8), 20, ch=16, blocks_per_stage=0)
        posterior = GaussianPosterior((1, 8, 8), 20, encoder="conv", channels=(16, 32, 64))
        v = torch.rand(batch, 1, 8, 8)
        lr, betas = 1e-3, (0.9, 0.95)
        obj = dict(name="bimdsm", sigma_begin=0.05, sigma_end=1.2, sigma_schedule="linear", sigma0=0.1,
                   lower_level="fisher")
        n = 2
    elif model == "conv":
        # MNIST-sized deep EBLVM: BiMDSM σ ∈ linspace[0.05, 1.2], σ0 = 0.1, Fisher lower level.
        energy = ConvEBLVM((1, 32, 32), 20, ch=64, blocks_per_stage=1)
        posterior = GaussianPosterior((1, 32, 32), 20, encoder="conv")
        v = torch.rand(batch, 1, 32, 32)
        lr, betas = 1e-4, (0.9, 0.95)
        obj = dict(name="bimdsm", sigma_begin=0.05, sigma_end=1.2, sigma_schedule="linear", sigma0=0.1,
                   lower_level="fisher")
        n = 5  # N, as in the reference configs
    else:
        raise ValueError(f"unknown model {model!r}")
    return Setup(energy, posterior, torch.optim.Adam(energy.parameters(), lr, betas=betas),
                 torch.optim.Adam(posterior.parameters(), lr, betas=betas), v, lr, betas, obj, n)


def objective_config(setup: Setup, unroll_steps: int, **options: Any) -> Any:
    from distributed_bism.config import ObjectiveConfig

    return ObjectiveConfig(**setup.objective_kwargs, warmup_steps=setup.warmup_steps, unroll_steps=unroll_steps,
                           unroll_optimizer="adam", **options)


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
    """distributed_bism's BilevelStep, built exactly as the trainer builds it. `options`:
    share_inner_noise / unroll_checkpoint / inner_pass_elements (config keys)."""

    def __init__(self, setup: Setup, **options: Any):
        from distributed_bism.core.bilevel import BilevelStep
        from distributed_bism.objectives import get_objective

        self.s, self.options = setup, options
        self.objective = get_objective(objective_config(setup, 0, **options))
        self.plain = BilevelStep(self.objective, warmup_steps=1)  # one warm-up step = one plain step
        self.set_unroll(0)

    def set_unroll(self, k: int) -> None:
        from distributed_bism.core.bilevel import step_from_config
        from distributed_bism.objectives import get_objective

        cfg = objective_config(self.s, k, **self.options)
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


class _Unrolled:
    """An implementation written here: its setup, K, and the objective of that K."""

    def __init__(self, setup: Setup):
        self.s = setup
        self.set_unroll(0)

    def set_unroll(self, k: int) -> None:
        from distributed_bism.objectives import get_objective

        self.k = k
        self.objective = get_objective(objective_config(self.s, k))


class Higher(_Unrolled):
    """The reference formulation (baofff/BiSM `_update`) on `higher`, with our loss functions.

        warm-up: energy.requires_grad_(False); N × (zero_grad, inner_loss(v).backward(), opt_q.step())
        with higher.innerloop_ctx(q, opt_q) as (fq, diffopt):
            K × diffopt.step(inner_loss(v) using fq)
            loss = outer(v) using fq; loss.backward(); opt_θ.step()
        q.load_state_dict(backup)

    Every loss gets its own fresh noisy batch, as in the reference; they are drawn at the start
    of the iteration (`draws`) so that all implementations consume one RNG stream. The energy is
    called as a whole module (f(ṽ) recomputed inside each loss), as the reference does.
    """


    def draws(self) -> list[Any]:
        """The iteration's N + K + 1 noisy batches, in the order the losses use them."""
        return [self.objective.perturbation(self.s.v) for _ in range(self.s.warmup_steps + self.k + 1)]

    def _inner_loss(self, q: Any, batch: Any) -> Any:
        from distributed_bism.models.posterior import PosteriorView

        return self.objective.inner_loss(self.s.energy, PosteriorView(module=q), batch).mean()

    def _warmup_step(self, batch: Any) -> None:
        s = self.s
        s.opt_posterior.zero_grad()
        self._inner_loss(s.posterior, batch).backward()
        s.opt_posterior.step()

    def iteration(self, *, step_theta: bool = True) -> float:
        import higher

        from distributed_bism.models.posterior import PosteriorView

        s = self.s
        draws = iter(self.draws())
        s.energy.requires_grad_(False)
        s.posterior.requires_grad_(True)
        for _ in range(s.warmup_steps):
            self._warmup_step(next(draws))

        s.energy.requires_grad_(True)
        # As in the reference: state_dict() holds references, not copies; innerloop_ctx never
        # writes q's own parameters (copy_initial_weights=True), so the restore is a no-op copy.
        backup = s.posterior.state_dict()
        with higher.innerloop_ctx(s.posterior, s.opt_posterior) as (fq, diffopt):
            for _ in range(self.k):
                diffopt.step(self._inner_loss(fq, next(draws)))
            loss = self.objective.outer(s.energy, PosteriorView(module=fq), next(draws)).mean()
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
        self._warmup_step(self.objective.perturbation(self.s.v))
        self.s.energy.requires_grad_(True)


class Torchopt(Higher):
    """The reference formulation with torchopt's functional Adam in place of higher's: the K
    unrolled steps are `torchopt.adam(...).update` + `apply_updates` on a parameter tuple with
    create_graph, warm-started from the posterior's torch Adam state (as higher does)."""

    def iteration(self, *, step_theta: bool = True) -> float:
        import torch
        import torchopt

        from distributed_bism.models.posterior import PosteriorView

        s = self.s
        draws = iter(self.draws())
        s.energy.requires_grad_(False)
        for _ in range(s.warmup_steps):
            self._warmup_step(next(draws))
        s.energy.requires_grad_(True)

        names = [n for n, _ in s.posterior.named_parameters()]
        params = tuple(p.detach().requires_grad_(True) for _, p in s.posterior.named_parameters())
        opt = torchopt.adam(s.lr, betas=s.betas, use_accelerated_op=False)
        adam_state, rest = opt.init(params)
        warm = [s.opt_posterior.state.get(p, {}) for p in s.posterior.parameters()]
        if all("exp_avg" in w for w in warm):
            adam_state = adam_state._replace(
                mu=[w["exp_avg"].clone() for w in warm],
                nu=[w["exp_avg_sq"].clone() for w in warm],
                count=[torch.as_tensor(w["step"], dtype=torch.int64).clone() for w in warm],
            )
        state: Any = (adam_state, rest)
        for _ in range(self.k):
            view = PosteriorView(s.posterior, params=dict(zip(names, params)))
            loss = self.objective.inner_loss(s.energy, view, next(draws)).mean()
            grads = torch.autograd.grad(loss, params, create_graph=True)
            updates, state = opt.update(grads, state, params=params, inplace=False)
            params = torchopt.apply_updates(params, updates, inplace=False)
        view = PosteriorView(s.posterior, params=dict(zip(names, params)))
        loss = self.objective.outer(s.energy, view, next(draws)).mean()
        s.opt_energy.zero_grad(set_to_none=True)
        loss.backward(inputs=list(s.energy.parameters()))
        if step_theta:
            s.opt_energy.step()
        return float(loss.detach())


class Floor(_Unrolled):
    """The estimator's own passes and nothing else: draw every noisy batch, f(ṽ) of the N warm-up
    batches in no-grad calls and of the K unrolled ones in graph-keeping calls, stacked as ours
    stacks them (conv models), the lower- and higher-level loss functions, autograd.grad, and Adam as a few tensor
    expressions. No step object, updater, dataclass or dict of views in between."""

    def _fns(self, xs: list[Any], grad: bool) -> list[Any]:
        import torch

        e = self.s.energy
        if not hasattr(e, "visible_features") or not xs:
            return [e] * len(xs)
        from distributed_bism.core.bilevel import stack_groups, stack_limit

        feats: list[Any] = []
        with torch.set_grad_enabled(grad):
            for group in stack_groups([x.numel() for x in xs], stack_limit(None, xs[0].device)):
                stacked = torch.cat([xs[i].detach() for i in group])
                feats.extend(e.visible_features(stacked).split(xs[0].shape[0]))
        return [lambda _x, h, f=f: e.energy_from_features(f, h) for f in feats]

    def iteration(self, *, step_theta: bool = True) -> float:
        import torch

        from distributed_bism.models.posterior import PosteriorView

        s, obj, k = self.s, self.objective, self.k
        draws = [obj.perturbation(s.v) for _ in range(s.warmup_steps + k + 1)]
        warm, inner, outer = draws[: s.warmup_steps], draws[s.warmup_steps : -1], draws[-1]
        q_params = list(s.posterior.parameters())
        view = PosteriorView(s.posterior)
        for batch, fn in zip(warm, self._fns([b.x for b in warm], grad=False)):
            grads = torch.autograd.grad(obj.inner_loss(fn, view, batch).mean(), q_params)
            for p, g in zip(q_params, grads):
                p.grad = g
            s.opt_posterior.step()
        names = [n for n, _ in s.posterior.named_parameters()]
        phi = [p.detach().requires_grad_(True) for p in q_params]
        b1, b2 = s.betas
        st = [s.opt_posterior.state[p] for p in q_params]
        m = [x["exp_avg"] for x in st]
        v2 = [x["exp_avg_sq"] for x in st]
        t = float(st[0]["step"])
        for batch, fn in zip(inner, self._fns([b.x for b in inner], grad=True)):
            loss = obj.inner_loss(fn, PosteriorView(s.posterior, params=dict(zip(names, phi))), batch).mean()
            grads = torch.autograd.grad(loss, phi, create_graph=True)
            t += 1
            m = [b1 * a + (1 - b1) * g for a, g in zip(m, grads)]
            v2 = [b2 * a + (1 - b2) * g * g for a, g in zip(v2, grads)]
            phi = [
                p - s.lr * (a / (1 - b1**t)) / ((c / (1 - b2**t)).clamp_min(1e-30).sqrt() + 1e-8)
                for p, a, c in zip(phi, m, v2)
            ]
        loss = obj.outer(s.energy, PosteriorView(s.posterior, params=dict(zip(names, phi))), outer).mean()
        s.opt_energy.zero_grad(set_to_none=True)
        loss.backward(inputs=list(s.energy.parameters()))
        if step_theta:
            s.opt_energy.step()
        return float(loss.detach())

    def plain_step(self) -> None:
        raise NotImplementedError("the floor has no plain step of its own")


def make_impl(name: str, model: str, batch: int, seed: int) -> Impl:
    setup = build_setup(model, batch, seed)
    if name == "ours":
        return Ours(setup)
    if name == "ours_stacked":
        return Ours(setup, inner_pass_elements=10**12)
    if name == "ours_unbatched":
        return Ours(setup, inner_pass_elements=0)
    if name == "ours_checkpoint":
        return Ours(setup, unroll_checkpoint=True)
    if name == "ours_shared":
        return Ours(setup, share_inner_noise=True)
    if name == "higher":
        return Higher(setup)
    if name == "torchopt":
        return Torchopt(setup)
    if name == "floor":
        return Floor(setup)
    raise ValueError(name)


CHECKED = ("ours_stacked", "ours_unbatched", "ours_checkpoint", "higher", "torchopt", "floor")  # each against "ours"


def equivalence_check(model: str, batch: int, seed: int, k: int = 2) -> dict[str, Any]:
    """One iteration of "ours" and of every implementation in CHECKED from the same models and
    the same RNG stream, without stepping θ: dJ/dθ and the persistent φ must agree to float
    error (higher's Adam puts eps outside the bias correction, so not bit-for-bit)."""
    import torch

    grads, phis, losses = {}, {}, {}
    for name in ("ours", *CHECKED):
        impl = make_impl(name, model, batch, seed)
        impl.set_unroll(k)
        torch.manual_seed(seed + 1)  # the same noise stream for all
        losses[name] = impl.iteration(step_theta=False)
        s = impl.s
        # A parameter J does not reach has no .grad (the GRBM's hidden bias c at K=0): count it as 0.
        grads[name] = torch.cat([(torch.zeros_like(p) if p.grad is None else p.grad).flatten()
                                 for p in s.energy.parameters()]).double()  # float32 sums drift
        phis[name] = torch.cat([p.detach().flatten() for p in s.posterior.parameters()])
    g = grads["ours"]
    return {
        "K": k,
        "losses": losses,
        "vs_ours": {
            name: {
                "grad_rel_err": float((grads[name] - g).norm() / g.norm().clamp_min(1e-30)),
                "phi_max_abs_diff": float((phis[name] - phis["ours"]).abs().max()),
            }
            for name in CHECKED
        },
    }
