"""Checks that need the name registries: the names a config uses, and how its sections fit.

Reads only the leaf tables of distributed_bism/registry (plain names and ObjectiveSpecs, no
torch), never an implementation. `loading.from_dict` runs `validate` on every section it builds,
right after that section's own `__post_init__`, so bad input fails while loading, as one
ConfigError naming the key.
"""

from __future__ import annotations

from typing import Any

from distributed_bism.config.errors import check
from distributed_bism.config.run_schema import EvalConfig
from distributed_bism.config.schema import MARGINAL_MODELS, Config, ObjectiveConfig
from distributed_bism.registry.datasets import DATASETS
from distributed_bism.registry.metrics import METRICS
from distributed_bism.registry.objectives import OBJECTIVES
from distributed_bism.registry.samplers import SAMPLERS


def validate_objective(cfg: ObjectiveConfig) -> None:
    names = tuple(OBJECTIVES)
    check(cfg.name in OBJECTIVES, "objective.name", f"unknown objective {cfg.name!r}; expected one of {names}")
    spec = OBJECTIVES[cfg.name]
    check(
        spec.unrolls or cfg.unroll_steps == 0,
        "objective.unroll_steps",
        f"{cfg.name} does not unroll (its lower-level steps are warmup_steps); must be 0, got {cfg.unroll_steps}",
    )
    check(
        spec.family != "vages" or cfg.biased_cov or cfg.num_particles >= 2,
        "objective.num_particles",
        f"the unbiased VaGES covariance needs L >= 2 particles, got {cfg.num_particles} (or set objective.biased_cov)",
    )


def validate_eval(cfg: EvalConfig) -> None:
    check(
        cfg.ood_dataset in ("uniform_noise", *DATASETS),
        "eval.ood_dataset",
        f"unknown OOD set {cfg.ood_dataset!r}; expected uniform_noise or one of {', '.join(DATASETS)}",
    )
    for key, names in (("eval.metrics", cfg.metrics), ("eval.final_metrics", cfg.final_metrics)):
        for m in names:
            check(m in METRICS, key, f"unknown metric {m!r}; expected some of {', '.join(sorted(METRICS))}")
    for key, name in [("eval.sampler", cfg.sampler)] + [("eval.compare_samplers", s) for s in cfg.compare_samplers]:
        check(name in SAMPLERS, key, f"unknown sampler {name!r}; expected one of {', '.join(sorted(SAMPLERS))}")


def _or_list(names: list[str]) -> str:
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"


def validate_config(cfg: Config) -> None:
    """Model, posterior and objective fit together, as the objective's spec says."""
    name, model, posterior = cfg.objective.name, cfg.model.name, cfg.posterior.name
    spec = OBJECTIVES[name]  # validate_objective has checked the name
    # A single-level method needs the exact free energy: a GRBM's, or a marginal energy E(v) (the
    # plain EBM, which score matching trains; CD needs the GRBM's Gibbs sampler too).
    free_energy = spec.energy == "free_energy"
    check(
        spec.bilevel or model == "grbm" or (free_energy and model in MARGINAL_MODELS),
        "objective.name",
        f"{name} needs the exact free energy of model.name=grbm"
        + (f" or a marginal energy ({', '.join(MARGINAL_MODELS)})" if free_energy else "")
        + f", got model.name={model}",
    )
    # SGLD moves h continuously, which binary latents (a Bernoulli posterior) do not allow.
    check(
        cfg.objective.sgld_steps == 0 or posterior != "bernoulli",
        "objective.sgld_steps",
        f"SGLD refinement needs continuous latents; posterior.name=bernoulli has binary h (got {cfg.objective.sgld_steps})",
    )
    # A marginal energy E(v) has no latent: only methods that need no E(v, h) train it.
    check(
        spec.energy != "marginal" or model in MARGINAL_MODELS,
        "model.name",
        f"objective.name={name} needs model.name in {MARGINAL_MODELS}, got model.name={model}",
    )
    no_latent = [n for n, s in OBJECTIVES.items() if s.energy in ("marginal", "free_energy")]
    check(
        name in no_latent or model not in MARGINAL_MODELS,
        "model.name",
        f"model.name={model} has no latent: train it with {_or_list(no_latent)}, got objective.name={name}",
    )
    # A posterior a method brings with it (BiDVL's encoder-decoder): both or neither.
    owner = name if spec.posterior else next((n for n, s in OBJECTIVES.items() if s.posterior == posterior), None)
    if owner is not None:
        needed = OBJECTIVES[owner].posterior
        check(
            name == owner and posterior == needed,
            "posterior.name",
            f"objective.name={owner} needs posterior.name={needed}, and that posterior needs {owner}; "
            f"got objective.name={name}, posterior.name={posterior}",
        )


def validate(section: Any) -> None:
    """The registry checks of `section` (any config dataclass; those without any pass)."""
    if isinstance(section, ObjectiveConfig):
        validate_objective(section)
    elif isinstance(section, EvalConfig):
        validate_eval(section)
    elif isinstance(section, Config):
        validate_config(section)


def validate_all(cfg: Config) -> None:
    """Every registry and cross-section check of a whole Config: what `from_dict` runs section by
    section, for a Config built directly in Python (preflight calls it before anything starts)."""
    validate_objective(cfg.objective)
    validate_eval(cfg.eval)
    validate_config(cfg)
