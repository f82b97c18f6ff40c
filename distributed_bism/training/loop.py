"""The training loop one worker runs, whatever the strategy.

`TrainLoop` owns one worker's `Replica` (models and updaters, see strategies.py), its shard of
the data and the schedule of logging, evaluation and checkpoints. The maths of an iteration is
`bilevel.BilevelStep`; where checkpoints go is a `CheckpointSink` (Ray's report, or local
directories), so this file has no Ray in it and runs in one process for tests and debugging.

Every rank runs the same sequence of collectives: the loss average at log steps, the RNG
gather at checkpoints, the skip decision of each optimiser step. Only rank 0 logs, evaluates
and writes files other than its own optimiser shard.
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
from distributed_bism.distributed import broadcast_object, gather_objects, mean_over_ranks
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
    load_file,
    load_state,
    optim_shard_file,
    save_state,
)
from distributed_bism.training.optim import EMA, LRSchedule
from distributed_bism.training.replica import Replica, build_replica, deepspeed_safe_globals

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
    ):
        self.cfg, self.replica, self.objective, self.step_fn = cfg, replica, objective, step
        self.batches, self.test_data = batches, test_data
        self.sink = sink or NoCheckpoints()
        self.logger = logger or RunLogger(None, None)
        self.run_id = run_id
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
            data.train.to(device), cfg.trainer.batch_size, rank=rank, world_size=world_size, seed=cfg.trainer.seed
        )
        torch.manual_seed(cfg.trainer.seed + 1_000_003 * rank)
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
        gradient is non-finite), EMA. Raises after more than trainer.max_bad_steps skips."""
        r = self.replica
        r.energy_updater.set_lr(self.schedules[0].at(self.step))
        if r.posterior_updater is not None:
            r.posterior_updater.set_lr(self.schedules[1].at(self.step))
        out = self.forward_backward(v)
        if r.energy_updater.step():
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
        """The checkpoint dict (see checkpoint.py); a collective: every rank must call it."""
        r = self.replica
        rng = gather_objects(torch.get_rng_state())
        obj = gather_objects(self.objective.state_dict())
        sharded = r.sharded_optimizer
        return {
            "step": self.step,
            "world_size": self.world_size,
            "bad_steps": self.bad_steps,
            "energy": unwrap(r.energy).state_dict(),
            "posterior": unwrap(r.posterior).state_dict() if r.posterior is not None else None,
            "ema": self.ema.state_dict(),
            "energy_optimizer": None if sharded else r.energy_updater.state_dict(),
            "posterior_optimizer": None if sharded or r.posterior_updater is None else r.posterior_updater.state_dict(),
            "rng": rng,
            "objective": obj,
            "config": self.cfg.to_yaml(),
            "mlflow_run_id": self.run_id,
        }

    def save(self, directory: Path) -> None:
        """Write a checkpoint into `directory` (rank 0: state.pt; ZeRO ranks: their optimiser shard).
        Every rank refuses together when any weight is non-finite."""
        r = self.replica
        weights = [unwrap(r.energy).state_dict(), self.ema.state_dict()]
        if r.posterior is not None:
            weights.append(unwrap(r.posterior).state_dict())
        if not all(all_finite(w) for w in weights):
            raise FloatingPointError(f"refusing to write a checkpoint at step {self.step}: non-finite weights")
        state = self.state()
        if r.sharded_optimizer:
            shard = {
                "energy": r.energy_updater.state_dict(),
                "posterior": r.posterior_updater.state_dict() if r.posterior_updater else None,
            }
            torch.save(shard, directory / optim_shard_file(self.rank))
        if self.rank == 0:
            save_state(directory, state)

    def load(self, directory: Path) -> None:
        """Restore everything `save` wrote; RNG streams and PCD chains only when the world size matches."""
        r = self.replica
        state = load_state(directory)
        unwrap(r.energy).load_state_dict(state["energy"])
        if r.posterior is not None:
            unwrap(r.posterior).load_state_dict(state["posterior"])
        self.ema.load_state_dict(state["ema"])
        if r.sharded_optimizer:
            shard = load_file(directory / optim_shard_file(self.rank), safe_globals=deepspeed_safe_globals())
            r.energy_updater.load_state_dict(shard["energy"])
            if r.posterior_updater is not None:
                r.posterior_updater.load_state_dict(shard["posterior"])
        else:
            r.energy_updater.load_state_dict(state["energy_optimizer"])
            if r.posterior_updater is not None:
                r.posterior_updater.load_state_dict(state["posterior_optimizer"])
        self.step, self.bad_steps = state["step"], state["bad_steps"]
        self.run_id = self.run_id or state["mlflow_run_id"]
        if state["world_size"] == self.world_size:
            torch.set_rng_state(state["rng"][self.rank])
            self.objective.load_state_dict(state["objective"][self.rank])
        else:
            self.log(
                f"checkpoint was written by {state['world_size']} workers, resuming on {self.world_size}: "
                "noise streams are re-seeded, so the run is no longer bit-for-bit reproducible"
            )
            torch.manual_seed(self.cfg.trainer.seed + 1_000_003 * self.rank + self.step)

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
            self.log_model("checkpoint")

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, *, final: bool = False) -> dict[str, float]:
        """eval.metrics at this step (evaluation/metrics.py), and eval.final_metrics too when `final`
        (the last step). Every rank calls it: metrics with
        collectives (AIS) run on every rank, the others on rank 0, which logs eval/* to MLflow
        and redraws the log-likelihood curve. Samplers use their own generators, so an
        evaluation leaves the training RNG as it was."""
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
            "train/perf/samples_per_s": (self.step - steps0) * self.cfg.trainer.batch_size * self.world_size / dt,
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
        eval.every, checkpoints every checkpoint_every and at the end."""
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
            ckpt = s % t.checkpoint_every == 0 or at_end
            metrics = self._log_metrics(out, window) if (logging or ckpt) else {}
            if metrics:
                self.logger.metrics(metrics, s)
            if self.rank == 0 and (logging or now - last_print >= PROGRESS_EVERY_S):
                done = s - start_step
                eta = (now - start) / done * (t.steps - s)
                rate = done * t.batch_size * self.world_size / (now - start)
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
            if ckpt:
                self.checkpoint({**metrics, "step": s, "samples_path": self.history.samples.get(s)})
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
        self.log(
            f"{self.world_size} worker(s) × batch {t.batch_size} = global batch {t.batch_size * self.world_size}; "
            f"strategy {t.strategy}; steps {self.step} → {t.steps}"
        )
        start = self.step
        self.run()
        if self.rank == 0:
            self.export(trained=self.step > start)
        samples = self.history.samples
        return {**self.last_eval, "step": self.step, "samples_path": samples[max(samples)] if samples else None}

    def weights(self) -> dict[str, Any]:
        """What a model is, without what only resuming needs (θ's optimiser, RNG streams, PCD
        chains): θ, EMA θ, φ and φ's Adam state (`bism diagnose` continues the unroll from it, as
        training does; None when ZeRO shards it), the step, the config and the MLflow run id.
        Rank 0's; a checkpoint dict (checkpointing.py) in every key it has."""
        r = self.replica
        sharded = r.sharded_optimizer
        return {
            "step": self.step,
            "energy": unwrap(r.energy).state_dict(),
            "ema": self.ema.state_dict(),
            "posterior": unwrap(r.posterior).state_dict() if r.posterior is not None else None,
            "posterior_optimizer": None if sharded or r.posterior_updater is None else r.posterior_updater.state_dict(),
            "config": self.cfg.to_yaml(),
            "mlflow_run_id": self.run_id,
        }

    def log_model(self, kind: str) -> str | None:
        """Rank 0: the weights at this step as an MLflow LoggedModel of the run (tracking.log_model:
        state.pt, loaded with weights_only=True), with the config as its params and this step's
        metrics; `kind` "final" or "checkpoint". Returns its id; None without a run, or when the
        run already holds this model."""
        with tempfile.TemporaryDirectory(prefix="bism_model_") as tmp:
            save_state(tmp, self.weights())
            return self.logger.model(Path(tmp), step=self.step, kind=kind, params=self.cfg.flat())

    def export(self, *, trained: bool) -> Path | None:
        """Rank 0: the final weights (θ, EMA θ, φ) and config as one safe-to-load file,
        <output_dir>/models/<name>/model.pt, and as the run's final MLflow LoggedModel (`log_model`;
        logged once per step, so a relaunch that trained nothing adds none). A relaunch that
        trained nothing (`trained` false) leaves an existing file alone. Returns the path written,
        None when nothing was."""
        self.log_model("final")
        path = Path(self.cfg.trainer.output_dir).resolve() / "models" / str(self.cfg.trainer.name) / "model.pt"
        if path.exists() and not trained:
            return None
        path.parent.mkdir(parents=True, exist_ok=True)
        weights = self.weights()
        torch.save({k: weights[k] for k in ("step", "energy", "ema", "posterior", "config")}, path)
        return path
