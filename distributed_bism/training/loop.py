"""The training loop one worker runs, whatever the strategy.

`TrainLoop` owns one worker's `Replica` (models and updaters, see strategies.py), its shard of
the data and the schedule of logging, evaluation and checkpoints. The maths of an iteration is
`bilevel.BilevelStep`; where checkpoints go is a `CheckpointSink` (Ray's report, or local
directories), so this file has no Ray in it and runs in one process for tests and debugging.

Every rank runs the same sequence of collectives: the loss average at log steps, the RNG
gather at checkpoints, the skip decision of each optimiser step, and the metrics split across
ranks at evaluations (AIS, classifier-FID/KID, FID). Only rank 0 logs, runs the other metrics
and writes files.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from distributed_bism.config import Config
from distributed_bism.core.bilevel import BilevelStep, StepOutput, step_from_config
from distributed_bism.data.prepare import prepare_data
from distributed_bism.data.sharding import ShardedBatches
from distributed_bism.distributed import all_ranks_agree_each, broadcast_object, mean_over_ranks
from distributed_bism.evaluation.metrics import EvalContext, run_metrics
from distributed_bism.evaluation.progress import log_loglik_curve
from distributed_bism.models import GaussianRBM, unwrap
from distributed_bism.models.build import build_models
from distributed_bism.objectives import Objective, get_objective
from distributed_bism.tracking import RunLogger
from distributed_bism.training.checkpointing import (
    CheckpointError,
    CheckpointSink,
    NoCheckpoints,
    agreed_write,
    all_finite,
    load_state,
    save_state,
)
from distributed_bism.training.export import export_model, log_model
from distributed_bism.training.loop_state import loop_state, restore
from distributed_bism.training.optim import EMA, LRSchedule
from distributed_bism.training.preemption import Notice, PreemptionCheck
from distributed_bism.training.replica import Replica, build_replica
from distributed_bism.training.resize import RANK_SEED_STRIDE

PROGRESS_EVERY_S = 5.0  # a progress line at least this often, whatever log_every is


@dataclass
class History:
    """Logged values: step → metric (rank 0)."""

    loss: dict[int, float] = field(default_factory=dict)
    test_loglik: dict[int, float] = field(default_factory=dict)
    samples: dict[int, str] = field(default_factory=dict)


class TrainLoop:
    """Keyword-only training loop: `run_step` = `forward_backward` + optimiser steps; `save`/`load`;
    `fit` = `resume`, `run` to trainer.steps, `export` of the final model."""

    def __init__(
        self,
        *,
        cfg: Config,
        replica: Replica,
        objective: Objective,
        step: BilevelStep,
        batches: ShardedBatches,
        test_data: Tensor | None,
        sink: CheckpointSink | None = None,
        logger: RunLogger | None = None,
        run_id: str | None = None,
        image_shape: tuple[int, ...] | None = None,
        log: Callable[[str], None] = print,
        preemption: Notice | None = None,
    ):
        self.cfg, self.replica, self.objective, self.step_fn = cfg, replica, objective, step
        self.batches, self.test_data = batches, test_data
        self.sink = sink or NoCheckpoints()
        self.logger = logger or RunLogger(None, None)
        self.run_id = run_id
        self.preemption = PreemptionCheck(preemption)  # the just-in-time checkpoint (training/preemption.py)
        self.preemption_due = False  # agreed by the last run_step
        self.rank, self.world_size = replica.rank, replica.world_size
        self.log = log if self.rank == 0 else (lambda s: None)
        self.ema = EMA(unwrap(replica.energy), cfg.trainer.ema_decay)
        o, t = cfg.optim, cfg.trainer
        self.schedules = (
            LRSchedule(o.lr, o.schedule, t.steps, o.min_lr, o.warmup_steps),
            LRSchedule(o.posterior_lr, o.schedule, t.steps, o.min_lr, o.warmup_steps),
        )
        self.step, self.bad_steps = 0, 0
        self.history = History()
        self.eval_notes: set[str] = set()  # notes of skipped metrics already printed
        self.last_eval: dict[str, float] = {}  # the newest evaluation's eval/* values (rank 0)
        # what a sample is drawn as: (C, H, W) even when a GRBM sees flat vectors
        self.image_shape = image_shape or tuple(batches.data.shape[1:])

    @classmethod
    def from_config(
        cls, cfg: Config, *, rank: int = 0, world_size: int = 1, device: torch.device | None = None, **kwargs: Any
    ) -> TrainLoop:
        """Build data, models, updaters and the step from a validated Config. All ranks build the
        same initial weights from trainer.seed, then draw their own noise from seed and rank."""
        device = device or torch.device("cpu")
        torch.manual_seed(cfg.trainer.seed)
        data = prepare_data(cfg)  # a GRBM sees flat vectors; samples are drawn as data.image_shape
        objective = get_objective(cfg.objective)
        energy, posterior = build_models(cfg, data.input_shape, with_posterior=objective.bilevel)
        if isinstance(energy, GaussianRBM) and cfg.model.b_init == "data_mean":
            with torch.no_grad():  # opt-in; the reference draws b with W (model.init=reference)
                energy.b.copy_(data.train.mean(0))
        replica = build_replica(cfg, energy, posterior, rank=rank, world_size=world_size, device=device)
        step = step_from_config(
            objective,
            cfg.objective,
            posterior_lr=cfg.optim.posterior_lr,
            posterior_betas=(cfg.optim.posterior_betas[0], cfg.optim.posterior_betas[1]),  # two: config checks it
        )
        batches = ShardedBatches(
            data.train.to(device),
            cfg.trainer.batch_per_worker(world_size),  # global_batch_size ÷ world_size, else batch_size
            rank=rank,
            world_size=world_size,
            seed=cfg.trainer.seed,
        )
        torch.manual_seed(cfg.trainer.seed + RANK_SEED_STRIDE * rank)
        return cls(
            cfg=cfg,
            replica=replica,
            objective=objective,
            step=step,
            batches=batches,
            test_data=data.test.to(device),
            image_shape=data.image_shape,
            **kwargs,
        )

    # ------------------------------------------------------------------ one iteration
    def forward_backward(self, v: Tensor) -> StepOutput:
        """One bi-level iteration: φ's warm-up steps, then dJ/dθ (averaged over ranks) in θ's .grad."""
        r = self.replica
        r.energy_updater.zero_grad()
        # DeepSpeed bf16/fp16 engines hold low-precision weights: feed them data of their dtype.
        dtype = next(unwrap(r.energy).parameters()).dtype
        return self.step_fn(
            energy=r.energy,
            v=v.to(dtype) if v.is_floating_point() else v,
            posterior=r.posterior,
            posterior_optimizer=r.posterior_updater,
            energy_updater=r.energy_updater,
        )

    def run_step(self, v: Tensor) -> StepOutput:
        """Schedules, forward_backward, θ's step (skipped on every rank if any rank's loss or
        gradient is non-finite), EMA; sets `preemption_due`. Raises after more than
        trainer.max_bad_steps skips."""
        r = self.replica
        r.energy_updater.set_lr(self.schedules[0].at(self.step))
        if r.posterior_updater is not None:
            r.posterior_updater.set_lr(self.schedules[1].at(self.step))
        out = self.forward_backward(v)
        # One collective decides both: skip θ's step if any rank's gradient is non-finite, and
        # checkpoint now if any rank heard of a preemption.
        vote = self.preemption.vote()
        agreed = all_ranks_agree_each([r.energy_updater.finite()] + ([] if vote is None else [vote]))
        self.preemption_due = vote is not None and self.preemption.settle(agreed[1])
        if r.energy_updater.apply(agreed[0]):
            self.ema.update(unwrap(r.energy))
        else:
            self.bad_steps += 1
            limit = self.cfg.trainer.max_bad_steps
            self.log(
                f"step {self.step + 1}: non-finite loss or gradient on some rank; step skipped "
                f"({self.bad_steps} of at most {limit})"
            )
            if self.bad_steps > limit:
                raise FloatingPointError(
                    f"training stopped: {self.bad_steps} non-finite steps by step {self.step + 1} "
                    f"(trainer.max_bad_steps={limit}); lower optim.lr or check the data"
                )
        self.step += 1
        return out

    # ------------------------------------------------------------------ checkpoints
    def state(self) -> dict[str, Any]:
        """The checkpoint dict (loop_state.py); a collective: every rank must call it."""
        return loop_state(self)

    def save(self, directory: Path) -> None:
        """Write a checkpoint into `directory` (rank 0: state.pt, every optimiser whole, ZeRO's
        included, so that any number of workers can resume it). Every rank refuses together when
        any weight is non-finite."""
        r = self.replica
        weights = [unwrap(r.energy).state_dict(), self.ema.state_dict()]
        if r.posterior is not None:
            weights.append(unwrap(r.posterior).state_dict())
        if not all(all_finite(w) for w in weights):
            raise FloatingPointError(f"refusing to write a checkpoint at step {self.step}: non-finite weights")
        state = self.state()
        if self.rank == 0:
            save_state(directory, state)

    def load(self, directory: Path) -> None:
        """Restore everything `save` wrote, on this run's number of workers whatever the number
        that wrote it (loop_state.restore)."""
        restore(self, load_state(directory), directory)

    def checkpoint(self, metrics: dict[str, Any]) -> None:
        """Save into a fresh directory and hand it to the sink (every rank). A write that fails
        (no space, no permission) on any rank raises CheckpointWriteError on every rank at the
        same point (`agreed_write`), so no rank waits in a collective for one that gave up."""
        tmp: Path | None = None
        try:
            tmp = agreed_write(self.step, lambda: Path(tempfile.mkdtemp(prefix="bism_ckpt_")), tempfile.gettempdir())
            agreed_write(self.step, lambda: self.save(tmp), tmp)
            agreed_write(self.step, lambda: self.sink.report(metrics, tmp, self.step), tmp)
        finally:
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
        if self.rank == 0 and self.cfg.tracking.log_checkpoint_models:
            log_model(self, "checkpoint")

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, *, final: bool = False) -> dict[str, float]:
        """eval.metrics at this step (evaluation/metrics.py), and eval.final_metrics too when `final`
        (the last step). Every rank calls it: the metrics declared for all ranks (AIS,
        classifier-FID/KID, FID: each rank draws and featurises its share of the samples, and the
        results are reduced) run on every rank, the others on rank 0, which logs eval/* to MLflow
        and redraws the log-likelihood curve; meanwhile the other ranks wait at their next
        collective, for at most trainer.collective_timeout_s. Samplers use their own generators,
        so an evaluation leaves the training RNG as it was."""
        r = self.replica
        ctx = EvalContext(
            cfg=self.cfg,
            energy=unwrap(r.energy),
            posterior=unwrap(r.posterior) if r.posterior is not None else None,
            train_data=self.batches.data,
            test_data=self.test_data,
            image_shape=self.image_shape,
            step=self.step,
            device=r.device,
            rank=self.rank,
            world_size=self.world_size,
            output_dir=Path(self.cfg.trainer.output_dir).resolve(),
            logger=self.logger if self.rank == 0 else None,
        )
        e = self.cfg.eval
        metrics = run_metrics(e.metrics + ([m for m in e.final_metrics if m not in e.metrics] if final else []), ctx)
        if self.rank != 0:
            return {}
        for note in ctx.notes:  # a skipped metric is said once, never silently dropped
            if note not in self.eval_notes:
                self.eval_notes.add(note)
                self.log(f"step {self.step} eval: {note}")
        if "samples" in ctx.artifacts:
            self.history.samples[self.step] = str(ctx.artifacts["samples"])
        if metrics:
            self.logger.metrics(metrics, self.step)
            self.last_eval = metrics
        if "eval/test_loglik" in metrics:
            self.history.test_loglik[self.step] = metrics["eval/test_loglik"]
            log_loglik_curve(ctx, self.history.test_loglik)
        return metrics

    # ------------------------------------------------------------------ the run
    def _log_metrics(self, out: StepOutput, window: tuple[int, float]) -> dict[str, float]:
        """Loss averaged over ranks (a collective), grad norms, lrs, throughput since `window`."""
        steps0, t0 = window
        r = self.replica
        dt = max(time.perf_counter() - t0, 1e-9)
        m = {
            "train/loss": mean_over_ranks(out.loss.item()),
            "train/grad_norm_theta": r.energy_updater.grad_norm(),
            "train/lr": self.schedules[0].at(self.step),
            "train/perf/s_per_step": dt / max(self.step - steps0, 1),
            "train/perf/samples_per_s": (self.step - steps0) * self.batches.batch_size * self.world_size / dt,
            "train/perf/num_workers": float(self.world_size),  # an elastic run's size over time
        }
        if out.inner_loss is not None:
            m["train/inner_loss"] = mean_over_ranks(out.inner_loss.item())
        if r.posterior_updater is not None:
            m["train/grad_norm_phi"] = r.posterior_updater.grad_norm()
            m["train/posterior_lr"] = self.schedules[1].at(self.step)
        self.history.loss[self.step] = m["train/loss"]
        return m

    def _print_eval(self, evaluated: dict[str, float]) -> None:
        if evaluated:
            self.log(
                f"step {self.step} eval: " + "  ".join(f"{k.split('/')[-1]} {v:.4g}" for k, v in evaluated.items())
            )

    def resume(self) -> bool:
        """Load the newest readable checkpoint of the sink, if any (under Ray: of Ray's own list
        first, so that URI storage resumes too; launch/ray_backend.RaySink). Rank 0 chooses and
        every rank loads the same one (`sink.local`: its own copy where rank 0's is out of reach);
        one cut short by a crash is set aside (locally renamed *.unreadable: kept, never
        overwritten by the retrained step, never counted by retention) and the next older one is
        tried. A candidate that no longer exists (Ray may still list one moved aside) is passed over."""
        choice: str | None = None
        if self.rank == 0:
            for candidate in self.sink.candidates():
                if not candidate.is_dir():
                    continue
                try:
                    load_state(candidate)
                except CheckpointError as e:
                    self.log(f"skipping unreadable checkpoint ({e}); {self.sink.set_aside(candidate)}")
                    continue
                choice = str(candidate)
                break
        choice = broadcast_object(choice)
        if choice is None:
            return False
        directory = self.sink.local(Path(choice))
        self.load(directory)
        self.sink.resumed(directory)
        self.log(f"resumed from {choice} at step {self.step}")
        return True

    def run(self) -> History:
        """Train to trainer.steps: progress lines, metrics every log_every, evaluation every
        eval.every, checkpoints every checkpoint_every, at the end, and at the step after any rank
        heard of a preemption (`preemption`)."""
        t = self.cfg.trainer
        if self.step == 0:
            self._print_eval(self.evaluate())
        start_step, start = self.step, time.perf_counter()
        window, last_print = (self.step, start), start
        while self.step < t.steps:
            out = self.run_step(self.batches(self.step))
            now = time.perf_counter()
            s, at_end = self.step, self.step == t.steps
            logging = s % t.log_interval == 0 or at_end
            just_in_time = self.preemption_due  # agreed in run_step
            ckpt = s % t.checkpoint_every == 0 or at_end or just_in_time
            if just_in_time:
                self.log(
                    f"step {s}: a node of the run is being preempted: checkpoint now, then train on until the workers are restarted"
                )
            metrics = self._log_metrics(out, window) if (logging or ckpt) else {}
            if metrics:
                self.logger.metrics(metrics, s)
            if self.rank == 0 and (logging or now - last_print >= PROGRESS_EVERY_S):
                done = s - start_step
                eta = (now - start) / done * (t.steps - s)
                rate = done * self.batches.batch_size * self.world_size / (now - start)
                self.log(
                    f"step {s}/{t.steps}  loss {out.loss.item():.4f}"
                    + ("" if out.inner_loss is None else f"  inner {out.inner_loss.item():.4f}")
                    + f"  {rate:.0f} samples/s  eta {eta:.0f}s"
                )
                last_print = now
            evaluating = s % self.cfg.eval.every == 0 or at_end
            if evaluating:
                evaluated = self.evaluate(final=at_end)
                self._print_eval(evaluated)
                metrics.update(evaluated)
            # Ray hears of the run at checkpoints and evaluations only (a sweep's scheduler decides
            # on those): each ray.train.report is a barrier that can wait up to ~2 s for the
            # controller (Ray 2.60), while MLflow gets metrics every log step.
            if ckpt:  # a sweep's scheduler needs its metric in every report: the newest evaluation's, just in time
                carried = self.last_eval if just_in_time else {}
                self.checkpoint({**carried, **metrics, "step": s, "samples_path": self.history.samples.get(s)})
            elif evaluating:
                self.sink.report({**metrics, "step": s}, None, s)
            if metrics:  # the next throughput window starts after evaluation and checkpointing
                window = (s, time.perf_counter())
        return self.history

    def fit(self) -> dict[str, Any]:
        """The whole job of a worker: resume from the sink's newest checkpoint, train to
        trainer.steps, then (rank 0) export the final model. Returns the last evaluation's eval/*
        values, the step, and the newest sample grid ("samples_path", None if none was drawn)."""
        t = self.cfg.trainer
        self.resume()
        if self.rank == 0:
            self.logger.skip_logged_steps()  # a relaunch logs no step twice
        if self.step >= t.steps:
            self.log(
                f"run {t.name!r} is already complete at step {self.step}: nothing to train. To train again, "
                f"give it a new name (trainer.name=...), or more steps (trainer.steps=...) to continue it"
            )
        per = self.batches.batch_size
        self.log(
            f"{self.world_size} worker(s) × batch {per} = global batch {per * self.world_size}"
            + (" (trainer.global_batch_size)" if t.global_batch_size is not None else "")
            + (f", workers {t.min_workers}-{t.max_workers} (elastic)" if t.elastic else "")
            + f"; strategy {t.strategy}; steps {self.step} → {t.steps}"
        )
        start = self.step
        self.run()
        if self.rank == 0:
            export_model(self, trained=self.step > start)
        samples = self.history.samples
        return {**self.last_eval, "step": self.step, "samples_path": samples[max(samples)] if samples else None}
