"""strategy=ddp / deepspeed: the run on Ray Train.

The driver connects to (or starts) a Ray cluster, checks it can hold the workers, and fits a
TorchTrainer whose workers each run `worker_main`: this rank's TrainLoop, checkpointing through
`RaySink` (ray.train.report). Ray is imported only inside functions, so the input checks
(preflight.py) run and fail before Ray is loaded; the training loop itself never imports Ray.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast

import torch

from distributed_bism.config import Config, ConfigError, from_dict
from distributed_bism.launch.local import print_line, worker_threads
from distributed_bism.launch.preemption import RayPreemptionNotice, failure_config
from distributed_bism.launch.preflight import check_address, check_local_cpus, local_run_dir, storage_path
from distributed_bism.launch.signals import handling, on_stop, reinstall
from distributed_bism.tracking import RunLogger, system_metrics
from distributed_bism.training.checkpointing import (
    CheckpointError,
    CheckpointWriteError,
    LocalCheckpoints,
    Retention,
    checkpoint_dir_name,
    move_aside,
    write_error,
)
from distributed_bism.training.loop import TrainLoop


def train_on_ray(
    cfg: Config, run_id: str | None, uri: str | None, *, address: str | None = None
) -> tuple[dict[str, Any], str | None]:
    """Fit the run on trainer.num_workers Ray Train workers; returns what rank 0's `TrainLoop.fit`
    returned and the newest checkpoint's path.

    Not Ray's latest report and checkpoint: Ray registers a report only when its controller next
    polls, so after a group restart its latest can be an older checkpoint than the final one the
    workers wrote (and the restarted workers, finding the run complete, report nothing). With
    local storage the newest checkpoint on disk is the run's; with a URI, Ray's."""
    result = run_on_ray(
        cfg, worker_main, {"config": cfg.to_dict(), "run_id": run_id, "tracking_uri": uri}, address=address
    )
    out = result.return_value if isinstance(result.return_value, dict) else dict(result.metrics or {})
    checkpoint = result.checkpoint.path if result.checkpoint else None
    run_dir = local_run_dir(cfg)
    latest = LocalCheckpoints(run_dir).latest() if run_dir is not None else None
    return out, str(latest) if latest is not None else checkpoint


WRITE_ERROR = "checkpoint_write_error"  # the key of worker_main's return value when a write failed


# --------------------------------------------------------------------------- the driver
@contextlib.contextmanager
def ray_session(address: str | None, *, num_cpus: int | None = None) -> Iterator[Any]:
    """Connect to the cluster at `address` (or $RAY_ADDRESS, or one already running here), else
    start a local one with the dashboard on 127.0.0.1 (Tune hangs without it, STACK.md). The
    address "local" always starts a new local cluster, even when one is running here. Shuts
    down only what this process started or connected."""
    import ray

    if ray.is_initialized():
        yield ray
        return
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")  # progress lines look alike; do not fold them
    address = address or os.environ.get("RAY_ADDRESS")

    def start_local(address: str | None) -> None:
        ray.init(
            address=address,
            num_cpus=num_cpus,
            include_dashboard=True,
            dashboard_host="127.0.0.1",
            logging_level=logging.WARNING,
        )

    if address == "local":
        start_local("local")
    elif address and address != "auto":
        check_address(address)
        ray.init(address=address, logging_level=logging.WARNING)
    else:
        try:
            ray.init(address="auto", logging_level=logging.WARNING)
        except ConnectionError:
            start_local(None)
    reinstall()  # ray.init set SIGTERM to sys.exit(15); the driver's handler closes the run as KILLED
    try:
        yield ray
    finally:
        ray.shutdown()


def check_resources(cfg: Config, ray: Any) -> bool:
    """Whether the workers use GPUs; a clear error if the cluster cannot hold them: trainer.num_workers,
    or for an elastic run its minimum (Ray starts it on as many as fit, up to the maximum)."""
    t = cfg.trainer
    n = t.min_workers
    workers = f"{n} workers" + (f" (the least of trainer.num_workers {t.num_workers})" if t.elastic else "")
    res = ray.cluster_resources()
    gpus, cpus = int(res.get("GPU", 0)), res.get("CPU", 0)
    use_gpu = (gpus > 0) if t.use_gpu is None else t.use_gpu
    if use_gpu and n > gpus:
        raise ConfigError(f"trainer.num_workers: {workers} on GPUs asked for, the cluster has {gpus} GPUs")
    need = n * (0 if use_gpu else t.cpus_per_worker)
    if need > cpus:
        raise ConfigError(
            f"trainer.num_workers: {workers} × {t.cpus_per_worker} CPUs need {need:g} CPUs, the cluster has {cpus:g}"
        )
    if t.precision != "fp32" and not use_gpu:
        raise ConfigError(f"trainer.precision: {t.precision} needs GPUs and the workers have none; use fp32")
    for name, amount in t.resources_per_worker.items():
        if n * amount > res.get(name, 0):
            raise ConfigError(
                f"trainer.resources_per_worker.{name}: {workers} × {amount:g} need "
                f"{n * amount:g}, the cluster has {res.get(name, 0):g}"
            )
    nodes = sum(1 for node in ray.nodes() if node.get("Alive"))
    if t.placement_strategy == "STRICT_SPREAD" and n > nodes:
        raise ConfigError(
            f"trainer.placement_strategy: STRICT_SPREAD puts each of {workers} on a "
            f"node of its own, the cluster has {nodes} node(s)"
        )
    return use_gpu


def scaling_config(cfg: Config, use_gpu: bool) -> Any:
    """Ray's ScalingConfig for the workers: trainer.num_workers (a range: Ray's elastic
    (min, max), resized every trainer.elastic_resize_interval_s at most), each with
    cpus_per_worker CPUs (or one GPU) plus trainer.resources_per_worker, placed by
    trainer.placement_strategy."""
    from ray.train.v2.api.config import ScalingConfig  # what ray.train exports (V2); its stubs say V1

    t = cfg.trainer
    resources = ({} if use_gpu else {"CPU": t.cpus_per_worker}) | t.resources_per_worker
    return ScalingConfig(
        num_workers=t.worker_range if t.elastic else t.min_workers,
        use_gpu=use_gpu,
        resources_per_worker=resources or None,
        placement_strategy=t.placement_strategy,
        elastic_resize_monitor_interval_s=t.elastic_resize_interval_s,
    )


def torch_config(cfg: Config, use_gpu: bool) -> Any:
    """Ray's TorchConfig for the workers' process group: nccl on GPUs, gloo otherwise, and a
    collective timeout of trainer.collective_timeout_s (torch's default, 30 min, is shorter than
    an evaluation of 10k samples; evaluation holds every rank at its next collective)."""
    from ray.train.torch import TorchConfig

    return TorchConfig(backend="nccl" if use_gpu else "gloo", timeout_s=cfg.trainer.collective_timeout_s)


def run_on_ray(
    cfg: Config,
    worker_fn: Callable[[dict[str, Any]], Any],
    loop_config: dict[str, Any],
    *,
    address: str | None = None,
    callbacks: list[Any] | None = None,
) -> Any:
    """Fit a TorchTrainer running worker_fn(loop_config) on cfg.trainer.num_workers workers (a
    range: elastic, each new group resuming from the newest checkpoint, TrainLoop.resume); raises
    the CheckpointWriteError a worker_main returned."""
    # Train V2's own modules: the objects ray.train exports at runtime, typed as such (ray.train's
    # static types are V1's, which lack logging_config, return_value and the SIGINT hook)
    from ray.train.v2.api.config import CheckpointConfig, LoggingConfig, RunConfig
    from ray.train.v2.api.result import Result
    from ray.train.v2.torch.torch_trainer import TorchTrainer

    t = cfg.trainer
    check_local_cpus(cfg, address or t.address)
    run_dir = local_run_dir(cfg)
    if run_dir is not None:
        forget_ray_checkpoints(run_dir)
    with ray_session(address or t.address) as ray:
        use_gpu = check_resources(cfg, ray)
        trainer = TorchTrainer(
            worker_fn,
            train_loop_config=loop_config,
            torch_config=torch_config(cfg, use_gpu),
            scaling_config=scaling_config(cfg, use_gpu),
            run_config=RunConfig(
                name=t.name,
                storage_path=storage_path(cfg),
                callbacks=callbacks,
                failure_config=failure_config(t),  # failures and preemptions counted apart (preemption.py)
                # local storage: Ray keeps every checkpoint, `Retention` prunes (RaySink)
                checkpoint_config=CheckpointConfig(num_to_keep=None if run_dir else t.num_to_keep),
                logging_config=LoggingConfig(log_level="WARNING"),
            ),
        )
        if handling():  # not Ray Train's Ctrl-C handler (it exits 0): the driver's aborts the same way
            # a private Ray 2.60 hook, replaced on this instance only
            setattr(trainer, "_register_sigint_handler", lambda controller: on_stop(controller.abort.remote))  # noqa: B010
        result = cast(Result, trainer.fit())  # fit() is annotated with V1's Result
    returned = result.return_value if isinstance(result.return_value, dict) else {}
    if returned.get(WRITE_ERROR):  # every rank stopped together (worker_main); bism train and tune trials raise it
        raise CheckpointWriteError(returned[WRITE_ERROR])
    return result


RAY_SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train 2.60's list of the checkpoints it was reported


def forget_ray_checkpoints(run_dir: Path) -> None:
    """Remove Ray's own list of the run's checkpoints before a launch (local storage only).

    The run's checkpoints are what is on disk: `TrainLoop.resume` moves unreadable ones aside and
    `Retention` prunes, neither of which Ray hears of. Ray would otherwise reload a list naming
    directories that are gone, and refuse to start (CheckpointManagerInitializationError) or,
    with its own num_to_keep, delete by that list: a freshly rewritten checkpoint of the same
    name, or a path no longer there (FileNotFoundError at the end of a run). Without the list,
    Ray starts empty and `RaySink.candidates` finds the checkpoints on disk."""
    try:
        (run_dir / RAY_SNAPSHOT).unlink(missing_ok=True)
    except OSError as e:  # the run directory turned read-only since preflight: say so in one line
        raise CheckpointWriteError(f"cannot write to the run directory {run_dir}: {e.strerror or e}") from e


# --------------------------------------------------------------------------- in each worker
def worker_main(loop_config: dict[str, Any]) -> dict[str, Any]:
    """One Ray Train worker: build the loop for this rank and fit it; returns what fit returns
    (Ray hands rank 0's to the driver as Result.return_value). A checkpoint that cannot be
    written stops every rank at the same step (TrainLoop.checkpoint); they return the error
    instead of raising it, so Ray does not restart the group to fail the same way again, and the
    driver raises it (train_on_ray)."""
    import ray.train

    ctx = ray.train.get_context()
    node = ctx.get_node_rank() if ctx.get_local_rank() == 0 else None  # one system monitor per node
    cfg = from_dict(Config, loop_config["config"])
    try:
        with system_metrics(cfg, loop_config["tracking_uri"], loop_config["run_id"], node):
            return worker_loop(loop_config).fit()  # rank 0's return value is the driver's result
    except CheckpointWriteError as e:  # the driver prints it, once
        return {WRITE_ERROR: str(e)}


def worker_loop(loop_config: dict[str, Any]) -> TrainLoop:
    """The TrainLoop of this Ray Train worker's rank, checkpointing through Ray (not yet run).
    loop_config: {"config": the resolved config as a dict, "run_id", "tracking_uri"}."""
    import ray.train
    import ray.train.torch

    cfg = from_dict(Config, loop_config["config"])
    # Ray Train logs every report at INFO (a long line per rank per report); our progress lines say it better.
    context_log = logging.getLogger("ray.train.v2._internal.execution.context")
    context_log.setLevel(logging.WARNING)
    # A failed upload is logged there with a traceback and a guess about deleted temporary files;
    # RaySink turns the error into one line naming the directory, and the run stops with it.
    context_log.addFilter(lambda record: not record.getMessage().startswith("Failed to find local checkpoint"))
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(worker_threads(cfg))  # 1 worker = its own cores, no oversubscription
    logger = RunLogger(loop_config["tracking_uri"], loop_config["run_id"]) if rank == 0 else None
    run_dir = local_run_dir(cfg)
    sink = RaySink(run_dir, Retention(run_dir, cfg.trainer.num_to_keep) if run_dir and rank == 0 else None)
    return TrainLoop.from_config(
        cfg,
        rank=rank,
        world_size=world,
        device=ray.train.torch.get_device(),
        sink=sink,
        logger=logger,
        run_id=loop_config["run_id"],
        log=print_line,
        preemption=RayPreemptionNotice(),  # the just-in-time checkpoint when a node is drained for preemption
    )


RAY_LIST_TIMEOUT_S = 60.0  # how long a worker waits for Ray's list of checkpoints before it scans alone


class RaySink:
    """ray.train.report, and Ray's own list of the run's checkpoints. A rank with no files reports
    no checkpoint.

    Resuming asks Ray first (`ray.train.get_all_reported_checkpoints`, committed checkpoints
    only; `get_checkpoint` where that is unavailable), which works whatever the storage: with
    URI storage (s3://, gs://) there is no directory this process could scan, and each candidate
    is downloaded only when resume reaches it. Ray registers a reported checkpoint only when its
    controller next polls (every ~2 s in Ray 2.60), so a worker killed just after reporting can
    come back to a list without its newest checkpoint although the files were written (uploads
    are synchronous); with local storage the run directory is therefore searched too, and the
    newest wins (and the driver removes Ray's list before each launch: `forget_ray_checkpoints`).
    Rank 0 prunes the run directory by `retention` once Ray has the new checkpoint (Ray's
    num_to_keep is unset for local storage)."""

    def __init__(self, run_dir: Path | None = None, retention: Retention | None = None) -> None:
        self.run_dir, self.retention = run_dir, retention
        self._stack = contextlib.ExitStack()  # downloaded copies, removed when the worker ends

    def reported(self) -> dict[str, Any]:
        """Ray's committed checkpoints of this run by directory name (checkpoint_XXXXXXXX)."""
        import ray.train
        from ray.train.v2.api.report_config import CheckpointConsistencyMode
        from ray.train.v2.api.reported_checkpoint import ReportedCheckpointStatus

        usable = (ReportedCheckpointStatus.COMMITTED, ReportedCheckpointStatus.VALIDATED)
        listed = ray.train.get_all_reported_checkpoints(
            consistency_mode=CheckpointConsistencyMode.COMMITTED, timeout_s=RAY_LIST_TIMEOUT_S
        )
        found = {Path(r.checkpoint.path).name: r.checkpoint for r in listed if r.status in usable}
        latest = ray.train.get_checkpoint()  # the one Ray hands a restarted group, listed or not
        if latest is not None:
            found.setdefault(Path(latest.path).name, latest)
        return found

    def _copy(self, ckpt: Any) -> Path:
        """A directory this process can read `ckpt` from: its own path on local storage, else a
        downloaded copy under the checkpoint's own name (so messages name the step), kept until
        the worker ends."""
        import pyarrow.fs  # type: ignore[import-untyped]  # (Ray's storage layer; no stubs)

        if isinstance(ckpt.filesystem, pyarrow.fs.LocalFileSystem):
            return Path(ckpt.path)
        import tempfile

        root = Path(self._stack.enter_context(tempfile.TemporaryDirectory(prefix="bism_resume_")))
        return Path(ckpt.to_directory(str(root / Path(ckpt.path).name)))

    def candidates(self) -> Iterator[Path]:
        """Checkpoint directories newest first (by name, checkpoint_XXXXXXXX: by step): Ray's
        committed ones and, with local storage, the run directory's. A checkpoint of Ray's on URI
        storage is downloaded when reached; one Ray lists but that is gone locally (moved aside
        since) is passed over."""
        by_name: dict[str, Any] = self.reported()
        if self.run_dir is not None:  # local: the directories themselves, Ray's entries included
            by_name = {n: Path(c.path) for n, c in by_name.items() if Path(c.path).is_dir()}
            by_name |= {p.name: p for p in LocalCheckpoints(self.run_dir).named()}
        for name in sorted(by_name, reverse=True):
            found = by_name[name]
            yield found if isinstance(found, Path) else self._copy(found)

    def local(self, directory: Path) -> Path:
        """The checkpoint rank 0 chose, as this rank can read it: `directory` itself when it is
        here (local or shared storage, or rank 0's node), else this rank's own copy of Ray's
        checkpoint of that name."""
        if directory.is_dir():
            return directory
        reported = self.reported()
        if directory.name not in reported:
            raise CheckpointError(f"checkpoint {directory.name}: neither at {directory} nor in Ray's list of the run")
        return self._copy(reported[directory.name])

    def set_aside(self, directory: Path) -> str:
        """An unreadable candidate: on local storage renamed *.unreadable (kept, never counted or
        overwritten); a downloaded copy is left as it is in the storage."""
        if self.run_dir is not None and directory.resolve().parent == self.run_dir.resolve():
            return f"kept as {move_aside(directory)}"
        return "left as it is in the storage" if self.run_dir is None else f"left at {directory}"

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None, step: int) -> None:
        import ray.train

        ckpt = None
        if checkpoint_dir is not None and any(checkpoint_dir.iterdir()):
            ckpt = ray.train.Checkpoint.from_directory(str(checkpoint_dir))
        name = checkpoint_dir_name(step)
        try:
            ray.train.report(metrics, checkpoint=ckpt, checkpoint_dir_name=name)
        except OSError as e:  # the upload into storage (pyarrow raises OSError subclasses)
            target = self.run_dir / name if self.run_dir else None
            with contextlib.suppress(OSError):
                if target is not None and target.is_dir() and not any(target.iterdir()):
                    target.rmdir()  # Ray made it before the copy failed; nothing of the run is in it
            raise write_error(step, target or name, e) from e
        if checkpoint_dir is not None and self.retention is not None:
            self.retention.saved(step)

    def resumed(self, directory: Path) -> None:
        if self.retention is not None:
            self.retention.resumed(directory)
