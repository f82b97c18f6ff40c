"""Typed configuration: one dataclass per component, composed into `Config`.

Configs load from YAML or dicts and take dotted overrides (`objective.unroll_steps=5`). Unknown
keys and wrong types raise `ConfigError` naming the offending key; value checks live in each
component's `__post_init__`, so a `Config` that exists is valid.

    errors.py     ConfigError, check, check_writable_dir
    sections.py   DataConfig ... EvalConfig, Config, and the names each key accepts
    loading.py    coerce, from_dict, apply_overrides, load_config
"""

from distributed_bism.config.errors import ConfigError, check, check_writable_dir
from distributed_bism.config.loading import apply_overrides, coerce, from_dict, load_config
from distributed_bism.config.sections import (
    BILEVEL_OBJECTIVES,
    MARGINAL_MODELS,
    MODELS,
    OBJECTIVES,
    PLACEMENT_STRATEGIES,
    POSTERIORS,
    PRECISIONS,
    SINGLE_LEVEL_OBJECTIVES,
    STRATEGIES,
    VAGES_OBJECTIVES,
    Config,
    DataConfig,
    EvalConfig,
    ModelConfig,
    ObjectiveConfig,
    OptimConfig,
    PosteriorConfig,
    TrackingConfig,
    TrainerConfig,
)

__all__ = [
    "BILEVEL_OBJECTIVES", "MARGINAL_MODELS", "MODELS", "OBJECTIVES", "PLACEMENT_STRATEGIES", "POSTERIORS", "PRECISIONS",
    "SINGLE_LEVEL_OBJECTIVES", "STRATEGIES", "VAGES_OBJECTIVES", "Config", "ConfigError", "DataConfig", "EvalConfig",
    "ModelConfig", "ObjectiveConfig", "OptimConfig", "PosteriorConfig", "TrackingConfig", "TrainerConfig",
    "apply_overrides", "check", "check_writable_dir", "coerce", "from_dict", "load_config",
]
