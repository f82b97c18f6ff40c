"""The product's main job: `train(config)`, the same from Python and from `bism train`.

Top to bottom, as `train` reads:

    config          a Config, a nested dict or a YAML path, validated
    preflight       every input check, before any worker starts or any run opens (launch/preflight.py)
    complete?       a relaunch of a run that already reached trainer.steps reports it and stops
    open the run    MLflow, on the driver; continued when the name resumes
    train           strategy=local: one TrainLoop here (launch/local.py);
                    ddp / deepspeed: one per Ray Train worker (launch/ray_backend.py)
    close the run   FINISHED, or FAILED if training raised, or KILLED on SIGTERM / Ctrl-C (then the
                    driver exits 128 + the signal number, saying how to resume: launch/signals.py)
    summary         a TrainSummary, also printed
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distributed_bism.config import Config, from_dict, load_config
from distributed_bism.launch.local import print_line, train_local
from distributed_bism.launch.preflight import completed_checkpoint, local_run_dir, preflight, record_run, storage_path
from distributed_bism.launch.ray_backend import train_on_ray
from distributed_bism.launch.signals import Interrupted, deferred, stop_by_request, stop_on_signals, unwinding
from distributed_bism.mlflow_ui import run_page_url
from distributed_bism.tracking import close_run, experiment_of, open_run, register_model, tracking_uri
from distributed_bism.training.checkpointing import LocalCheckpoints, load_state


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
    registered: str | None = None  # models:/NAME/VERSION of the final model (tracking.registered_model_name)


def train(cfg: Config | dict[str, Any] | str | Path, *, address: str | None = None) -> TrainSummary:
    """Train as `cfg` (a Config, a nested dict, or a YAML path) says: check the input, open the
    MLflow run, run the strategy, close the run. Running again with the same trainer.name
    continues the run from its latest checkpoint."""
    if isinstance(cfg, dict):
        config = from_dict(Config, cfg)
    elif isinstance(cfg, Config):
        config = cfg
    else:
        config = load_config(cfg)
    cfg, resumed = preflight(config, address)
    t = cfg.trainer
    print_line("resolved config:\n" + cfg.to_yaml())
    uri = tracking_uri(cfg) if cfg.tracking.enabled else None
    done = completed_checkpoint(cfg) if resumed else None
    if done is not None:
        return _already_complete(cfg, done, uri)

    print_line(f"run {t.name!r}: " + ("continuing from its latest checkpoint" if resumed else "new run"))
    run_id = None
    with stop_on_signals():  # SIGTERM / Ctrl-C: Interrupted, and the run is closed as KILLED
        try:
            if uri:
                with deferred():  # a run created is a run closed
                    run_id, continued = open_run(cfg, str(t.name))
                print_line(f"MLflow run {run_id} ({'continued' if continued else 'new'}) in {uri}")
            record_run(cfg)
            start = time.perf_counter()
            if t.strategy == "local":
                out, checkpoint = train_local(cfg, run_id, uri)
            else:
                with stop_by_request():  # a signal aborts Ray Train's controller, then stops the driver
                    out, checkpoint = train_on_ray(cfg, run_id, uri, address=address)
        except Interrupted as stop:  # the workers are stopped by now (launch/signals.py)
            if run_id:
                close_run(cfg, run_id, failed=True, ended_by=stop.name)
            sys.stderr.write(f"bism: {resume_hint(cfg, stop, run_id)}\n")
            raise
        except BaseException:
            unwinding()
            if run_id:
                close_run(cfg, run_id, failed=True)
            raise
        if run_id:
            with deferred():
                close_run(cfg, run_id, failed=False, checkpoint=checkpoint)
    registered = register_model(cfg, run_id) if run_id else None  # a finished run's model only

    summary = TrainSummary(
        name=str(t.name),
        step=int(out.get("step", t.steps)),
        seconds=time.perf_counter() - start,
        run_id=run_id,
        tracking_uri=uri,
        checkpoint=checkpoint,
        samples=out.get("samples_path"),
        metrics=out,
        registered=f"models:/{registered[0]}/{registered[1]}" if registered else None,
    )
    print_line(describe(summary))
    return summary


def resume_hint(cfg: Config, stop: Interrupted, run_id: str | None) -> str:
    """One line for a run stopped by a signal: what was closed, and that the same command resumes
    it from its latest checkpoint (named, when the storage is local)."""
    name = str(cfg.trainer.name)
    closed = f"MLflow run {run_id} closed as KILLED; " if run_id else ""
    run_dir = local_run_dir(cfg)
    if run_dir is None:
        where = f"continues from its latest checkpoint in {storage_path(cfg)}"
    else:
        latest = LocalCheckpoints(run_dir).newest_readable()
        where = (
            f"continues from its latest checkpoint, {latest} (step {int(latest.name.rsplit('_', 1)[1])})"
            if latest
            else "starts again from step 0 (no checkpoint was saved yet)"
        )
    return (
        f"stopped by {stop.name}: {closed}to resume, run the same command again (with "
        f"trainer.name={name} if it does not set it): it {where}"
    )


def _already_complete(cfg: Config, checkpoint: Path, uri: str | None) -> TrainSummary:
    """A relaunch of a finished run: report what it left, start nothing, write nothing."""
    state = load_state(checkpoint)
    name = str(cfg.trainer.name)
    print_line(
        f"run {name!r} is already complete at step {state['step']}: nothing to train. To train again, give "
        "it a new name (trainer.name=...), or more steps (trainer.steps=...) to continue it"
    )
    grids = sorted((Path(cfg.trainer.output_dir) / "samples" / name).glob("step_*.png"))
    summary = TrainSummary(
        name=name,
        step=int(state["step"]),
        seconds=0.0,
        run_id=state["mlflow_run_id"],
        tracking_uri=uri,
        checkpoint=str(checkpoint),
        samples=str(grids[-1]) if grids else None,
        metrics={},
    )
    print_line(describe(summary))
    return summary


def judged(metrics: dict[str, Any]) -> list[str]:
    """The last evaluation's sample quality and learning signals beside the figures that judge them
    (held-out data and noise), one line each; [] when the run measured none of them."""
    m, lines = metrics, []
    if "eval/classifier_fid" in m:
        model = [
            f"{v:.1f} for {k.removeprefix('eval/classifier_fid_')} samples"
            for k, v in m.items()
            if k.startswith("eval/classifier_fid_")
            and k not in ("eval/classifier_fid_held_out", "eval/classifier_fid_noise")
        ]
        lines.append(
            f"classifier-FID {m['eval/classifier_fid']:.1f}"
            + "".join(f", {x}" for x in model)
            + f"  (lower is better; held-out data {m.get('eval/classifier_fid_held_out', float('nan')):.1f}, "
            f"uniform noise {m.get('eval/classifier_fid_noise', float('nan')):.1f})"
        )
    if "eval/denoise_gain" in m:
        lines.append(
            f"denoise gain {m['eval/denoise_gain']:.3f}  (1 − error of the score's one-step denoiser / "
            "error of the noisy input: 0 = a zero score, 1 = perfect, < 0 = pointing away from the data)"
        )
    if "eval/energy_gap" in m:
        lines.append(
            f"energy gap {m['eval/energy_gap']:.1f}  (mean energy of uniform noise − of held-out data: "
            "> 0 = noise is less likely than data)"
        )
    return lines


def describe(s: TrainSummary) -> str:
    """The closing lines of a run: where it stopped, its judged results, and where its files are."""
    lines = [f"done: run {s.name!r} at step {s.step} ({s.seconds:.0f} s)"]
    lines += [f"result: {line}" for line in judged(s.metrics)]
    if s.samples:
        lines.append(f"sample grid (its title names the sampler, eval.sampler): {s.samples}")
    if s.checkpoint:
        lines.append(f"last checkpoint: {s.checkpoint}")
    if s.registered:
        lines.append(f"registered model: {s.registered}  (bism eval {s.registered})")
    if s.run_id:
        lines.append(f"MLflow run id: {s.run_id}")
        mlflow = Path(sys.executable).parent / "mlflow"  # the venv's, which need not be on PATH
        lines.append(
            f"open it with:  {mlflow if mlflow.exists() else 'mlflow'} ui --backend-store-uri "
            f"'{s.tracking_uri}' --host 127.0.0.1 --port 5000"
        )
        if s.tracking_uri and (experiment_id := experiment_of(s.tracking_uri, s.run_id)):
            # with the training view's query: without it MLflow 3.17 shows its GenAI view (mlflow_ui.py)
            lines.append(f"then:  {run_page_url('http://127.0.0.1:5000', experiment_id, s.run_id, 'model-metrics')}")
    return "\n".join(lines)
