"""Optimisers as the training loop sees them: build, schedule, step, skip bad steps, average.

An `Updater` owns one parameter set's optimiser (θ or φ). The bi-level step only calls
`zero_grad`, `backward` and `step` on it, so the same step runs on a plain torch optimiser
(local, DDP) or on a DeepSpeed engine (`strategies.EngineUpdater`).

Learning-rate schedules are pure functions of the iteration (`LRSchedule.at(t)`) that the loop
writes into the param groups once per iteration: a DeepSpeed engine would step its own
scheduler at every warm-up step, and a function of t checkpoints as the integer t.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch import Tensor, nn

from distributed_bism.core.unroll import torch_optimizer_state


@dataclass(frozen=True)
class LRSchedule:
    """lr(t) = base_lr for "constant"; for "cosine", base_lr decays to min_lr over `total` iterations.
    With `warmup` = W > 0 the lr first rises linearly, lr(t) = base_lr·(t + 1)/W for t < W (the
    cosine still spans all `total` iterations, so the two agree at t = W up to the decay so far)."""

    base_lr: float
    schedule: str = "constant"
    total: int = 1
    min_lr: float = 0.0
    warmup: int = 0

    def at(self, t: int) -> float:
        ramp = min(1.0, (t + 1) / self.warmup) if self.warmup else 1.0
        if self.schedule == "constant":
            return self.base_lr * ramp
        frac = min(t, self.total) / self.total
        return ramp * (self.min_lr + (self.base_lr - self.min_lr) * 0.5 * (1 + math.cos(math.pi * frac)))


def all_ranks_agree(ok: bool) -> bool:
    """True on every rank iff `ok` is True on every rank (one tiny all-reduce; local when not distributed)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return ok
    flag = torch.tensor([1.0 if ok else 0.0])
    if dist.get_backend() == "nccl":
        flag = flag.cuda()
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item() > 0)


def grad_norm(params: Iterable[Tensor]) -> float:
    """‖g‖₂ over the .grad of `params` (missing grads count as 0)."""
    norms = [p.grad.detach().float().norm() for p in params if p.grad is not None]
    return float(torch.stack(norms).norm()) if norms else 0.0


class Updater(Protocol):
    """What the bi-level step and the loop need from an optimiser."""

    def zero_grad(self) -> None: ...

    def backward(self, loss: Tensor) -> None:
        """Accumulate d loss / d(own parameters) into their .grad, and nothing else's."""

    def step(self) -> bool:
        """Apply the gradient, unless it is non-finite on some rank; True if applied (same on every rank)."""

    def set_lr(self, lr: float) -> None: ...

    def grad_norm(self) -> float: ...

    def optimizer_state(self, params: Mapping[str, Tensor]) -> dict[str, dict]:
        """Per-parameter optimiser state keyed by name (the unrolled Adam continues from it)."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class TorchUpdater:
    """A torch optimiser over `params`; `backward` uses `inputs=params`, so the other level's
    .grad is never touched. Under DDP the gradients are already averaged when `step` runs, so
    a non-finite value anywhere is non-finite everywhere; the flag is still all-reduced, which
    also covers a loss that is infinite while its gradient is not.

    touch_all (DDP): every parameter receives a gradient in every backward, zero where the loss
    does not reach it. DDP's reducer all-reduces a bucket only when every parameter in it got a
    gradient; a parameter that is in the forward graph but not in the backward of a score loss
    (the GRBM's hidden bias c at K = 0: ∇ᵥ(cᵀh) = 0) would otherwise hold its bucket back, and
    the gradients of the whole bucket would silently stay un-averaged.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, *, touch_all: bool = False):
        self.optimizer = optimizer
        self.params = [p for g in optimizer.param_groups for p in g["params"]]
        self.touch_all = touch_all
        self._loss_finite = True

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def backward(self, loss: Tensor) -> None:
        self._loss_finite = bool(torch.isfinite(loss.detach()).all())
        if self.touch_all:
            loss = loss + sum(p.sum() for p in self.params) * 0.0
        loss.backward(inputs=self.params)

    def step(self) -> bool:
        grads = [torch.isfinite(p.grad).all() for p in self.params if p.grad is not None]
        ok = self._loss_finite and (not grads or bool(torch.stack(grads).all()))  # one device sync, not one per tensor
        if not all_ranks_agree(ok):
            self.zero_grad()
            return False
        self.optimizer.step()
        return True

    def set_lr(self, lr: float) -> None:
        for g in self.optimizer.param_groups:
            g["lr"] = lr

    def grad_norm(self) -> float:
        return grad_norm(self.params)

    def optimizer_state(self, params: Mapping[str, Tensor]) -> dict[str, dict]:
        return torch_optimizer_state(self.optimizer, params)

    def state_dict(self) -> dict[str, Any]:
        return self.optimizer.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state)


def as_updater(optimizer: Updater | torch.optim.Optimizer) -> Updater:
    """A torch optimiser wrapped as a TorchUpdater; an Updater as it is."""
    return TorchUpdater(optimizer) if isinstance(optimizer, torch.optim.Optimizer) else optimizer


def adam(params: Iterable[Tensor], lr: float, betas: Iterable[float]) -> torch.optim.Adam:
    """The reference optimiser for both levels (METHODS.md §2)."""
    b1, b2 = betas
    return torch.optim.Adam(params, lr=lr, betas=(b1, b2))


class EMA:
    """Exponential moving average of a module's floating-point parameters:
    ema ← decay · ema + (1 − decay) · θ after every applied step (decay = 0: off)."""

    def __init__(self, module: nn.Module, decay: float):
        self.decay = decay
        self.shadow = {n: p.detach().clone() for n, p in module.named_parameters()} if decay > 0 else {}

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        for n, p in module.named_parameters():
            if n in self.shadow:
                self.shadow[n].lerp_(p.detach(), 1 - self.decay)

    def state_dict(self) -> dict[str, Tensor]:
        return dict(self.shadow)

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        for n, t in state.items():
            self.shadow[n].copy_(t)

    def copy_to(self, module: nn.Module) -> None:
        """Write the averaged weights into `module` (for sampling or export)."""
        with torch.no_grad():
            for n, p in module.named_parameters():
                if n in self.shadow:
                    p.copy_(self.shadow[n])
