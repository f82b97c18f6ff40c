"""Updaters: one parameter set's optimiser (θ or φ) as the bi-level step and the loop see it.

The step only calls `zero_grad`, `backward` and `step` on an `Updater`, so the same step runs on a
plain torch optimiser (`TorchUpdater`: local, DDP) or on a DeepSpeed engine (`EngineUpdater`).
`step` skips a non-finite update on every rank together (`distributed.all_ranks_agree`), so the
ranks' weights stay equal.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Protocol

import torch
from torch import Tensor

from distributed_bism.core.unroll import torch_optimizer_state
from distributed_bism.distributed import all_ranks_agree, rank_and_world
from distributed_bism.training.zero_state import full_state, is_full_state, load_full_state, zero_optimizer_state


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
        """Apply the gradient, unless it is non-finite on some rank; True if applied (same on every
        rank). `apply(all_ranks_agree(finite()))`: a collective, and one device sync."""

    def finite(self) -> Tensor:
        """Whether this rank's loss and gradient are finite: a bool tensor on their device (no
        collective, no device sync; `distributed.all_ranks_agree` reads it)."""

    def apply(self, ok: bool) -> bool:
        """Step if `ok` (agreed across ranks by the caller), else drop the gradient; returns ok."""

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
        self._loss_finite: Tensor | None = None  # set by backward, read by finite

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def backward(self, loss: Tensor) -> None:
        self._loss_finite = torch.isfinite(loss.detach()).all()
        if self.touch_all:
            loss = loss + sum(p.sum() for p in self.params) * 0.0
        loss.backward(inputs=self.params)

    def step(self) -> bool:
        return self.apply(all_ranks_agree(self.finite()))

    def finite(self) -> Tensor:
        flags = [torch.isfinite(p.grad).all() for p in self.params if p.grad is not None]
        if self._loss_finite is not None:
            flags.append(self._loss_finite.to(flags[0].device) if flags else self._loss_finite)
        return torch.stack(flags).all() if flags else torch.tensor(True)

    def apply(self, ok: bool) -> bool:
        if not ok:
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


class EngineUpdater:
    """A DeepSpeed engine as an `Updater`. engine.backward reduces the gradient across ranks;
    the skip decision is taken on the loss and all-reduced, since under ZeRO-2 no rank sees
    the whole gradient."""

    def __init__(self, engine: Any, zero_stage: int):
        self.engine, self.zero_stage = engine, zero_stage
        self.params = [p for p in engine.module.parameters() if p.requires_grad]
        self.sharded = zero_stage >= 1
        self._loss_finite = torch.tensor(True)  # set by backward, read by finite

    def zero_grad(self) -> None:
        self.engine.zero_grad()

    def backward(self, loss: Tensor) -> None:
        self._loss_finite = torch.isfinite(loss.detach()).all()
        self.engine.backward(loss)

    def step(self) -> bool:
        return self.apply(all_ranks_agree(self.finite()))

    def finite(self) -> Tensor:
        return self._loss_finite

    def apply(self, ok: bool) -> bool:
        if not ok:
            self.engine.zero_grad()
            return False
        self.engine.step()
        return True

    def set_lr(self, lr: float) -> None:
        for g in self.engine.optimizer.param_groups:
            g["lr"] = lr

    def full_grads(self) -> list[Tensor | None]:
        """The averaged gradient of every parameter, assembled from the shards (a collective). The
        distributed tests compare it with the mean of the single-process gradients (dist_workers.py)."""
        from deepspeed.utils import safe_get_full_grad

        return [safe_get_full_grad(p) for p in self.params]

    def grad_norm(self) -> float:
        norm = self.engine.get_global_grad_norm()  # computed by the last engine.step()
        return float(norm) if norm is not None else 0.0

    def state_dict(self) -> dict[str, Any]:
        """The whole optimiser state. ZeRO ≥ 1: assembled from every rank's partition, the same on
        every rank (`zero_state.full_state`, a collective: every rank calls it), so that any number
        of ranks can load it; stage 0: the engine's own."""
        if self.sharded:
            return full_state(self.engine.optimizer)
        return self.engine.optimizer.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """What `state_dict` returned, on any number of ranks: ZeRO ≥ 1 keeps this rank's partition
        of it (`zero_state.load_full_state`), master weights exactly. Also this rank's own shard as
        checkpoints before elastic runs held it (DeepSpeed's state_dict, same world size only): ZeRO
        wants a list indexed by data-parallel rank, of which only this rank's entry is read."""
        if not self.sharded:
            self.engine.optimizer.load_state_dict(state)
        elif is_full_state(state):
            load_full_state(self.engine.optimizer, state)
        else:
            shards = [state] * rank_and_world()[1]
            self.engine.optimizer.load_state_dict(shards, load_from_fp32_weights=True)

    def optimizer_state(self, params: Mapping[str, Tensor]) -> dict[str, dict]:
        """Adam's per-parameter state by name, so the unrolled Adam continues from it exactly as
        under DDP. Stage 0 keeps it whole on every rank (no communication); ZeRO-1/2 keep each
        rank's partition of it, assembled by `zero_optimizer_state` in one collective."""
        if not self.sharded:
            return torch_optimizer_state(self.engine.optimizer, params)
        return zero_optimizer_state(self.engine.optimizer, params)
