"""Typed configuration: one dataclass per component, composed into `Config`.

Configs load from YAML or dicts and take dotted overrides (`objective.unroll_steps=5`). Unknown
keys, wrong types, non-finite numbers, counts past schema.py's caps and bad values raise
`ConfigError` naming the offending key: ranges in each section's `__post_init__`, names and
cross-section fit in validate.py, which `from_dict` runs on every section; so a `Config` that
loading returns is valid.

    errors.py     ConfigError, check, check_writable_dir; check_path_name (a name that becomes a
                  directory), check_label (an MLflow name), check_values (every float
                  of a section finite, no NUL in its strings)
    schema.py     DataConfig ... EvalConfig, Config: keys, types, ranges (a leaf: no torch, nothing
                  else from the package)
    validate.py   names against the registries (distributed_bism/registry) and how model,
                  posterior and objective fit, as the objective's spec says
    loading.py    coerce, from_dict (runs both checks), apply_overrides, load_config; read_yaml_file
                  and parse_yaml: YAML read strictly (UTF-8, no duplicate keys, no empty file)
    keys.py       config_keys: every key with its type, default and one-line meaning (the field's
                  own comment, read from the source), for `bism config keys`
"""

from distributed_bism.config.errors import ConfigError, check, check_writable_dir
from distributed_bism.config.loading import apply_overrides, coerce, from_dict, load_config
from distributed_bism.config.run_schema import (
    PLACEMENT_STRATEGIES,
    PRECISIONS,
    STRATEGIES,
    EvalConfig,
    TrackingConfig,
    TrainerConfig,
)
from distributed_bism.config.schema import (
    MARGINAL_MODELS,
    MODELS,
    POSTERIORS,
    Config,
    DataConfig,
    ModelConfig,
    ObjectiveConfig,
    OptimConfig,
    PosteriorConfig,
)
from distributed_bism.config.validate import validate

__all__ = [
    "MARGINAL_MODELS",
    "MODELS",
    "PLACEMENT_STRATEGIES",
    "POSTERIORS",
    "PRECISIONS",
    "STRATEGIES",
    "Config",
    "ConfigError",
    "DataConfig",
    "EvalConfig",
    "ModelConfig",
    "ObjectiveConfig",
    "OptimConfig",
    "PosteriorConfig",
    "TrackingConfig",
    "TrainerConfig",
    "apply_overrides",
    "check",
    "check_writable_dir",
    "coerce",
    "from_dict",
    "load_config",
    "validate",
]
