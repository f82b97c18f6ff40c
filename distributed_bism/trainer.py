"""A single-process training loop over the bi-level step.

`TrainLoop` owns the models, their optimisers and the data order; the maths of one iteration
lives in `bilevel.BilevelStep`. The distributed strategies drive the same step.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from distributed_bism.bilevel import BilevelStep, StepOutput, step_from_config
from distributed_bism.config import Config
from distributed_bism.data import load_dataset
from distributed_bism.models import GaussianRBM, build_energy, build_posterior
from distributed_bism.objectives import Objective, get_objective


def exact_test_loglik(energy: nn.Module, data: Tensor, *, batch_size: int = 10_000) -> float:
    """Mean exact log p(v) of a Gaussian RBM over `data` (N, D), by enumerating h."""
    assert isinstance(energy, GaussianRBM), "exact log-likelihood needs a Gaussian RBM"
    with torch.no_grad():
        log_z = energy.log_partition()
        total = sum(energy.log_likelihood(chunk, log_z=log_z).sum().item() for chunk in data.split(batch_size))
    return total / len(data)


def lr_lambda(schedule: str, total: int, base_lr: float, min_lr: float) -> Callable[[int], float]:
    """Multiplier on the base lr at step t: constant, or cosine decay to min_lr over `total` steps."""
    if schedule == "constant":
        return lambda t: 1.0
    floor = min_lr / base_lr
    return lambda t: floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(t, total) / total))


@dataclass
class History:
    """Logged values: step → metric."""

    loss: dict[int, float] = field(default_factory=dict)
    inner_loss: dict[int, float] = field(default_factory=dict)
    test_loglik: dict[int, float] = field(default_factory=dict)


class TrainLoop:
    """Keyword-only training loop: `run_step` = `forward_backward` + optimiser steps."""

    def __init__(self, *, energy: nn.Module, posterior: nn.Module | None, objective: Objective, step: BilevelStep,
                 train_data: Tensor, test_data: Tensor | None, batch_size: int, steps: int,
                 optimizer: torch.optim.Optimizer, posterior_optimizer: torch.optim.Optimizer | None,
                 schedulers: list[torch.optim.lr_scheduler.LRScheduler] | None = None,
                 log_every: int = 200, eval_every: int = 1000, seed: int = 0,
                 log: Callable[[str], None] = print):
        self.energy, self.posterior, self.objective, self.step_fn = energy, posterior, objective, step
        self.train_data, self.test_data = train_data, test_data
        self.batch_size, self.steps = batch_size, steps
        self.optimizer, self.posterior_optimizer = optimizer, posterior_optimizer
        self.schedulers = schedulers or []
        self.log_every, self.eval_every, self.log = log_every, eval_every, log
        self.generator = torch.Generator().manual_seed(seed)
        self.step = 0
        self.history = History()
        self._order: list[Tensor] = []

    @classmethod
    def from_config(cls, cfg: Config, *, log: Callable[[str], None] = print) -> TrainLoop:
        """Build data, models, optimisers and the step from a validated Config."""
        torch.manual_seed(cfg.trainer.seed)
        train, test = load_dataset(cfg.data)
        shape = tuple(train.shape[1:])
        energy = build_energy(cfg.model, shape)
        if isinstance(energy, GaussianRBM):
            with torch.no_grad():  # start at the data mean, as the reference does
                energy.b.copy_(train.mean(0))
        objective = get_objective(cfg.objective)
        posterior = build_posterior(cfg.posterior, shape, cfg.model.h_dim) if objective.bilevel else None
        o = cfg.optim
        optimizer = torch.optim.Adam(energy.parameters(), lr=o.lr, betas=tuple(o.betas))
        posterior_optimizer = (torch.optim.Adam(posterior.parameters(), lr=o.posterior_lr, betas=tuple(o.posterior_betas))
                               if posterior is not None else None)
        schedulers = [torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(o.schedule, cfg.trainer.steps, o.lr, o.min_lr))]
        step = step_from_config(objective, cfg.objective, posterior_lr=o.posterior_lr,
                                posterior_betas=tuple(o.posterior_betas))  # type: ignore[arg-type]
        t = cfg.trainer
        return cls(energy=energy, posterior=posterior, objective=objective, step=step, train_data=train,
                   test_data=test, batch_size=t.batch_size, steps=t.steps, optimizer=optimizer,
                   posterior_optimizer=posterior_optimizer, schedulers=schedulers, log_every=t.log_every,
                   eval_every=t.eval_every, seed=t.seed, log=log)

    # ------------------------------------------------------------------ steps
    def next_batch(self) -> Tensor:
        """The next batch of a shuffled pass over the training data (reshuffled each epoch)."""
        if not self._order:
            perm = torch.randperm(len(self.train_data), generator=self.generator)
            self._order = list(perm.split(self.batch_size))
            if len(self._order) > 1 and len(self._order[-1]) < self.batch_size:
                self._order.pop()  # equal batch sizes: the MDSM σ schedule spans the batch
        return self.train_data[self._order.pop(0)]

    def forward_backward(self, v: Tensor) -> StepOutput:
        """One bi-level iteration's losses and θ-gradients (φ's warm-up steps happen inside)."""
        self.optimizer.zero_grad(set_to_none=True)
        return self.step_fn(energy=self.energy, v=v, posterior=self.posterior,
                            posterior_optimizer=self.posterior_optimizer)

    def run_step(self, v: Tensor) -> StepOutput:
        out = self.forward_backward(v)
        self.optimizer.step()
        for s in self.schedulers:
            s.step()
        self.step += 1
        return out

    def evaluate(self) -> dict[str, float]:
        """Exact test log-likelihood for Gaussian RBMs; nothing yet for deep EBLVMs."""
        if isinstance(self.energy, GaussianRBM) and self.test_data is not None:
            ll = exact_test_loglik(self.energy, self.test_data)
            self.history.test_loglik[self.step] = ll
            return {"test_loglik": ll}
        return {}

    def run(self) -> History:
        """Train for `steps` iterations, logging every `log_every` and evaluating every `eval_every`."""
        start = time.perf_counter()
        initial = self.evaluate()
        self.log(f"step 0/{self.steps}" + "".join(f"  {k} {v:.4f}" for k, v in initial.items()))
        while self.step < self.steps:
            out = self.run_step(self.next_batch())
            if not torch.isfinite(out.loss):
                raise FloatingPointError(f"non-finite loss {out.loss.item()} at step {self.step}")
            if self.step % self.log_every == 0 or self.step == self.steps:
                self.history.loss[self.step] = out.loss.item()
                if out.inner_loss is not None:
                    self.history.inner_loss[self.step] = out.inner_loss.item()
                due = self.step % self.eval_every == 0 or self.step == self.steps
                metrics = self.evaluate() if due else {}
                elapsed = time.perf_counter() - start
                eta = elapsed / self.step * (self.steps - self.step)
                inner = "" if out.inner_loss is None else f"  inner {out.inner_loss.item():.4f}"
                extra = "".join(f"  {k} {v:.4f}" for k, v in metrics.items())
                self.log(f"step {self.step}/{self.steps}  loss {out.loss.item():.4f}{inner}{extra}"
                         f"  {self.step / elapsed:.1f} it/s  eta {eta:.0f}s")
        return self.history
