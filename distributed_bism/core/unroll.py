"""Differentiable lower-level optimisation over parameter dicts.

    φ_0 = φ,   φ_{k+1} = step(φ_k, ∇_φ G(θ, φ_k)),   k = 0..K−1

Each gradient is taken with `create_graph=True`, so φ_K is a differentiable function of θ.
Nothing here touches module parameters: optimisers take and return dicts of tensors.
`SGD` and `Adam` reproduce torch.optim.SGD / torch.optim.Adam (no weight decay) step for step.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor

from distributed_bism.core.recompute import checkpointed_step

ParamDict = dict[str, Tensor]
OptState = dict[str, Any]


class FunctionalOptimizer(Protocol):
    def init(self, params: ParamDict, warm_state: Mapping[str, Mapping[str, Tensor]] | None = None) -> OptState: ...

    def step(self, params: ParamDict, grads: ParamDict, state: OptState) -> tuple[ParamDict, OptState]: ...


@dataclass(frozen=True)
class SGD:
    """φ ← φ − lr · g."""

    lr: float

    def init(self, params: ParamDict, warm_state: Mapping[str, Mapping[str, Tensor]] | None = None) -> OptState:
        return {}

    def step(self, params: ParamDict, grads: ParamDict, state: OptState) -> tuple[ParamDict, OptState]:
        return {n: (p - self.lr * grads[n]).to(p.dtype) for n, p in params.items()}, state


@dataclass(frozen=True)
class Adam:
    """Adam as torch.optim.Adam computes it, differentiably:

        m ← β1 m + (1−β1) g,   s ← β2 s + (1−β2) g²,   t ← t + 1
        φ ← φ − lr · (m / (1−β1^t)) / (√(s / (1−β2^t)) + eps)

    `init` may continue from a torch.optim.Adam state (detached), as the reference's
    `higher`-based unroll does; otherwise m = s = 0, t = 0.
    """

    lr: float
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8

    def init(self, params: ParamDict, warm_state: Mapping[str, Mapping[str, Tensor]] | None = None) -> OptState:
        m, s, t = {}, {}, {}
        for n, p in params.items():
            prev = (warm_state or {}).get(n)
            if prev and "exp_avg" in prev:
                # no copy: the unroll never writes m, s in place (each step makes new tensors)
                m[n], s[n] = prev["exp_avg"].detach(), prev["exp_avg_sq"].detach()
                t[n] = float(prev["step"])
            else:
                m[n], s[n], t[n] = torch.zeros_like(p), torch.zeros_like(p), 0.0
        return {"m": m, "s": s, "t": t}

    def step(self, params: ParamDict, grads: ParamDict, state: OptState) -> tuple[ParamDict, OptState]:
        b1, b2 = self.betas
        new, m, s, t = {}, {}, {}, {}
        for n, p in params.items():
            g = grads[n]
            t[n] = state["t"][n] + 1
            m[n] = b1 * state["m"][n] + (1 - b1) * g
            s[n] = b2 * state["s"][n] + (1 - b2) * g * g
            # clamp keeps √ differentiable where s is exactly 0; it never changes a value that
            # matters, as √1e-30 is far below eps.
            denom = (s[n] / (1 - b2 ** t[n])).clamp_min(1e-30).sqrt() + self.eps
            # .to: a bf16 engine's φ stays bf16 under its fp32 moments (a no-op in fp32)
            new[n] = (p - self.lr * (m[n] / (1 - b1 ** t[n])) / denom).to(p.dtype)
        return new, {"m": m, "s": s, "t": t}


def get_unroll_optimizer(name: str, *, lr: float, betas: tuple[float, float] = (0.9, 0.999)) -> FunctionalOptimizer:
    """The unrolled optimiser named `name` ("sgd" or "adam")."""
    if name == "sgd":
        return SGD(lr)
    if name == "adam":
        return Adam(lr, tuple(betas))  # type: ignore[arg-type]
    raise ValueError(f"unknown objective.unroll_optimizer {name!r}; expected sgd or adam")


def torch_optimizer_state(optimizer: torch.optim.Optimizer | None, params: Mapping[str, Tensor]) -> dict[str, dict]:
    """A torch optimiser's per-parameter state, keyed by parameter name instead of tensor."""
    if optimizer is None:
        return {}
    by_id = {id(p): n for n, p in params.items()}
    return {by_id[id(p)]: st for p, st in optimizer.state.items() if id(p) in by_id}


def unroll(
    phi: ParamDict,
    inner_loss: Callable[[ParamDict, int], Tensor],
    steps: int,
    optimizer: FunctionalOptimizer,
    state: OptState,
    *,
    checkpoint_theta: Sequence[Tensor] | None = None,
) -> ParamDict:
    """Run `steps` differentiable optimiser steps from φ and return φ_K.

    inner_loss(φ_k, k) must return a scalar. A parameter that the loss does not reach gets a
    zero gradient. The graph of every step is kept so that φ_K can be differentiated in θ.

    checkpoint_theta: when given, keep only each step's inputs (φ_k and the optimiser state)
    and recompute the step, inner loss included, when the backward pass reaches it
    (core/recompute.py); these are the θ tensors the inner loss reads. Peak memory then holds
    one step's activations instead of K, for about one more step's forward per step.
    """

    def one_step(phi_k: ParamDict, state_k: OptState, k: int) -> tuple[ParamDict, OptState]:
        loss = inner_loss(phi_k, k)
        names = list(phi_k)
        grads = torch.autograd.grad(loss, [phi_k[n] for n in names], create_graph=True, allow_unused=True)
        grad_dict = {n: torch.zeros_like(phi_k[n]) if g is None else g for n, g in zip(names, grads)}
        return optimizer.step(phi_k, grad_dict, state_k)

    for k in range(steps):
        if checkpoint_theta is not None:
            phi, state = checkpointed_step(functools.partial(one_step, k=k), phi, state, checkpoint_theta)
        else:
            phi, state = one_step(phi, state, k)
    return phi
