"""Learning-rate schedules, the reference Adam and the EMA of θ (the updaters that step them: updaters.py).

Learning-rate schedules are pure functions of the iteration (`LRSchedule.at(t)`) that the loop
writes into the param groups once per iteration: a DeepSpeed engine would step its own
scheduler at every warm-up step, and a function of t checkpoints as the integer t.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor, nn


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


def adam(params: Iterable[Tensor], lr: float, betas: Iterable[float]) -> torch.optim.Adam:
    """The reference optimiser for both levels (docs/methods.md §2)."""
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
