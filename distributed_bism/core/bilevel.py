"""One training iteration of bi-level score matching (docs/methods.md §1), with no distributed code.

    0. Every noisy batch of the iteration is drawn first: ṽ_1..ṽ_N (warm-up), ṽ'_1..ṽ'_K
       (unroll) and the outer batch (`InnerDraws`). None of them depends on φ.
    1. N warm-up steps: ordinary optimiser steps on φ minimising G(θ, φ), θ frozen. They persist.
    2. K unrolled steps: φ_{k+1} = step(φ_k, ∇_φ G(θ, φ_k)) with create_graph, on parameter
       dicts, so φ_K = φ_K(θ) is differentiable and the posterior module is never written.
    3. J(θ, φ_K(θ)) and its gradient, accumulated into θ's .grad only.
    4. φ_1..φ_K are dropped; the module keeps its warm-up value.

Single-level objectives (DSM, SSM, CD ...) skip 0, 1, 2 and 4. The caller steps θ's optimiser.

Exact batching. For an energy that splits into visible features f(v) and E(f, h) (the conv
EBLVM), f at the N warm-up inputs is computed in no-grad calls on stacked inputs, and f at the K
unrolled inputs in calls that keep the graph: the inputs do not depend on φ, so this computes the
same numbers as N + K separate calls, in fewer. How many inputs one call stacks is capped by
`objective.inner_pass_elements` (auto: all of them on a GPU, where each call costs a launch; at
most CPU_STACK_ELEMENTS input elements on a CPU, where larger stacks run slower per example).
The outer batch keeps its own call: its score needs ∇_v f, whose backward would otherwise run
over all (K+1)·B inputs.

`energy` and `posterior` may be DDP / DeepSpeed wrappers: the higher-level loss calls the
energy's *wrapper* forward and the warm-up calls the posterior's wrapper forward, because a
wrapper whose forward is never called does not average gradients (docs/stack.md). Inner losses use
the unwrapped modules.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
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
    return inner_energy_fns(energy, [x], frozen=frozen)[0]


# "auto" on a CPU: at most this many input elements (examples × C·H·W) per stacked f call. Below
# it a stacked call is cheaper than separate ones (fewer calls); above it the stacked activations
# fall out of cache and a call is slower per example (bench/README.md, "Exact batching").
CPU_STACK_ELEMENTS = 32768


def stack_limit(inner_pass_elements: int | None, device: torch.device) -> int | None:
    """The most input elements one stacked f call may take (None: no limit), for the config
    value `objective.inner_pass_elements` (None: auto, by device) on `device`."""
    if inner_pass_elements is not None:
        return inner_pass_elements
    return None if device.type == "cuda" else CPU_STACK_ELEMENTS


def stack_groups(sizes: Sequence[int], limit: int | None) -> list[list[int]]:
    """Consecutive indices of inputs of `sizes` elements each, grouped so that a group's total
    is at most `limit` (None: one group). A group holds at least one input, whatever its size,
    so limit 0 gives one call per input."""
    groups: list[list[int]] = []
    total = 0
    for i, n in enumerate(sizes):
        if groups and (limit is None or total + n <= limit):
            groups[-1].append(i)
            total += n
        else:
            groups.append([i])
            total = n
    return groups


def inner_energy_fns(
    energy: nn.Module, xs: Sequence[Tensor], *, frozen: bool, max_elements: int | None = None
) -> list[EnergyFn]:
    """`inner_energy_fn` at each x of `xs` (each (B, ...)), with f computed on stacked inputs of
    at most `max_elements` elements per call (None: all in one call). f is per example, so a
    stacked call gives the same numbers as separate ones. An x that appears more than once
    (shared inner noise) is computed once."""
    if not hasattr(energy, "visible_features"):
        return [energy] * len(xs)
    featured = cast(_FeatureEnergy, energy)
    unique: dict[int, Tensor] = {id(x): x.detach() for x in xs}
    inputs = list(unique.values())
    chunks: list[Tensor] = []
    with torch.no_grad() if frozen else nullcontext():
        for group in stack_groups([x.numel() for x in inputs], max_elements):
            part = [inputs[i] for i in group]
            if len(part) == 1:
                chunks.append(featured.visible_features(part[0]))
            else:
                chunks.extend(featured.visible_features(torch.cat(part)).split([x.shape[0] for x in part]))
    feats = dict(zip(unique, chunks))

    def fn_for(f: Tensor) -> EnergyFn:
        return lambda _x, h: featured.energy_from_features(f, h)

    return [fn_for(feats[id(x)]) for x in xs]


@dataclass
class InnerDraws:
    """The noisy batches of one iteration: N warm-up, K unrolled, and the outer batch of J. With
    shared inner noise the N + K inner entries are one batch repeated."""

    warmup: list[NoisyBatch]
    unroll: list[NoisyBatch]
    outer: NoisyBatch


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
        inner_pass_elements: compute f at the N warm-up and at the K unrolled inputs in stacked
            calls of at most this many input elements (exact; see the module docstring). None:
            by device (`stack_limit`); 0: one call per input.
        unroll_checkpoint: recompute each unrolled step in the backward pass instead of keeping
            its activations, so that memory stays about flat in K (same hypergradient; f is then
            computed per step, inside its checkpoint).
    """

    def __init__(
        self,
        objective: Objective,
        *,
        warmup_steps: int = 0,
        unroll_steps: int = 0,
        unroll_optimizer: FunctionalOptimizer | None = None,
        share_inner_noise: bool = False,
        inner_pass_elements: int | None = None,
        unroll_checkpoint: bool = False,
    ):
        if warmup_steps < 0 or unroll_steps < 0:
            raise ValueError(f"warm-up and unroll steps must be >= 0, got N={warmup_steps}, K={unroll_steps}")
        self.objective = objective
        self.warmup_steps, self.unroll_steps = warmup_steps, unroll_steps
        self.unroll_optimizer = unroll_optimizer or SGD(1e-3)
        self.share_inner_noise = share_inner_noise
        self.inner_pass_elements = inner_pass_elements
        self.unroll_checkpoint = unroll_checkpoint

    # ------------------------------------------------------------------ stages
    def draw(self, v: Tensor) -> InnerDraws:
        """Step 0: every noisy batch of one iteration on v (B, ...), in the order warm-up,
        unroll, outer (the shared draw first when share_inner_noise)."""
        perturb = self.objective.perturbation
        if self.share_inner_noise:
            shared = perturb(v)
            return InnerDraws([shared] * self.warmup_steps, [shared] * self.unroll_steps, perturb(v))
        warm = [perturb(v) for _ in range(self.warmup_steps)]
        inner = [perturb(v) for _ in range(self.unroll_steps)]
        return InnerDraws(warm, inner, perturb(v))

    def warmup(
        self,
        energy: nn.Module,
        posterior: nn.Module,
        v: Tensor,
        optimizer: Updater | torch.optim.Optimizer,
        batches: Sequence[NoisyBatch] | None = None,
    ) -> Tensor | None:
        """Step 1: N persistent optimiser steps on φ, on `batches` (drawn from v when None).
        Returns the last mean G (detached)."""
        if self.warmup_steps == 0:
            return None
        optimizer = as_updater(optimizer)
        core_q: Posterior = unwrap(posterior)  # type: ignore[assignment]
        q = PosteriorView(core_q, forward=posterior)
        if batches is None:
            batches = [self.objective.perturbation(v) for _ in range(self.warmup_steps)]
        with frozen(unwrap(energy)):
            limit = stack_limit(self.inner_pass_elements, v.device)
            fns = inner_energy_fns(unwrap(energy), [b.x for b in batches], frozen=True, max_elements=limit)
            last = None
            for batch, energy_fn in zip(batches, fns):
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
        batches: Sequence[NoisyBatch] | None = None,
    ) -> ParamDict:
        """Step 2: φ_K(θ) from φ by K differentiable steps (φ itself when K = 0), on `batches`
        (K of them; `shared` repeated, or drawn from v step by step, when None)."""
        if self.unroll_steps == 0:
            return {n: p.detach() for n, p in phi.items()}
        core = unwrap(energy)
        phi0 = {n: p.detach().requires_grad_(True) for n, p in phi.items()}
        if batches is None and shared is not None:
            batches = [shared] * self.unroll_steps
        fns: list[EnergyFn] | None = None
        if batches is not None and not self.unroll_checkpoint:
            limit = stack_limit(self.inner_pass_elements, v.device)
            fns = inner_energy_fns(core, [b.x for b in batches], frozen=False, max_elements=limit)

        def inner_loss(phi_k: ParamDict, k: int) -> Tensor:
            batch = batches[k] if batches is not None else self.objective.perturbation(v)
            energy_fn = fns[k] if fns is not None else inner_energy_fn(core, batch.x, frozen=False)
            return self.objective.inner_loss(energy_fn, PosteriorView(posterior, params=phi_k), batch).mean()

        state = self.unroll_optimizer.init(phi0, optimizer_state)
        theta = [p for p in core.parameters() if p.requires_grad] if self.unroll_checkpoint else None
        return unroll(phi0, inner_loss, self.unroll_steps, self.unroll_optimizer, state, checkpoint_theta=theta)

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
        unroll_batches: Sequence[NoisyBatch] | None = None,
    ) -> StepOutput:
        """Steps 2-3: J(θ, φ_K(θ)) and dJ/dθ, accumulated into θ's .grad (not φ's) by
        `energy_updater.backward`, or by backward(inputs=θ) when there is none. The unroll runs
        on `unroll_batches` (drawn step by step when None); J on `outer_batch`, drawn from v
        when None (diagnostics pass one to compare K on the same noise)."""
        q = None
        if posterior is not None and phi is not None:
            phi_k = self.unrolled_posterior(energy, posterior, phi, v, optimizer_state, shared, unroll_batches)
            q = PosteriorView(posterior, params=phi_k)
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
        draws = self.draw(v)
        inner = self.warmup(energy, posterior, v, posterior_optimizer, draws.warmup)
        core_q: Posterior = unwrap(posterior)  # type: ignore[assignment]
        phi: ParamDict = dict(core_q.named_parameters())
        # Only the unrolled Adam reads the optimiser state; at K = 0 or with SGD skip collecting it
        # (under ZeRO it is a collective).
        warm = self.unroll_steps and not isinstance(self.unroll_optimizer, SGD)
        warm_state = posterior_optimizer.optimizer_state(phi) if warm else None
        out = self.hypergradient(
            energy,
            core_q,
            phi,
            v,
            warm_state,
            energy_updater=energy_updater,
            outer_batch=draws.outer,
            unroll_batches=draws.unroll,
        )
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
        inner_pass_elements=cfg.inner_pass_elements,
        unroll_checkpoint=cfg.unroll_checkpoint,
    )
