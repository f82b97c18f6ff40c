"""The Ray Train worker function of the fault-injection tests (test_fault_injection.py): the
package's own worker_main, with faults injected in the worker process, where a test's
monkeypatch does not reach. What to inject is read from <trainer.output_dir>/fault.json (the
workers' environment is fixed when the test's Ray starts, so it cannot carry it):

    {"kills": [{"step": k, "rank": r}, ...],  # SIGKILL rank r once checkpoint k is written
     "nan_at": s}                              # rank 0's batch of step s is NaN, once

Each fault fires once, whatever Ray restarts: a kill is counted in <output_dir>/kills_done (one
JSON line per kill, with the readable checkpoints at that moment), the NaN batch in
<output_dir>/nan_step.pt (θ, φ, EMA and Adam's state just before and just after that step).
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import Any

SPEC, KILLS_DONE, NAN_RECORD = "fault.json", "kills_done", "nan_step.pt"


def write_spec(output_dir: Path, **spec: Any) -> None:
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / SPEC).write_text(json.dumps(spec))


def kills_done(output_dir: Path) -> list[dict[str, Any]]:
    f = output_dir / KILLS_DONE
    return [json.loads(line) for line in f.read_text().splitlines()] if f.exists() else []


def faulty_worker_main(loop_config: dict[str, Any]) -> Any:
    """ray_backend.worker_main with TrainLoop.checkpoint and TrainLoop.run_step wrapped as the
    spec says (in this worker process only)."""
    import ray.train
    import torch

    from distributed_bism.config import Config, from_dict
    from distributed_bism.launch import ray_backend
    from distributed_bism.launch.preflight import local_run_dir
    from distributed_bism.models import unwrap
    from distributed_bism.training.checkpointing import CheckpointError, LocalCheckpoints, load_state
    from distributed_bism.training.loop import TrainLoop

    cfg = from_dict(Config, loop_config["config"])
    out = Path(cfg.trainer.output_dir)
    spec = json.loads((out / SPEC).read_text()) if (out / SPEC).exists() else {}
    rank = ray.train.get_context().get_world_rank()
    run_dir = local_run_dir(cfg)
    if not hasattr(TrainLoop, "_unfaulted"):  # a process that runs this twice wraps the originals once
        TrainLoop._unfaulted = (TrainLoop.checkpoint, TrainLoop.run_step)  # type: ignore[attr-defined]
    real_checkpoint, real_run_step = TrainLoop._unfaulted  # type: ignore[attr-defined]

    def readable(step: int) -> bool:
        try:
            load_state(run_dir / f"checkpoint_{step:08d}")
            return True
        except CheckpointError:
            return False

    def checkpoint(self: TrainLoop, metrics: dict[str, Any]) -> None:
        real_checkpoint(self, metrics)
        kills, done = spec.get("kills", []), kills_done(out)
        if len(done) < len(kills) and kills[len(done)] == {"step": self.step, "rank": rank}:
            # rank 0 has uploaded when its report returns; another rank waits until the files are whole
            deadline = time.monotonic() + 60
            while not readable(self.step) and time.monotonic() < deadline:
                time.sleep(0.05)
            valid = [p.name for p in LocalCheckpoints(run_dir).all() if readable(int(p.name.split("_")[1]))]
            with (out / KILLS_DONE).open("a") as f:
                f.write(json.dumps({"step": self.step, "rank": rank, "valid": valid}) + "\n")
                f.flush()
                os.fsync(f.fileno())
            os.kill(os.getpid(), signal.SIGKILL)

    def weights(self: TrainLoop) -> dict[str, Any]:
        r = self.replica
        return {
            "energy": {k: v.clone() for k, v in unwrap(r.energy).state_dict().items()},
            "posterior": {k: v.clone() for k, v in unwrap(r.posterior).state_dict().items()},
            "ema": {k: v.clone() for k, v in self.ema.state_dict().items()},
            "energy_optimizer": _clone(r.energy_updater.state_dict()),
        }

    def run_step(self: TrainLoop, v: torch.Tensor) -> Any:
        if rank != 0 or spec.get("nan_at") != self.step + 1 or (out / NAN_RECORD).exists():
            return real_run_step(self, v)
        before = weights(self)
        torch.save({"before": before}, out / NAN_RECORD)  # first: a raise below must not inject twice
        result = real_run_step(self, torch.full_like(v, float("nan")))
        torch.save({"before": before, "after": weights(self), "bad_steps": self.bad_steps}, out / NAN_RECORD)
        return result

    TrainLoop.checkpoint, TrainLoop.run_step = checkpoint, run_step  # type: ignore[method-assign]
    return ray_backend.worker_main(loop_config)


def _clone(x: Any) -> Any:
    import torch

    if isinstance(x, torch.Tensor):
        return x.detach().clone()
    if isinstance(x, dict):
        return {k: _clone(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_clone(v) for v in x]
    return x
