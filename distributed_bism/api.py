"""The product's main job: `train(config)`, the same from Python and from `bism train`.

    cfg, resumed = preflight(cfg)          every input check, before any worker exists
    run_id = open_run(...)                 MLflow (driver), continued when the name resumes
    local:      one TrainLoop here         ddp / deepspeed: worker_main on a Ray TorchTrainer
    close_run(FINISHED | FAILED)
"""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distributed_bism.config import Config


@dataclass
class TrainSummary:
    """What a finished run leaves behind."""

    name: str
    step: int
    seconds: float
    run_id: str | None
    tracking_uri: str | None
    checkpoint: str | None
    samples: str | None
    metrics: dict[str, Any]


def _print(msg: str) -> None:
    # Not print(): in Ray Train workers print is patched to log *and* echo, doubling each line.
    sys.stdout.write(msg + "\n")
    sys.stdout.flush()


def _final_model(loop: Any, *, trained: bool) -> None:
    """Rank 0: the final weights (θ, EMA θ, φ) and config as one safe-to-load file, logged to
    MLflow; a relaunch that trained nothing leaves an existing file alone."""
    import torch

    from distributed_bism.models import unwrap

    r = loop.replica
    path = Path(loop.cfg.trainer.output_dir).resolve() / "models" / str(loop.cfg.trainer.name) / "model.pt"
    if path.exists() and not trained:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"step": loop.step, "energy": unwrap(r.energy).state_dict(), "ema": loop.ema.state_dict(),
                "posterior": unwrap(r.posterior).state_dict() if r.posterior is not None else None,
                "config": loop.cfg.to_yaml()}, path)
    loop.logger.artifact(path, "model")


def run_loop(loop: Any) -> dict[str, Any]:
    """Resume if there is a checkpoint, train, and write the final model (rank 0)."""
    t = loop.cfg.trainer
    loop.resume()
    if loop.step >= t.steps:
        loop.log(f"run {t.name!r} is already complete at step {loop.step}: nothing to train. To train again, "
                 f"give it a new name (trainer.name=...), or more steps (trainer.steps=...) to continue it")
    loop.log(f"{loop.world_size} worker(s) × batch {t.batch_size} = global batch {t.batch_size * loop.world_size}; "
             f"strategy {t.strategy}; steps {loop.step} → {t.steps}")
    start = loop.step
    loop.run()
    if loop.rank == 0:
        _final_model(loop, trained=loop.step > start)
    samples = loop.history.samples
    return {**loop.last_eval, "step": loop.step, "samples_path": samples[max(samples)] if samples else None}


def worker_main(loop_config: dict[str, Any]) -> None:
    """One Ray Train worker: build the loop for this rank and run it."""
    run_loop(worker_loop(loop_config))


def worker_loop(loop_config: dict[str, Any]) -> Any:
    """The TrainLoop of this Ray Train worker's rank, checkpointing through Ray (not yet run)."""
    import ray.train
    import ray.train.torch
    import torch

    from distributed_bism.config import from_dict
    from distributed_bism.launch.ray_backend import RaySink
    from distributed_bism.tracking import RunLogger
    from distributed_bism.training.loop import TrainLoop

    cfg = from_dict(Config, loop_config["config"])
    # Ray Train logs every report at INFO (a long line per rank per report); our progress lines say it better.
    logging.getLogger("ray.train.v2._internal.execution.context").setLevel(logging.WARNING)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(worker_threads(cfg))  # 1 worker = its own cores, no oversubscription
    logger = RunLogger(loop_config["tracking_uri"], loop_config["run_id"]) if rank == 0 else None
    return TrainLoop.from_config(cfg, rank=rank, world_size=world, device=ray.train.torch.get_device(),
                                 sink=RaySink(_local_run_dir(cfg)), logger=logger, run_id=loop_config["run_id"], log=_print)


def worker_threads(cfg: Config) -> int:
    """torch threads of one worker: its trainer.cpus_per_worker, at least 1. A process left at torch's
    default uses every core, and on a busy machine that is many times slower than one thread."""
    return max(1, int(cfg.trainer.cpus_per_worker))


def _local_run_dir(cfg: Config) -> Path | None:
    from distributed_bism.launch.ray_backend import storage_path

    sp = storage_path(cfg)
    return None if "://" in sp else Path(sp) / str(cfg.trainer.name)


def _train_local(cfg: Config, run_id: str | None, uri: str | None) -> tuple[dict[str, Any], str | None]:
    import torch

    from distributed_bism.launch.ray_backend import LocalSink, storage_path
    from distributed_bism.tracking import RunLogger
    from distributed_bism.training.loop import TrainLoop

    sink = LocalSink(Path(storage_path(cfg)) / str(cfg.trainer.name), cfg.trainer.num_to_keep)
    loop = TrainLoop.from_config(cfg, sink=sink, logger=RunLogger(uri, run_id), run_id=run_id, log=_print)
    threads = torch.get_num_threads()
    torch.set_num_threads(worker_threads(cfg))  # as a Ray worker would; the caller's setting is restored after
    try:
        out = run_loop(loop)
    finally:
        torch.set_num_threads(threads)
    out.update({k: v for k, v in loop.history.__dict__.items() if k == "test_loglik" and v})
    last = sink.last or sink.checkpoints.latest()
    return out, str(last) if last else None


def train(cfg: Config | dict[str, Any] | str | Path, *, address: str | None = None) -> TrainSummary:
    """Train as `cfg` (a Config, a nested dict, or a YAML path) says: check the input, open the
    MLflow run, run the strategy, close the run. Running again with the same trainer.name
    continues the run from its latest checkpoint."""
    from distributed_bism.config import from_dict, load_config

    if isinstance(cfg, dict):
        cfg = from_dict(Config, cfg)
    elif not isinstance(cfg, Config):
        cfg = load_config(cfg)
    from distributed_bism.launch.ray_backend import _record_run, completed_checkpoint, preflight, run_on_ray
    from distributed_bism.tracking import close_run, open_run, tracking_uri

    cfg, resumed = preflight(cfg, address)
    t = cfg.trainer
    _print("resolved config:\n" + cfg.to_yaml())
    uri = tracking_uri(cfg) if cfg.tracking.enabled else None
    done = completed_checkpoint(cfg) if resumed else None
    if done is not None:
        return _already_complete(cfg, done, uri)
    _print(f"run {t.name!r}: " + ("continuing from its latest checkpoint" if resumed else "new run"))
    run_id = None
    if uri:
        run_id, continued = open_run(cfg, str(t.name))
        _print(f"MLflow run {run_id} ({'continued' if continued else 'new'}) in {uri}")
    _record_run(cfg)
    start = time.perf_counter()
    failed, checkpoint = True, None
    try:
        if t.strategy == "local":
            out, checkpoint = _train_local(cfg, run_id, uri)
        else:
            result = run_on_ray(cfg, worker_main, {"config": cfg.to_dict(), "run_id": run_id, "tracking_uri": uri},
                                address=address)
            out = dict(result.metrics or {})
            checkpoint = result.checkpoint.path if result.checkpoint else None
        failed = False
    finally:
        if run_id:
            close_run(cfg, run_id, failed=failed, checkpoint=checkpoint if not failed else None)
    summary = TrainSummary(name=str(t.name), step=int(out.get("step", t.steps)), seconds=time.perf_counter() - start,
                           run_id=run_id, tracking_uri=uri, checkpoint=checkpoint,
                           samples=out.get("samples_path"), metrics=out)
    _print(describe(summary))
    return summary


def _already_complete(cfg: Config, checkpoint: Path, uri: str | None) -> TrainSummary:
    """A relaunch of a finished run: report what it left, start nothing, write nothing."""
    from distributed_bism.training.checkpointing import load_state

    state = load_state(checkpoint)
    name = str(cfg.trainer.name)
    _print(f"run {name!r} is already complete at step {state['step']}: nothing to train. To train again, give it "
           "a new name (trainer.name=...), or more steps (trainer.steps=...) to continue it")
    grids = sorted((Path(cfg.trainer.output_dir) / "samples" / name).glob("step_*.png"))
    summary = TrainSummary(name=name, step=int(state["step"]), seconds=0.0, run_id=state["mlflow_run_id"],
                           tracking_uri=uri, checkpoint=str(checkpoint), samples=str(grids[-1]) if grids else None,
                           metrics={})
    _print(describe(summary))
    return summary


def judged(metrics: dict[str, Any]) -> list[str]:
    """The last evaluation's sample quality and learning signals beside the figures that judge them
    (held-out data and noise), one line each; [] when the run measured none of them."""
    m, lines = metrics, []
    if "eval/classifier_fid" in m:
        model = [f"{v:.1f} for {k.removeprefix('eval/classifier_fid_')} samples" for k, v in m.items()
                 if k.startswith("eval/classifier_fid_") and k not in ("eval/classifier_fid_held_out",
                                                                       "eval/classifier_fid_noise")]
        lines.append(f"classifier-FID {m['eval/classifier_fid']:.1f}" + "".join(f", {x}" for x in model)
                     + f"  (lower is better; held-out data {m.get('eval/classifier_fid_held_out', float('nan')):.1f}, "
                     f"uniform noise {m.get('eval/classifier_fid_noise', float('nan')):.1f})")
    if "eval/denoise_gain" in m:
        lines.append(f"denoise gain {m['eval/denoise_gain']:.3f}  (1 − error of the score's one-step denoiser / "
                     "error of the noisy input: 0 = a zero score, 1 = perfect, < 0 = pointing away from the data)")
    if "eval/energy_gap" in m:
        lines.append(f"energy gap {m['eval/energy_gap']:.1f}  (mean energy of uniform noise − of held-out data: "
                     "> 0 = noise is less likely than data)")
    return lines


def describe(s: TrainSummary) -> str:
    lines = [f"done: run {s.name!r} at step {s.step} ({s.seconds:.0f} s)"]
    lines += [f"result: {line}" for line in judged(s.metrics)]
    if s.samples:
        lines.append(f"sample grid (its title names the sampler, eval.sampler): {s.samples}")
    if s.checkpoint:
        lines.append(f"last checkpoint: {s.checkpoint}")
    if s.run_id:
        lines.append(f"MLflow run id: {s.run_id}")
        mlflow = Path(sys.executable).parent / "mlflow"  # the venv's, which need not be on PATH
        lines.append(f"open it with:  {mlflow if mlflow.exists() else 'mlflow'} ui --backend-store-uri "
                     f"'{s.tracking_uri}' --host 127.0.0.1 --port 5000")
    return "\n".join(lines)


if __name__ == "__main__":  # pragma: no cover
    sys.exit("use `bism train CONFIG` or distributed_bism.train(config)")
