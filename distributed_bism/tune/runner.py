"""`bism tune SPEC.yaml`: a Ray Tune sweep whose trials are ordinary training runs.

The pattern that works on Ray 2.60 (docs/stack.md): each trial is a tiny driver function (0.01 CPU)
that builds the trial's Config and fits a TorchTrainer through the same `run_on_ray` and
`worker_main` as `bism train`, with `TuneReportCallback` forwarding the workers' reports (one
per evaluation and per checkpoint) to Tune, so ASHA can stop a trial early.

Every trial is a named training run under <output_dir>/sweeps/<sweep>/: a rerun of the sweep
(Tuner.restore) keeps finished trials, and an unfinished trial resumes from its own latest
checkpoint because its trainer.name is the same. MLflow: one parent run per sweep, one child
run per trial (tag mlflow.parentRunId), both found again by name when the sweep resumes.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

from distributed_bism.tune.spec import SweepSpec
from distributed_bism.tune.trials import DRIVER_CPU, SweepContext, SweepResult, trial_config


def trial_driver(params: dict[str, Any], ctx: SweepContext) -> None:
    """One trial: a child MLflow run and a TorchTrainer whose reports reach Tune."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from distributed_bism.launch.ray_backend import run_on_ray, worker_main
    from distributed_bism.tracking import close_run, open_run, tracking_uri

    trial = ray.tune.get_context().get_trial_id()
    cfg = trial_config(ctx, params, f"{ctx.sweep}-{trial}")
    uri = tracking_uri(cfg) if cfg.tracking.enabled else None
    run_id = None
    if uri:
        run_id, _ = open_run(cfg, str(cfg.trainer.name), parent_run_id=ctx.parent_run_id)
    run_on_ray(
        cfg,
        worker_main,
        {"config": cfg.to_dict(), "run_id": run_id, "tracking_uri": uri},
        callbacks=[TuneReportCallback()],
    )
    # Only a trial that ran to its end closes its run here. One stopped early by the scheduler is
    # interrupted like one that failed, so the sweep's driver closes those, knowing which is which.
    if run_id:
        close_run(cfg, run_id, failed=False)


def _scheduler(spec: SweepSpec) -> Any:
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    s = spec.scheduler
    if s.name == "fifo":
        return FIFOScheduler()
    kwargs: dict[str, Any] = {
        "grace_period": s.grace_period,
        "reduction_factor": s.reduction_factor,
        "time_attr": "training_iteration",
    }
    if s.max_t is not None:
        kwargs["max_t"] = s.max_t
    return ASHAScheduler(**kwargs)


def sweep_name(spec: SweepSpec, name: str | None) -> str:
    return name or spec.name


def run_sweep(
    spec: SweepSpec, *, name: str | None = None, output_dir: str = "outputs", address: str | None = None
) -> SweepResult:
    """Run (or resume) the sweep: checks first, then the parent MLflow run, then Tune."""
    import ray.tune
    from ray.tune import TuneConfig, Tuner

    from distributed_bism.launch.preflight import preflight
    from distributed_bism.launch.ray_backend import ray_session
    from distributed_bism.tracking import close_children, close_run, open_run, tracking_uri
    from distributed_bism.tune.report import write_results

    sweep = sweep_name(spec, name)
    out = Path(output_dir).expanduser().resolve()
    sweep_dir = out / "sweeps" / sweep
    # Every input check of a training run, on one representative trial, before Ray starts.
    probe = trial_config(SweepContext(spec, sweep, str(sweep_dir), None), spec.representative(), f"{sweep}-check")
    preflight(dataclasses.replace(probe, trainer=dataclasses.replace(probe.trainer, num_workers=1)), address)
    base = dataclasses.replace(probe, trainer=dataclasses.replace(probe.trainer, output_dir=str(out)))
    uri = tracking_uri(base) if base.tracking.enabled else None
    parent = None
    if uri:
        parent, resumed = open_run(
            base,
            f"sweep:{sweep}",
            params={"sweep": sweep, "spec": spec.name},
            artifact=(spec.to_yaml(), "sweep_spec.yaml"),
        )
        print(f"MLflow parent run {parent} ({'continued' if resumed else 'new'}) in {uri}", flush=True)
    ctx = SweepContext(spec, sweep, str(sweep_dir), parent, uri)
    trainable = ray.tune.with_resources(ray.tune.with_parameters(trial_driver, ctx=ctx), {"cpu": DRIVER_CPU})
    tune_dir = sweep_dir / "tune"
    # Tune records finished trials in its experiment state at most every 10 s by default; a driver
    # killed in between re-runs them on resume. The state is small: write it every 2 s.
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "2")
    failed = True
    try:
        with ray_session(address):
            if Tuner.can_restore(str(tune_dir / sweep)):
                print(f"resuming sweep {sweep!r} from {tune_dir / sweep}", flush=True)
                tuner = Tuner.restore(
                    str(tune_dir / sweep),
                    trainable,
                    resume_unfinished=True,
                    resume_errored=False,
                    param_space=spec.param_space(),
                )
            else:
                tuner = Tuner(
                    trainable,
                    param_space=spec.param_space(),
                    tune_config=TuneConfig(
                        metric=spec.metric,
                        mode=spec.mode,
                        scheduler=_scheduler(spec),
                        search_alg=spec.build_searcher(),
                        num_samples=spec.num_samples,
                        max_concurrent_trials=spec.max_concurrent_trials,
                    ),
                    run_config=ray.tune.RunConfig(
                        name=sweep, storage_path=str(tune_dir), failure_config=ray.tune.FailureConfig(max_failures=0)
                    ),
                )
            grid = tuner.fit()
        if parent:
            # ResultGrid iterates through __getitem__/__len__ (the sequence protocol); Ray declares no __iter__.
            errored = [Path(r.path).name for r in grid if r.error and r.path]  # type: ignore[attr-defined]
            close_children(base, parent, lambda run_name: any(run_name.removeprefix(f"{sweep}-") in d for d in errored))
        result = write_results(spec, sweep, sweep_dir, grid, ctx, parent_uri=uri)
        failed = False
        return result
    finally:
        if parent:
            close_run(base, parent, failed=failed)
