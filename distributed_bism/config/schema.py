"""The config sections: one dataclass per component, composed into `Config`: keys, types, ranges.

A LEAF: nothing here imports the rest of the package (config.errors only) or torch, so a bare
`Config()` is cheap. Checks of one section's values live in its `__post_init__`; checks against
the name registries (data sets, samplers, metrics, objectives) and of how the model, posterior and
objective fit together are in validate.py, which loading runs on every section it builds.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import yaml

from distributed_bism.config.errors import check, check_values
from distributed_bism.config.limits import (
    MAX_EXAMPLES,
    MAX_INNER_STEPS,
    check_count,
)
from distributed_bism.config.run_schema import EvalConfig, TrackingConfig, TrainerConfig


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
    h_dim: int = 4  # H: latent units (grbm: hidden units; conv: the latent code's width)
    # grbm: how W, b, c start. reference: the reference implementation's (nn.Linear's default,
    # U(−1/√H, 1/√H) for W, b and c); small: W ~ N(0, init_std²), b = c = 0 (a symmetric saddle)
    init: str = "reference"
    init_std: float | None = None  # grbm, init=small only: std of the initial W (None: 0.01)
    b_init: str = "init"  # grbm: visible bias b as `init` draws it, or data_mean (the training set's mean)
    ch: int = 64  # conv: base width
    blocks_per_stage: int = 1  # conv, marginal_conv: extra residual blocks per resolution stage
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
    channels: list[int] = field(default_factory=lambda: [64, 128, 256])  # gaussian, conv encoder: widths per stage
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
    sigma_begin: float = 0.05  # (Bi)MDSM schedule: the smallest σ
    sigma_end: float = 1.2  # (Bi)MDSM schedule: the largest σ
    sigma_schedule: str = "linear"  # linear | geometric
    sigma0: float = 0.1  # (Bi)MDSM target scale
    lower_level: str = "kl"  # kl | fisher
    warmup_steps: int = 5  # N: persistent lower-level steps per iteration
    unroll_steps: int = 0  # K: differentiable lower-level steps per iteration
    unroll_optimizer: str = "adam"  # sgd | adam
    unroll_lr: float | None = None  # None: the posterior optimiser's lr
    num_particles: int = 1  # posterior particles per example (VaES/VaGES: L per particle set)
    cd_steps: int = 1  # (P)CD: Gibbs sweeps per iteration
    # Not the reference estimator: one noise draw for all inner steps of an iteration, so f(ṽ)
    # is computed once. Cheaper unrolling, more correlated inner steps.
    share_inner_noise: bool = False
    # Exact batching of the inner passes (core/bilevel.py): f at the N warm-up and at the K unrolled
    # inputs is computed in stacked calls of at most this many input elements (examples × C·H·W).
    # None: by device, all stacked on a GPU, at most 32768 on a CPU (larger stacks measured slower
    # there, bench/README.md); 0: one call per input. The numbers are the same either way.
    inner_pass_elements: int | None = None
    # Recompute each unrolled step in the backward pass instead of keeping its activations:
    # memory about flat in K, for about one more forward per unrolled step. Same hypergradient.
    unroll_checkpoint: bool = False
    # BiDVL (Kan et al. 2022; METHODS.md §4). Upper level E(v) − E(P(ĥ)), or its hinge form
    # relu(m + E(v)) + relu(m − E(P(ĥ))); lower level E(P(ĥ)) + w·mean_j(μ_Q(P(ĥ)) − ĥ)_j²
    # + λ·(‖v − P(h)‖² + KL(Q(h|v) ‖ N(0, I))). N = warmup_steps lower-level steps per upper
    # step; K = unroll_steps differentiates the upper level through the lower one.
    bidvl_lambda: float = 0.05  # λ, weight of the VAE terms (the reference's lamb_vae)
    bidvl_latent_weight: float = 1.0  # w, weight of the latent reconstruction
    bidvl_hinge: bool = False  # the hinge upper level (the reference's ResNet recipe)
    bidvl_hinge_margin: float = 1.0  # m, the hinge's margin
    # VaES / VaGES (vages_dsm, vages_mdsm, vages_ksd; Bao et al. 2021, METHODS.md §3). L =
    # num_particles per particle set (3 independent sets: VaES, E[∂θ∇v log p̃], Cov); the paper's
    # K lower-level steps are warmup_steps, and unroll_steps must be 0.
    biased_cov: bool = False  # drop the L/(L−1) correction of the covariance term (then L = 1 is allowed)
    ksd_bandwidth: float = 0.1  # vages_ksd: RBF kernel exp(−‖x−y‖²/(2h²)), h in data units
    sgld_steps: int = 0  # SGLD refinement of q's particles, h ← h − ½α∇_h E + σξ; 0: off
    sgld_step_size: float = 1e-2  # α, the SGLD step size
    sgld_noise: float | None = None  # σ; None: √α (Langevin)

    def __post_init__(self) -> None:
        check_values(self, "objective.")
        check(self.ksd_bandwidth > 0, "objective.ksd_bandwidth", f"must be > 0, got {self.ksd_bandwidth}")
        check(
            self.inner_pass_elements is None or self.inner_pass_elements >= 0,
            "objective.inner_pass_elements",
            f"must be >= 0 (0: one call per input; null: by device), got {self.inner_pass_elements}",
        )
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
    lr: float = 1e-3  # Adam learning rate of θ (the energy)
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # Adam (β1, β2) of θ
    posterior_lr: float = 1e-3  # Adam learning rate of φ (the posterior)
    posterior_betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # Adam (β1, β2) of φ
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
