"""Every check of a training run's input, before any worker starts or any MLflow run opens.

The data set and its batch, the output and storage paths, an earlier run of the same name with a
different set-up, the tracking store, GPU precision, the Ray address and the CPUs a new local
cluster would have. Bad input is a `ConfigError` (or `DataError`) naming the key. Also here:
where the run's checkpoints live (`storage_path`, `local_run_dir`), the check for a run that is
already complete, and `record_run`, the one file written before training (the run's config,
which later launches of the same name are compared against).
"""

from __future__ import annotations

import os
import socket
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from distributed_bism.config import Config, ConfigError, check_writable_dir
from distributed_bism.config.loading import read_yaml_file
from distributed_bism.config.validate import validate_all
from distributed_bism.data import check_dataset
from distributed_bism.tracking import check_tracking
from distributed_bism.training.checkpointing import LocalCheckpoints, is_uri

RUN_CONFIG_FILE = "bism_config.yaml"
# What must match for a run to continue under the same trainer.name; the rest (steps, logging,
# checkpoint cadence, tracking, address) may change between launches. Not the number of workers:
# checkpoints resume on any (training/resize.py), so the global batch is compared instead ("batch").
FIXED_TRAINER_KEYS = ("strategy", "seed", "ema_decay", "zero_stage", "precision")


# --------------------------------------------------------------------------- where checkpoints go
def storage_path(cfg: Config) -> str:
    """trainer.storage_path (local path or URI), else <output_dir>/ray_results, made absolute."""
    sp = cfg.trainer.storage_path
    if sp and is_uri(sp):
        return sp
    return str(Path(sp or Path(cfg.trainer.output_dir) / "ray_results").expanduser().resolve())


def local_run_dir(cfg: Config) -> Path | None:
    """<storage_path>/<trainer.name>, where the run's checkpoints and config are; None when the
    storage is a URI (this process cannot look there)."""
    sp = storage_path(cfg)
    return None if is_uri(sp) else Path(sp) / str(cfg.trainer.name)


# --------------------------------------------------------------------------- checks
def preflight(cfg: Config, address: str | None = None) -> tuple[Config, bool]:
    """Check everything cheap, the Ray address included; returns the config with its run name
    fixed, and whether it resumes. Nothing is written or opened before this passes."""
    validate_all(cfg)  # a Config built in Python has not been through from_dict's checks
    check_dataset(cfg.data)
    check_batch(cfg)
    name = cfg.trainer.name or f"{cfg.data.name}-{cfg.objective.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    # Absolute: Ray Train workers run in a directory of their own.
    output_dir = Path(cfg.trainer.output_dir).expanduser().resolve()
    cfg = replace(cfg, trainer=replace(cfg.trainer, name=name, output_dir=str(output_dir)))
    check_writable_dir(output_dir, "trainer.output_dir")
    run_dir = local_run_dir(cfg)
    resumed = False
    if run_dir is not None:
        check_writable_dir(run_dir.parent, "trainer.storage_path")
        resumed = check_resume(cfg, run_dir)
    if cfg.tracking.enabled:
        check_tracking(cfg)
    if cfg.trainer.precision != "fp32" and cfg.trainer.use_gpu is False:
        raise ConfigError(f"trainer.precision: {cfg.trainer.precision} needs GPUs, but trainer.use_gpu is false")
    if cfg.trainer.strategy != "local":
        address = address or cfg.trainer.address or os.environ.get("RAY_ADDRESS")
        if address and address not in ("auto", "local"):
            check_address(address)
        check_local_cpus(cfg, address)
        check_local_gpus(cfg, address)
    check_memory(cfg, address)
    return cfg, resumed


def check_batch(cfg: Config) -> None:
    """Every worker needs one full batch of its share of the training set, at every number of
    workers the run may have (else each worker would fail in ShardedBatches, after Ray started it)."""
    from distributed_bism.data import SPLIT_SIZES
    from distributed_bism.data.synthetic import N_TRAIN_DEFAULT, SYNTHETIC

    d, t = cfg.data, cfg.trainer
    n = d.n_train
    if n is None:
        n = N_TRAIN_DEFAULT if d.name in SYNTHETIC else SPLIT_SIZES.get(d.name, (None,))[0]
    for w in range(t.min_workers, t.max_workers + 1):
        per = t.batch_per_worker(w)
        if n is not None and n // w < per:
            key = "trainer.global_batch_size" if t.global_batch_size is not None else "trainer.batch_size"
            raise ConfigError(
                f"{key}: {per} per worker × {w} worker(s) needs {per * w} training examples, "
                f"{d.name} has {n} (data.n_train)"
            )


def global_batch(trainer: dict[str, Any]) -> int | None:
    """The global batch of a run's trainer section (a config's to_dict(), or an older run's record):
    global_batch_size, else batch_size × num_workers (None for a range without a global batch,
    which the config refuses)."""
    if trainer.get("global_batch_size") is not None:
        return int(trainer["global_batch_size"])
    workers = trainer.get("num_workers", 1)
    return None if isinstance(workers, list) else int(trainer.get("batch_size", 100)) * int(workers)


def _math_of(cfg_dict: dict[str, Any]) -> dict[str, Any]:
    keep = {k: v for k, v in cfg_dict.items() if k in ("data", "model", "posterior", "objective", "optim")}
    trainer = cfg_dict.get("trainer", {})
    keep["trainer"] = {k: trainer.get(k) for k in FIXED_TRAINER_KEYS} | {"global batch": global_batch(trainer)}
    return keep


def check_resume(cfg: Config, run_dir: Path) -> bool:
    """True if run_dir holds an earlier launch of this run. A different set-up under the same name
    is an error naming the first differing key, so one run's checkpoints are never continued
    with another's model or objective."""
    saved_file = run_dir / RUN_CONFIG_FILE
    if not saved_file.is_file():
        return False
    try:
        saved = _math_of(read_yaml_file(saved_file, "trainer.name"))
    except ConfigError as e:  # cut off or edited by hand: say whose record it is
        raise ConfigError(
            f"{e}; it records run {cfg.trainer.name!r}'s set-up: restore it, or choose a new trainer.name"
        ) from e
    now = _math_of(cfg.to_dict())
    for section, values in now.items():
        for key, value in values.items():
            old = saved.get(section, {}).get(key)
            if old != value and key == "global batch":
                raise ConfigError(
                    f"trainer.batch_size: run {cfg.trainer.name!r} in {run_dir} was started with a global batch "
                    f"of {old} rows (batch_size × num_workers, or global_batch_size), now {value}; the number of "
                    "workers may change, the global batch may not (set trainer.global_batch_size="
                    f"{old}), or choose a new trainer.name to start a new run"
                )
            if old != value:
                raise ConfigError(
                    f"{section}.{key}: run {cfg.trainer.name!r} in {run_dir} was started with "
                    f"{old!r}, now {value!r}; choose a new trainer.name to start a new run"
                )
    check_sharded_checkpoint(cfg, run_dir)
    return True


def check_sharded_checkpoint(cfg: Config, run_dir: Path) -> None:
    """A checkpoint written before optimisers were saved whole holds one ZeRO shard per worker
    (optim_rank{r}.pt); only its own number of workers can resume it."""
    latest = LocalCheckpoints(run_dir).latest()
    if latest is None:
        return
    shards = len(list(latest.glob("optim_rank*.pt")))
    if shards and (cfg.trainer.min_workers, cfg.trainer.max_workers) != (shards, shards):
        raise ConfigError(
            f"trainer.num_workers: the newest checkpoint of run {cfg.trainer.name!r} ({latest}) holds one ZeRO "
            f"optimiser shard for each of {shards} workers, from before checkpoints were saved whole; "
            f"resume it with trainer.num_workers={shards} (its next checkpoint resumes on any number)"
        )


def check_address(address: str, *, timeout: float = 3.0) -> None:
    """A TCP connect to host:port of a Ray address, so a wrong address fails in seconds, naming it."""
    scheme, _, hostport = address.rpartition("://")
    if scheme not in ("", "ray"):  # http://...:8265 is the dashboard, where `ray job submit` sends jobs
        raise ConfigError(
            f"trainer.address: {address!r} is not a Ray cluster address; give the head's host:port "
            "(port 6379 by default) or ray://host:10001; a dashboard URL is for `ray job submit`"
        )
    hostport = hostport.rstrip("/")
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"trainer.address: {address!r} is not host:port (or ray://host:port)")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            pass
    except OSError as e:
        raise ConfigError(f"trainer.address: no Ray cluster answers at {address} ({e.strerror or e})") from e


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


def _new_local_cluster(address: str | None) -> bool:
    """Whether Ray would start a new cluster on this machine: the address "local", or none given
    ($RAY_ADDRESS unset) and no cluster running here. Only then can this machine's CPUs, GPUs and
    memory judge the workers before Ray starts."""
    address = address or os.environ.get("RAY_ADDRESS")
    if address and address != "local":
        return False
    return address == "local" or not _ray_running_here()


def check_local_cpus(cfg: Config, address: str | None) -> None:
    """Before any ray.init: when no address is given ($RAY_ADDRESS unset) and no cluster runs here,
    Ray would start a new local cluster with at most os.cpu_count() CPUs, so CPU workers that need
    more fail now, naming the key, instead of after Ray started. A running cluster may have more
    CPUs than this machine; ray_backend.check_resources checks it once connected."""
    import torch

    t = cfg.trainer
    address = address or os.environ.get("RAY_ADDRESS")
    if address and address != "local":
        return
    if t.use_gpu or (t.use_gpu is None and torch.cuda.is_available()):
        return
    need, have = t.min_workers * t.cpus_per_worker, os.cpu_count() or 1
    if need > have and _new_local_cluster(address):
        raise ConfigError(
            f"trainer.num_workers: {t.min_workers} workers × {t.cpus_per_worker:g} CPUs need {need:g} "
            f"CPUs, this machine has {have} (no Ray cluster running here and no address given)"
        )


def check_local_gpus(cfg: Config, address: str | None) -> None:
    """A new local cluster on a machine without GPUs: trainer.use_gpu=true would wait for GPUs
    forever, and bf16/fp16 (DeepSpeed on CUDA only) would fail in every worker, both after the
    MLflow run was opened; refuse them now. Clusters found by address are checked once connected
    (ray_backend.check_resources)."""
    import torch

    t = cfg.trainer
    if not (t.use_gpu or t.precision != "fp32") or not _new_local_cluster(address) or torch.cuda.device_count() > 0:
        return
    where = "this machine has no GPUs, and a new local Ray cluster would start here (no address given, none running)"
    if t.use_gpu:
        raise ConfigError(f"trainer.use_gpu: true, but {where}; set it false, or give trainer.address of a GPU cluster")
    raise ConfigError(
        f"trainer.precision: {t.precision} needs GPUs, but {where}; use fp32, or give trainer.address of a GPU cluster"
    )


def machine_memory() -> int | None:
    """Bytes of memory processes here may use: the physical memory, or the cgroup's limit when
    lower (a container); None when neither can be read."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None
    for limit in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(limit).read_text().strip()
        except OSError:
            continue
        if text.isdigit():
            total = min(total, int(text))
    return total


def _gib(n: float) -> str:
    return f"{n / 2**30:,.1f} GiB"


def memory_floor(cfg: Config) -> list[tuple[str, int, str]]:
    """Lower bounds of what a run holds in this machine's memory at once, as (key, bytes, how):
    the data set in every worker; for CPU workers the K-step unroll's graph, which keeps at least
    a noisy copy of the batch and its gradient for each of the K steps (the model's activations
    come on top); and the largest set of samples an evaluation draws."""
    import torch

    from distributed_bism.data import SPLIT_SIZES, example_values
    from distributed_bism.data.synthetic import N_TEST_DEFAULT, N_TRAIN_DEFAULT

    d, t, o, e = cfg.data, cfg.trainer, cfg.objective, cfg.eval
    values, f32 = example_values(d), 4
    full = SPLIT_SIZES.get(d.name, (N_TRAIN_DEFAULT, N_TEST_DEFAULT))
    n = (d.n_train or full[0]) + (d.n_test or full[1])
    workers = 1 if t.strategy == "local" else t.max_workers
    batch = t.batch_per_worker(t.min_workers)  # the largest per-worker batch the run may have
    gpu = t.strategy != "local" and (t.use_gpu or (t.use_gpu is None and torch.cuda.is_available()))
    terms = [
        (
            "data.n_train",
            workers * n * values * f32,
            f"{workers} worker(s) × {n} examples × {values} values × {f32} bytes for the data set",
        )
    ]
    if o.unroll_steps and not gpu:
        per = o.unroll_steps * batch * o.num_particles * values * f32 * 2
        how = (
            f"{workers} worker(s) × K={o.unroll_steps} unrolled steps × batch {batch} × "
            f"{o.num_particles} particle(s) × {values} values × {f32} bytes × 2 (input and gradient) "
            "for the unroll's graph"
        )
        terms.append(("objective.unroll_steps", workers * per, how))
    key, count = max(
        (
            ("eval.num_samples", e.num_samples),
            ("eval.fid_samples", e.fid_samples),
            ("eval.ais_chains", e.ais_chains + e.raise_chains),
        ),
        key=lambda kv: kv[1],
    )
    terms.append((key, count * values * f32, f"{count} samples × {values} values × {f32} bytes for an evaluation"))
    return terms


def check_memory(cfg: Config, address: str | None) -> None:
    """Refuse a run on this machine whose memory floor (memory_floor) exceeds its memory, naming
    the key of the largest part: past it the run would swap, be killed, or hang in its first step
    while its MLflow run stays RUNNING. Workers on a cluster elsewhere are not judged here."""
    if cfg.trainer.strategy != "local" and not _new_local_cluster(address):
        return
    have = machine_memory()
    if have is None:
        return
    terms = memory_floor(cfg)
    need = sum(b for _, b, _ in terms)
    if need > have:
        key, size, how = max(terms, key=lambda term: term[1])
        raise ConfigError(
            f"{key}: the run needs at least {_gib(need)} of memory, this machine has {_gib(have)}; the "
            f"largest part is {how}: {_gib(size)}. Lower {key}"
        )


# --------------------------------------------------------------------------- after the checks
def completed_checkpoint(cfg: Config) -> Path | None:
    """The run's final checkpoint if an earlier launch already reached trainer.steps (local
    storage only), so a relaunch can report it without starting Ray. That is the newest
    checkpoint that loads: one cut short is passed over (not moved; the training launch that
    follows renames it *.unreadable and retrains from the one before)."""
    run_dir = local_run_dir(cfg)
    if run_dir is None:
        return None
    latest = LocalCheckpoints(run_dir).newest_readable()
    if latest is None or int(latest.name.rsplit("_", 1)[1]) < cfg.trainer.steps:
        return None
    return latest


def record_run(cfg: Config) -> None:
    """Write the run's config to <run dir>/bism_config.yaml at its first launch (local storage
    only): what check_resume compares a later launch of the same name against."""
    run_dir = local_run_dir(cfg)
    if run_dir is None:
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    if not (run_dir / RUN_CONFIG_FILE).exists():
        (run_dir / RUN_CONFIG_FILE).write_text(cfg.to_yaml())
