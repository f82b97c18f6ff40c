"""`distributed_bism.train(config)`: checks, then the run on Ray Train (ddp, deepspeed) or in this
process (local).

Everything that can be wrong with the input is checked here, before Ray starts a worker: the
data set, the storage path, the tracking store, an existing run of the same name with a
different set-up, the Ray address, and the workers the cluster can hold. Then the driver opens
the MLflow run, fits, and closes the run as FINISHED or FAILED.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import yaml

from distributed_bism.training.checkpointing import LocalCheckpoints, checkpoint_dir_name
from distributed_bism.config import Config, ConfigError, check_writable_dir
from distributed_bism.data import check_dataset
from distributed_bism.tracking import check_tracking_uri, tracking_uri

RUN_CONFIG_FILE = "bism_config.yaml"
# What must match for a run to continue under the same trainer.name; the rest (steps, logging,
# checkpoint cadence, tracking, address) may change between launches.
FIXED_TRAINER_KEYS = ("strategy", "num_workers", "batch_size", "seed", "ema_decay", "zero_stage", "precision")


# --------------------------------------------------------------------------- checks
def storage_path(cfg: Config) -> str:
    """trainer.storage_path (local path or URI), else <output_dir>/ray_results, made absolute."""
    sp = cfg.trainer.storage_path
    if sp and "://" in sp:
        return sp
    return str(Path(sp or Path(cfg.trainer.output_dir) / "ray_results").expanduser().resolve())


def _math_of(cfg_dict: dict[str, Any]) -> dict[str, Any]:
    keep = {k: v for k, v in cfg_dict.items() if k in ("data", "model", "posterior", "objective", "optim")}
    keep["trainer"] = {k: cfg_dict.get("trainer", {}).get(k) for k in FIXED_TRAINER_KEYS}
    return keep


def check_resume(cfg: Config, run_dir: Path) -> bool:
    """True if run_dir holds an earlier launch of this run. A different set-up under the same name
    is an error naming the first differing key, so one run's checkpoints are never continued
    with another's model or objective."""
    saved_file = run_dir / RUN_CONFIG_FILE
    if not saved_file.is_file():
        return False
    saved = _math_of(yaml.safe_load(saved_file.read_text()) or {})
    now = _math_of(cfg.to_dict())
    for section, values in now.items():
        for key, value in values.items():
            old = saved.get(section, {}).get(key)
            if old != value:
                raise ConfigError(f"{section}.{key}: run {cfg.trainer.name!r} in {run_dir} was started with "
                                  f"{old!r}, now {value!r}; choose a new trainer.name to start a new run")
    return True


def check_address(address: str, *, timeout: float = 3.0) -> None:
    """A TCP connect to host:port of a Ray address, so a wrong address fails in seconds, naming it."""
    scheme, _, hostport = address.rpartition("://")
    if scheme not in ("", "ray"):  # http://...:8265 is the dashboard, where `ray job submit` sends jobs
        raise ConfigError(f"trainer.address: {address!r} is not a Ray cluster address; give the head's host:port "
                          "(port 6379 by default) or ray://host:10001; a dashboard URL is for `ray job submit`")
    hostport = hostport.rstrip("/")
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"trainer.address: {address!r} is not host:port (or ray://host:port)")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            pass
    except OSError as e:
        raise ConfigError(f"trainer.address: no Ray cluster answers at {address} ({e.strerror or e})") from e


def check_batch(cfg: Config) -> None:
    """Every worker needs one full batch of its share of the training set (else each worker
    would fail in ShardedBatches, after Ray started it)."""
    from distributed_bism.data import SPLIT_SIZES
    from distributed_bism.data.synthetic import N_TRAIN_DEFAULT, SYNTHETIC

    d, t = cfg.data, cfg.trainer
    n = d.n_train
    if n is None:
        n = N_TRAIN_DEFAULT if d.name in SYNTHETIC else SPLIT_SIZES.get(d.name, (None,))[0]
    if n is not None and n // t.num_workers < t.batch_size:
        raise ConfigError(f"trainer.batch_size: {t.batch_size} per worker × {t.num_workers} worker(s) needs "
                          f"{t.batch_size * t.num_workers} training examples, {d.name} has {n} (data.n_train)")


def preflight(cfg: Config, address: str | None = None) -> tuple[Config, bool]:
    """Check everything cheap, the Ray address included; returns the config with its run name
    fixed, and whether it resumes. Nothing is written or opened before this passes."""
    check_dataset(cfg.data)
    check_batch(cfg)
    name = cfg.trainer.name or f"{cfg.data.name}-{cfg.objective.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    # Absolute: Ray Train workers run in a directory of their own.
    output_dir = Path(cfg.trainer.output_dir).expanduser().resolve()
    cfg = replace(cfg, trainer=replace(cfg.trainer, name=name, output_dir=str(output_dir)))
    check_writable_dir(output_dir, "trainer.output_dir")
    sp = storage_path(cfg)
    resumed = False
    if "://" not in sp:
        run_dir = Path(sp) / name
        check_writable_dir(Path(sp), "trainer.storage_path")
        resumed = check_resume(cfg, run_dir)
    if cfg.tracking.enabled:
        check_tracking_uri(tracking_uri(cfg))
    if cfg.trainer.precision != "fp32" and cfg.trainer.use_gpu is False:
        raise ConfigError(f"trainer.precision: {cfg.trainer.precision} needs GPUs, but trainer.use_gpu is false")
    if cfg.trainer.strategy != "local":
        address = address or cfg.trainer.address or os.environ.get("RAY_ADDRESS")
        if address and address not in ("auto", "local"):
            check_address(address)
        check_local_cpus(cfg, address)
    return cfg, resumed


def completed_checkpoint(cfg: Config) -> Path | None:
    """The run's final checkpoint if an earlier launch already reached trainer.steps (local
    storage only), so a relaunch can report it without starting Ray."""
    sp = storage_path(cfg)
    if "://" in sp:
        return None
    latest = LocalCheckpoints(Path(sp) / str(cfg.trainer.name), cfg.trainer.num_to_keep).latest()
    if latest is None or int(latest.name.rsplit("_", 1)[1]) < cfg.trainer.steps:
        return None
    return latest


def _record_run(cfg: Config) -> None:
    sp = storage_path(cfg)
    if "://" not in sp:
        run_dir = Path(sp) / str(cfg.trainer.name)
        run_dir.mkdir(parents=True, exist_ok=True)
        if not (run_dir / RUN_CONFIG_FILE).exists():
            (run_dir / RUN_CONFIG_FILE).write_text(cfg.to_yaml())


# --------------------------------------------------------------------------- Ray
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
    local = {"num_cpus": num_cpus, "include_dashboard": True, "dashboard_host": "127.0.0.1", "logging_level": "WARNING"}
    if address == "local":
        ray.init(address="local", **local)
    elif address and address != "auto":
        check_address(address)
        ray.init(address=address, logging_level="WARNING")
    else:
        try:
            ray.init(address="auto", logging_level="WARNING")
        except ConnectionError:
            ray.init(**local)
    try:
        yield ray
    finally:
        ray.shutdown()


def _ray_running_here() -> bool:
    """Whether ray.init(address="auto") would find a cluster on this machine: Ray's own lookup (the
    address file of the last `ray start`, or a running GCS process), no connection made."""
    try:
        from ray._private.services import get_ray_address_from_environment
    except ImportError:  # a private API; if it moved, assume a cluster may be running
        return True
    try:
        return get_ray_address_from_environment("auto", None) is not None
    except ConnectionError:
        return False


def check_local_cpus(cfg: Config, address: str | None) -> None:
    """Before any ray.init: when no address is given ($RAY_ADDRESS unset) and no cluster runs here,
    Ray would start a new local cluster with at most os.cpu_count() CPUs, so CPU workers that need
    more fail now, naming the key, instead of after Ray started. A running cluster may have more
    CPUs than this machine; check_resources checks it once connected."""
    import torch

    t = cfg.trainer
    address = address or os.environ.get("RAY_ADDRESS")
    if address and address != "local":
        return
    if t.use_gpu or (t.use_gpu is None and torch.cuda.is_available()):
        return
    need, have = t.num_workers * t.cpus_per_worker, os.cpu_count() or 1
    if need > have and (address == "local" or not _ray_running_here()):
        raise ConfigError(f"trainer.num_workers: {t.num_workers} workers × {t.cpus_per_worker:g} CPUs need {need:g} "
                          f"CPUs, this machine has {have} (no Ray cluster running here and no address given)")


def check_resources(cfg: Config, ray: Any) -> bool:
    """Whether the workers use GPUs; a clear error if the cluster cannot hold them."""
    t = cfg.trainer
    res = ray.cluster_resources()
    gpus, cpus = int(res.get("GPU", 0)), res.get("CPU", 0)
    use_gpu = (gpus > 0) if t.use_gpu is None else t.use_gpu
    if use_gpu and t.num_workers > gpus:
        raise ConfigError(f"trainer.num_workers: {t.num_workers} GPU workers asked for, the cluster has {gpus} GPUs")
    need = t.num_workers * (0 if use_gpu else t.cpus_per_worker)
    if need > cpus:
        raise ConfigError(f"trainer.num_workers: {t.num_workers} workers × {t.cpus_per_worker} CPUs need {need:g} CPUs, "
                          f"the cluster has {cpus:g}")
    if t.precision != "fp32" and not use_gpu:
        raise ConfigError(f"trainer.precision: {t.precision} needs GPUs and the workers have none; use fp32")
    for name, amount in t.resources_per_worker.items():
        if t.num_workers * amount > res.get(name, 0):
            raise ConfigError(f"trainer.resources_per_worker.{name}: {t.num_workers} workers × {amount:g} need "
                              f"{t.num_workers * amount:g}, the cluster has {res.get(name, 0):g}")
    nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
    if t.placement_strategy == "STRICT_SPREAD" and t.num_workers > nodes:
        raise ConfigError(f"trainer.placement_strategy: STRICT_SPREAD puts each of {t.num_workers} workers on a "
                          f"node of its own, the cluster has {nodes} node(s)")
    return use_gpu


def scaling_config(cfg: Config, use_gpu: bool) -> Any:
    """Ray's ScalingConfig for the workers: trainer.num_workers, each with cpus_per_worker CPUs (or
    one GPU) plus trainer.resources_per_worker, placed by trainer.placement_strategy."""
    from ray.train import ScalingConfig

    t = cfg.trainer
    resources = ({} if use_gpu else {"CPU": t.cpus_per_worker}) | t.resources_per_worker
    return ScalingConfig(num_workers=t.num_workers, use_gpu=use_gpu, resources_per_worker=resources or None,
                         placement_strategy=t.placement_strategy)


def run_on_ray(cfg: Config, worker_fn: Callable[[dict[str, Any]], None], loop_config: dict[str, Any],
               *, address: str | None = None, callbacks: list[Any] | None = None) -> Any:
    """Fit a TorchTrainer running worker_fn(loop_config) on cfg.trainer.num_workers workers."""
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    t = cfg.trainer
    check_local_cpus(cfg, address or t.address)
    with ray_session(address or t.address) as ray:
        use_gpu = check_resources(cfg, ray)
        trainer = TorchTrainer(
            worker_fn, train_loop_config=loop_config,
            torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
            scaling_config=scaling_config(cfg, use_gpu),
            run_config=RunConfig(name=t.name, storage_path=storage_path(cfg), callbacks=callbacks,
                                 failure_config=FailureConfig(max_failures=t.max_failures),
                                 checkpoint_config=CheckpointConfig(num_to_keep=t.num_to_keep),
                                 logging_config=LoggingConfig(log_level="WARNING")))
        return trainer.fit()


# --------------------------------------------------------------------------- sinks
class LocalSink:
    """Checkpoints as checkpoint_XXXXXXXX/ directories under the run directory (local strategy)."""

    def __init__(self, root: Path, num_to_keep: int):
        self.checkpoints = LocalCheckpoints(root, num_to_keep)
        self.last: Path | None = None

    def candidates(self) -> list[Path]:
        return self.checkpoints.all()[::-1]

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None, step: int) -> None:
        if checkpoint_dir is None:
            return
        target = self.checkpoints.directory(step)
        if target.exists():  # never overwrite what was saved
            raise FileExistsError(f"checkpoint {target} already exists")
        shutil.copytree(checkpoint_dir, target)
        self.last = target
        self.checkpoints.prune()


class RaySink:
    """ray.train.report and get_checkpoint. A rank with no files reports no checkpoint.

    Ray registers a reported checkpoint only when its controller next polls (every ~2 s in Ray
    2.60), so a worker killed just after reporting can come back with get_checkpoint() None,
    or an older one, although the files were already written (uploads are synchronous). With
    local storage the run directory is therefore also searched, and the newest wins."""

    def __init__(self, run_dir: Path | None = None) -> None:
        self.run_dir = run_dir
        self._stack = contextlib.ExitStack()

    def candidates(self) -> list[Path]:
        import ray.train

        found = {p.resolve() for p in LocalCheckpoints(self.run_dir, 1).all()} if self.run_dir else set()
        ckpt = ray.train.get_checkpoint()
        if ckpt is not None:
            found.add(Path(self._stack.enter_context(ckpt.as_directory())).resolve())
        return sorted(found, key=lambda p: p.name, reverse=True)  # checkpoint_XXXXXXXX: by step

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None, step: int) -> None:
        import ray.train

        ckpt = None
        if checkpoint_dir is not None and any(checkpoint_dir.iterdir()):
            ckpt = ray.train.Checkpoint.from_directory(str(checkpoint_dir))
        ray.train.report(metrics, checkpoint=ckpt, checkpoint_dir_name=checkpoint_dir_name(step))

