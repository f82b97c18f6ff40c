"""One training iteration of bi-level score matching (docs/methods.md §1), with no distributed code.

    1. N warm-up steps: ordinary optimiser steps on φ minimising G(θ, φ), θ frozen. They persist.
    2. K unrolled steps: φ_{k+1} = step(φ_k, ∇_φ G(θ, φ_k)) with create_graph, on parameter
       dicts, so φ_K = φ_K(θ) is differentiable and the posterior module is never written.
    3. J(θ, φ_K(θ)) and its gradient, accumulated into θ's .grad only.
    4. φ_1..φ_K are dropped; the module keeps its warm-up value.

Single-level objectives (DSM, SSM, CD ...) skip 1, 2 and 4. The caller steps θ's optimiser.

`energy` and `posterior` may be DDP / DeepSpeed wrappers: the higher-level loss calls the
energy's *wrapper* forward and the warm-up calls the posterior's wrapper forward, because a
wrapper whose forward is never called does not average gradients (docs/stack.md). Inner losses use
the unwrapped modules.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Protocol, cast

import torch
from torch import Tensor, nn

from distributed_bism.config import ObjectiveConfig
from distributed_bism.core.unroll import (
    SGD,
    FunctionalOptimizer,
    ParamDict,
    get_unroll_optimizer,
    unroll,
)
from distributed_bism.models import unwrap
from distributed_bism.models.posterior import Posterior, PosteriorView
from distributed_bism.objectives import Objective
from distributed_bism.objectives.noise import NoisyBatch
from distributed_bism.objectives.score_matching import EnergyFn
from distributed_bism.training.updaters import Updater, as_updater


@contextmanager
def frozen(module: nn.Module) -> Iterator[None]:
    """θ held constant: no gradient reaches it, whoever calls backward (a DeepSpeed engine
    cannot be told `inputs=`)."""
    params = [p for p in module.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


class _FeatureEnergy(Protocol):
    """An energy that splits E(v, h) into visible features f(v) and E(f, h) (the conv EBLVM)."""

    def visible_features(self, v: Tensor) -> Tensor: ...

    def energy_from_features(self, f: Tensor, h: Tensor) -> Tensor: ...


def inner_energy_fn(energy: nn.Module, x: Tensor, *, frozen: bool) -> EnergyFn:
    """E(·, h) at the fixed inner-loop input x, for lower-level losses.

    Models that expose `visible_features` (the conv EBLVM) compute f(x) once here; with
    `frozen=True` without a graph, since the warm-up never differentiates in θ. For them the
    returned function ignores its first argument and is valid for this x only; other models
    are returned as they are.
    """
    if not hasattr(energy, "visible_features"):
        return energy
    featured = cast(_FeatureEnergy, energy)
    with torch.no_grad() if frozen else nullcontext():
        feats = featured.visible_features(x.detach())
    return lambda _x, h: featured.energy_from_features(feats, h)


@dataclass
class StepOutput:
    """What one iteration measured. loss: mean J (detached). inner_loss: mean G of the last
    warm-up step, or None."""

    loss: Tensor
    inner_loss: Tensor | None = None


class BilevelStep:
    """Performs one whole iteration; see the module docstring.

    Args:
        objective: from `objectives.get_objective`.
        warmup_steps: N ≥ 0.
        unroll_steps: K ≥ 0. K = 0 treats φ as a constant and costs one plain SM step.
        unroll_optimizer: the differentiable optimiser of step 2 (functional SGD or Adam).
        share_inner_noise: draw one noisy batch for all N + K inner steps of an iteration (not
            the reference estimator; makes the unroll much cheaper for the conv EBLVM).
    """

    def __init__(
        self,
        objective: Objective,
        *,
        warmup_steps: int = 0,
        unroll_steps: int = 0,
        unroll_optimizer: FunctionalOptimizer | None = None,
        share_inner_noise: bool = False,
    ):
        if warmup_steps < 0 or unroll_steps < 0:
            raise ValueError(f"warm-up and unroll steps must be >= 0, got N={warmup_steps}, K={unroll_steps}")
        self.objective = objective
        self.warmup_steps, self.unroll_steps = warmup_steps, unroll_steps
        self.unroll_optimizer = unroll_optimizer or SGD(1e-3)
        self.share_inner_noise = share_inner_noise

    # ------------------------------------------------------------------ stages
    def warmup(
        self,
        energy: nn.Module,
        posterior: nn.Module,
        v: Tensor,
        optimizer: Updater | torch.optim.Optimizer,
        shared: NoisyBatch | None = None,
    ) -> Tensor | None:
        """Step 1: N persistent optimiser steps on φ. Returns the last mean G (detached)."""
        if self.warmup_steps == 0:
            return None
        optimizer = as_updater(optimizer)
        core_q: Posterior = unwrap(posterior)  # type: ignore[assignment]
        q = PosteriorView(core_q, forward=posterior)
        with frozen(unwrap(energy)):
            return self._warmup(energy, q, v, optimizer, shared)

    def _warmup(
        self, energy: nn.Module, q: PosteriorView, v: Tensor, optimizer: Updater, shared: NoisyBatch | None
    ) -> Tensor | None:
        frozen_fn = inner_energy_fn(unwrap(energy), shared.x, frozen=True) if shared else None
        last = None
        for _ in range(self.warmup_steps):
            batch = shared or self.objective.perturbation(v)
            energy_fn = frozen_fn or inner_energy_fn(unwrap(energy), batch.x, frozen=True)
            loss = self.objective.inner_loss(energy_fn, q, batch).mean()
            optimizer.zero_grad()
            optimizer.backward(loss)  # φ only: θ is frozen at this level
            optimizer.step()
            last = loss.detach()
        return last

    def unrolled_posterior(
        self,
        energy: nn.Module,
        posterior: Posterior,
        phi: ParamDict,
        v: Tensor,
        optimizer_state: dict | None = None,
        shared: NoisyBatch | None = None,
    ) -> ParamDict:
        """Step 2: φ_K(θ) from φ by K differentiable steps (φ itself when K = 0)."""
        if self.unroll_steps == 0:
            return {n: p.detach() for n, p in phi.items()}
        core = unwrap(energy)
        phi0 = {n: p.detach().requires_grad_(True) for n, p in phi.items()}
        shared_fn = inner_energy_fn(core, shared.x, frozen=False) if shared else None

        def inner_loss(phi_k: ParamDict, k: int) -> Tensor:
            batch = shared or self.objective.perturbation(v)
            energy_fn = shared_fn or inner_energy_fn(core, batch.x, frozen=False)
            return self.objective.inner_loss(energy_fn, PosteriorView(posterior, params=phi_k), batch).mean()

        state = self.unroll_optimizer.init(phi0, optimizer_state)
        return unroll(phi0, inner_loss, self.unroll_steps, self.unroll_optimizer, state)

    def hypergradient(
        self,
        energy: nn.Module,
        posterior: Posterior | None,
        phi: ParamDict | None,
        v: Tensor,
        optimizer_state: dict | None = None,
        shared: NoisyBatch | None = None,
        energy_updater: Updater | None = None,
        outer_batch: NoisyBatch | None = None,
    ) -> StepOutput:
        """Steps 2-3: J(θ, φ_K(θ)) and dJ/dθ, accumulated into θ's .grad (not φ's) by
        `energy_updater.backward`, or by backward(inputs=θ) when there is none. `outer_batch`:
        the noisy batch of J, drawn from v when None (diagnostics pass one to compare K on the
        same noise)."""
        q = None
        if posterior is not None and phi is not None:
            q = PosteriorView(
                posterior, params=self.unrolled_posterior(energy, posterior, phi, v, optimizer_state, shared)
            )
        loss = self.objective.outer(energy, q, outer_batch or self.objective.perturbation(v)).mean()
        if energy_updater is not None:
            energy_updater.backward(loss)
        else:
            loss.backward(inputs=[p for p in energy.parameters() if p.requires_grad])
        return StepOutput(loss=loss.detach())

    # ------------------------------------------------------------------ whole
    def __call__(
        self,
        *,
        energy: nn.Module,
        v: Tensor,
        posterior: nn.Module | None = None,
        posterior_optimizer: Updater | torch.optim.Optimizer | None = None,
        energy_updater: Updater | None = None,
    ) -> StepOutput:
        """One iteration on batch v (B, ...). θ's .grad receives dJ/dθ; the caller steps θ.
        `posterior_optimizer` is stepped N times (a torch optimiser is wrapped as a TorchUpdater)."""
        if not self.objective.bilevel:
            return self.hypergradient(energy, None, None, v, energy_updater=energy_updater)
        if posterior is None or posterior_optimizer is None:
            raise ValueError(f"objective {self.objective.name!r} needs a posterior and its optimiser")
        posterior_optimizer = as_updater(posterior_optimizer)
        shared = self.objective.perturbation(v) if self.share_inner_noise else None
        inner = self.warmup(energy, posterior, v, posterior_optimizer, shared)
        core_q: Posterior = unwrap(posterior)  # type: ignore[assignment]
        phi: ParamDict = dict(core_q.named_parameters())
        # Only the unrolled Adam reads the optimiser state; at K = 0 or with SGD skip collecting it
        # (under ZeRO it is a collective).
        warm = self.unroll_steps and not isinstance(self.unroll_optimizer, SGD)
        warm_state = posterior_optimizer.optimizer_state(phi) if warm else None
        out = self.hypergradient(energy, core_q, phi, v, warm_state, shared, energy_updater)
        out.inner_loss = inner
        return out


def step_from_config(
    objective: Objective,
    cfg: ObjectiveConfig,
    *,
    posterior_lr: float,
    posterior_betas: tuple[float, float] = (0.9, 0.999),
) -> BilevelStep:
    """The BilevelStep an ObjectiveConfig describes; the unrolled lr defaults to the posterior's."""
    if not objective.bilevel:
        return BilevelStep(objective)
    opt = get_unroll_optimizer(cfg.unroll_optimizer, lr=cfg.unroll_lr or posterior_lr, betas=posterior_betas)
    return BilevelStep(
        objective,
        warmup_steps=cfg.warmup_steps,
        unroll_steps=cfg.unroll_steps,
        unroll_optimizer=opt,
        share_inner_noise=cfg.share_inner_noise,
    )
