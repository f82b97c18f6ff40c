"""Sweep definitions: one declarative YAML file per study under tune_spaces/ (examples there).

Keys: base (a training config; a relative path is looked up beside tune_spaces/, where configs/
is, then in the spec's folder, then the working directory), overrides ({SECTION.FIELD:
value} for every trial), search ({SECTION.FIELD: {KIND: ARGS}}), metric, mode, scheduler, searcher,
num_samples, max_concurrent_trials, resources. Domains as in Ray Tune: choice, grid (a non-empty
list); randint [low, high) (integers); uniform, loguniform [low, high); quniform [low, high, q]
(low, high multiples of q; high included). `tune.load.load_spec` checks it all before anything starts,
building every choice and both ends of every range into a Config: a bad value is a one-line
`ConfigError` naming the key.

CLI overrides, `KEY=VALUE` with VALUE parsed as YAML: a top-level key (`num_samples=4`,
`scheduler={name: fifo}`); a field of scheduler/searcher/resources (`scheduler.grace_period=1`);
`overrides.SECTION.FIELD=VALUE`; `search.SECTION.FIELD={KIND: ARGS}` or
`search.SECTION.FIELD.KIND=ARGS` (`search.optim.lr.loguniform=[1e-4,1e-3]`) to replace a key's
domain, `search.SECTION.FIELD=null` to stop searching it. Config keys are always SECTION.FIELD,
so the dots cannot be misread.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import math
import typing
from dataclasses import dataclass
from typing import Any

import numpy as np
import yaml

from distributed_bism.config import Config, ConfigError, check, from_dict

ARITY = {"choice": None, "grid": None, "randint": 2, "uniform": 2, "loguniform": 2, "quniform": 3}
SPEC_KEYS = (
    "base",
    "overrides",
    "search",
    "metric",
    "mode",
    "scheduler",
    "searcher",
    "num_samples",
    "max_concurrent_trials",
    "resources",
)
# Keys the sweep sets for each trial itself (the runner replaces them), so a value here would be lost.
CONTROLLED = {
    "trainer.name": "each trial is a run named by the sweep",
    "tracking": "MLflow runs are the sweep's",
    "trainer.output_dir": "trials write under the sweep's directory",
    **{
        f"trainer.{k}": f"use resources.{r}"
        for k, r in (
            ("num_workers", "workers_per_trial"),
            ("use_gpu", "gpus_per_worker"),
            ("cpus_per_worker", "cpus_per_worker"),
        )
    },
}
# What trainer.run reports to Tune; Tune fails a trial on any report that lacks the metric.
METRICS = (
    "eval/test_loglik",
    "train/loss",
    "train/inner_loss",
    "train/grad_norm_theta",
    "train/grad_norm_phi",
    "train/lr",
    "train/posterior_lr",
    "eval/classifier_fid",
    "eval/ood_auroc",  # image models, e.g. BiDVL, whose training loss is no guide
    "eval/denoise_gain",
    "eval/energy_gap",
)  # cheap learning signals of any model
# The eval.metrics entry that reports an eval/* key, where the two names differ.
REPORTED_BY = {"eval/denoise_gain": "denoise"}


@dataclass
class Domain:
    """The values of one searched key. kind: choice | grid (args: the values) | randint |
    uniform | loguniform (args: [low, high]) | quniform (args: [low, high, q]); Ray's semantics."""

    kind: str
    args: list[Any]

    def to_tune(self) -> Any:
        """The Ray Tune domain (a grid is Ray's {"grid_search": [...]} marker)."""
        from ray import tune

        if self.kind == "grid":
            return tune.grid_search(list(self.args))
        if self.kind == "choice":
            return tune.choice(list(self.args))
        return getattr(tune, self.kind)(*self.args)

    def candidates(self) -> list[Any]:
        """Values checked at load time: every choice, else the smallest and largest a trial can get."""
        if self.kind in ("choice", "grid"):
            return list(self.args)
        low, high = self.args[:2]
        if self.kind == "randint":
            return [low, high - 1]
        if self.kind == "quniform":
            return [float(low), float(high)]  # Ray's quniform gives floats, high included
        return [float(low), math.nextafter(float(high), -math.inf)]

    def cast(self, value: Any, int_field: bool) -> Any:
        """A sampled value as the config expects it: numpy scalars to Python, quniform on an int field to int."""
        if isinstance(value, np.generic):
            value = value.item()
        if self.kind == "quniform" and int_field and isinstance(value, float):
            return int(round(value))
        return value


@dataclass
class SchedulerSpec:
    """asha (ASHAScheduler on training_iteration, i.e. reports) or fifo. max_t: None in the file
    means the number of reports a trial makes; `load_spec` resolves it."""

    name: str = "asha"
    grace_period: int = 1
    reduction_factor: float = 4.0
    max_t: int | None = None

    def __post_init__(self) -> None:
        check(
            self.name in ("asha", "fifo"), "scheduler.name", f"unknown scheduler {self.name!r}; expected asha or fifo"
        )
        check(self.grace_period >= 1, "scheduler.grace_period", f"must be >= 1, got {self.grace_period}")
        check(self.reduction_factor > 1, "scheduler.reduction_factor", f"must be > 1, got {self.reduction_factor}")
        check(self.max_t is None or self.max_t >= 1, "scheduler.max_t", f"must be >= 1, got {self.max_t}")


@dataclass
class SearcherSpec:
    """random (Ray's BasicVariantGenerator; expands grid domains) or optuna (TPE; needs optuna)."""

    name: str = "random"
    seed: int | None = None  # None: unseeded

    def __post_init__(self) -> None:
        check(
            self.name in ("random", "optuna"),
            "searcher.name",
            f"unknown searcher {self.name!r}; expected random or optuna",
        )


@dataclass
class Resources:
    """Each trial is a training run of workers_per_trial workers, each taking these CPUs and GPUs."""

    workers_per_trial: int = 1
    gpus_per_worker: float = 0.0  # > 0 also sets trainer.use_gpu
    cpus_per_worker: float = 1.0

    def __post_init__(self) -> None:
        check(self.workers_per_trial >= 1, "resources.workers_per_trial", f"must be >= 1, got {self.workers_per_trial}")
        check(self.gpus_per_worker >= 0, "resources.gpus_per_worker", f"must be >= 0, got {self.gpus_per_worker}")
        check(self.cpus_per_worker > 0, "resources.cpus_per_worker", f"must be > 0, got {self.cpus_per_worker}")


@dataclass
class SweepSpec:
    """A validated sweep. The base YAML is read once into `base_data`, so trials build their
    config on any node without the file."""

    name: str  # the spec file's stem
    base: str  # as written in the spec
    base_data: dict[str, Any]
    overrides: dict[str, Any]  # {"section.field": value}
    search: dict[str, Domain]  # {"section.field": domain}
    metric: str
    mode: str
    scheduler: SchedulerSpec
    searcher: SearcherSpec
    num_samples: int
    max_concurrent_trials: int
    resources: Resources

    def param_space(self) -> dict[str, Any]:
        """Ray Tune's param_space, flat: {"optim.lr": tune.loguniform(...), ...}."""
        return {key: d.to_tune() for key, d in self.search.items()}

    def representative(self) -> dict[str, Any]:
        """One value per searched key (the first choice or the lower end), as a trial gets it."""
        return {key: d.cast(d.candidates()[0], _is_int(_hint(key))) for key, d in self.search.items()}

    def trial_config(self, params: dict[str, Any]) -> Config:
        """The Config of one trial. `params`: {"section.field": value} for exactly the searched keys,
        as Ray samples them (numpy scalars and quniform floats on int keys are cast). Applied in
        order: base, overrides, params, resources (trainer.num_workers/use_gpu/cpus_per_worker);
        trainer.name and tracking.run_name are cleared for the runner to set."""
        unknown, missing = sorted(set(params) - set(self.search)), sorted(set(self.search) - set(params))
        check(not unknown, unknown[0] if unknown else "", f"not searched by sweep {self.name}")
        check(not missing, missing[0] if missing else "", f"no value given (searched by sweep {self.name})")
        return self._build({k: self.search[k].cast(v, _is_int(_hint(k))) for k, v in params.items()})

    def _build(self, values: dict[str, Any]) -> Config:
        data = copy.deepcopy(self.base_data)
        r = self.resources
        fixed = {
            "trainer.name": None,
            "tracking.run_name": None,
            "trainer.num_workers": r.workers_per_trial,
            "trainer.use_gpu": r.gpus_per_worker > 0,
            "trainer.cpus_per_worker": r.cpus_per_worker,
        }
        for key, value in {**self.overrides, **values, **fixed}.items():
            section, name = key.split(".")
            data[section] = {**(data.get(section) or {}), name: value}
        return from_dict(Config, data)

    def to_dict(self) -> dict[str, Any]:
        """The resolved spec in its file format (max_t filled in)."""
        return {
            "base": self.base,
            "overrides": dict(self.overrides),
            "search": {k: {d.kind: list(d.args)} for k, d in self.search.items()},
            "metric": self.metric,
            "mode": self.mode,
            "scheduler": dataclasses.asdict(self.scheduler),
            "searcher": dataclasses.asdict(self.searcher),
            "num_samples": self.num_samples,
            "max_concurrent_trials": self.max_concurrent_trials,
            "resources": dataclasses.asdict(self.resources),
        }

    def to_yaml(self) -> str:
        """The resolved spec as YAML (the MLflow parent run's artifact); `load_spec` reads it back."""
        body = yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None)
        return f"# sweep {self.name}, resolved\n{body}"

    def build_searcher(self) -> Any:
        """The Ray Tune search algorithm; a ConfigError naming the fix when optuna is missing."""
        if self.searcher.name == "optuna":
            if importlib.util.find_spec("optuna") is None:
                raise ConfigError(
                    "searcher.name: optuna is not installed; run `pip install optuna` (or use searcher random)"
                )
            from ray.tune.search.optuna import OptunaSearch

            return OptunaSearch(seed=self.searcher.seed)  # TuneConfig.max_concurrent_trials wraps it
        from ray.tune.search import BasicVariantGenerator

        # A SearchGenerator passed in ignores TuneConfig.max_concurrent_trials, so it is set here.
        return BasicVariantGenerator(max_concurrent=self.max_concurrent_trials, random_state=self.searcher.seed)


# --------------------------------------------------------------------------- loading
def _hint(key: str, where: str | None = None) -> Any:
    """The annotation of config key SECTION.FIELD; a ConfigError naming `where` if there is none
    or the sweep sets it."""
    where = where or key
    for prefix, why in CONTROLLED.items():
        check(key != prefix and not key.startswith(prefix + "."), where, f"set by the sweep ({why})")
    sections = typing.get_type_hints(Config)
    parts = key.split(".")
    check(
        len(parts) == 2 and parts[0] in sections,
        where,
        f"not a key of the training config (expected SECTION.FIELD, sections: {', '.join(sections)})",
    )
    fields = typing.get_type_hints(sections[parts[0]])
    check(parts[1] in fields, where, f"not a key of the training config ({parts[0]} has {', '.join(fields)})")
    return fields[parts[1]]


def _is_int(hint: Any) -> bool:
    return hint is int or (int in typing.get_args(hint) and float not in typing.get_args(hint))
