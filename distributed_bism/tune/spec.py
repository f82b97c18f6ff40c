"""Sweep definitions: one declarative YAML file per study under tune_spaces/ (examples there).

Keys: base (a training config, relative to the repository root), overrides ({SECTION.FIELD:
value} for every trial), search ({SECTION.FIELD: {KIND: ARGS}}), metric, mode, scheduler, searcher,
num_samples, max_concurrent_trials, resources. Domains as in Ray Tune: choice, grid (a non-empty
list); randint [low, high) (integers); uniform, loguniform [low, high); quniform [low, high, q]
(low, high multiples of q; high included). `load_spec` checks it all before anything starts,
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
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from distributed_bism.config import Config, ConfigError, check, coerce, from_dict
from distributed_bism.config.errors import MAX_NAME_BYTES, check_path_name
from distributed_bism.config.loading import parse_yaml, read_yaml_file

REPO_ROOT = Path(__file__).resolve().parents[2]
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


def _number(value: Any, where: str) -> float | int:
    # PyYAML (YAML 1.1) reads 1e-4 as a string, so numeric strings count as numbers.
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            pass
    check(
        isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value),
        where,
        f"expected a finite number, got {value!r}",
    )
    return value


def _domain(key: str, raw: Any, hint: Any) -> Domain:
    """Parse {kind: args} for config key `key` (annotation `hint`): arity, bounds, empty ranges."""
    where = f"search.{key}"
    check(
        isinstance(raw, dict) and len(raw) == 1,
        where,
        f"expected {{KIND: ARGS}} with KIND one of {', '.join(ARITY)}, got {raw!r}",
    )
    ((kind, args),) = raw.items()
    check(kind in ARITY, where, f"unknown domain kind {kind!r}; expected one of {', '.join(ARITY)}")
    where = f"{where}.{kind}"
    if ARITY[kind] is None:
        check(isinstance(args, list) and len(args) > 0, where, f"needs a non-empty list of values, got {args!r}")
        return Domain(kind, [coerce(v, hint, where) for v in args])
    shape = "[low, high, q]" if kind == "quniform" else "[low, high]"
    check(isinstance(args, list) and len(args) == ARITY[kind], where, f"expected {shape}, got {args!r}")
    args = [_number(a, where) for a in args]
    check(kind != "randint" or all(isinstance(a, int) for a in args), where, f"needs integer bounds, got {args}")
    low, high = args[:2]
    check(low < high, where, f"empty range: low {low} >= high {high}")
    check(kind != "loguniform" or low > 0, where, f"needs low > 0, got {low}")
    if kind == "quniform":
        q = args[2]
        check(q > 0, where, f"needs q > 0, got {q}")
        # Ray refuses bounds that are not multiples of q (up to rounding).
        check(
            all(math.isclose(b / q, round(b / q)) for b in (low, high)),
            where,
            f"low {low} and high {high} must be multiples of q={q}",
        )
        check(not _is_int(hint) or float(q).is_integer(), where, f"q={q} gives non-integers for the int key {key}")
    return Domain(kind, args)


def _apply_cli(raw: dict[str, Any], item: str) -> None:
    """One CLI override of the spec, in place (syntax in the module docstring). Not config.apply_overrides:
    search and overrides keys hold dots themselves."""
    key, sep, text = item.partition("=")
    head, *rest = key.strip().split(".")
    nested = {"search": (2, 3), "overrides": (2,), "scheduler": (1,), "searcher": (1,), "resources": (1,)}
    if not sep or (rest and len(rest) not in nested.get(head, ())):
        raise ConfigError(
            f"override {item!r}: expected KEY=VALUE with KEY a spec key, "
            "scheduler|searcher|resources.FIELD, overrides.SECTION.FIELD or search.SECTION.FIELD[.KIND]"
        )
    value = parse_yaml(text, f"override {item!r}")
    if not rest:
        raw[head] = value
        return
    node = raw.get(head) or {}  # a section left empty in the file reads as None
    check(isinstance(node, dict), head, "expected a mapping")
    raw[head], sub = node, ".".join(rest[:2])
    if head == "search" and len(rest) == 3:
        node[sub] = {rest[2]: value}
    elif head == "search" and value is None:
        node.pop(sub, None)
    else:
        node[sub] = value


def _report_steps(cfg: Config) -> list[int]:
    """Steps at which trainer.run reports to Tune: evaluations, checkpoints and the last step."""
    t, every = cfg.trainer, cfg.eval.every
    ckpt = t.checkpoint_every
    return sorted(set(range(every, t.steps + 1, every)) | set(range(ckpt, t.steps + 1, ckpt)) | {t.steps})


def _check_metric(metric: str, cfg: Config) -> None:
    """Every report must carry the metric, or Tune fails the trial."""
    t, every = cfg.trainer, cfg.eval.every
    if metric.startswith("eval/"):
        name = REPORTED_BY.get(metric, metric.removeprefix("eval/"))
        check(name in cfg.eval.metrics, "metric", f"{metric} is reported with {name} in eval.metrics only")
        check(
            metric != "eval/test_loglik" or cfg.model.name == "grbm",
            "metric",
            "eval/test_loglik is reported for model.name=grbm with test_loglik in eval.metrics only",
        )
        ok = all(s % every == 0 or s == t.steps for s in _report_steps(cfg))
        check(
            ok,
            "metric",
            f"checkpoints (trainer.checkpoint_every={t.checkpoint_every}) report without {metric}: "
            f"make checkpoint_every a multiple of eval.every={every}",
        )
    else:
        ok = all(s % t.log_every == 0 or s % t.checkpoint_every == 0 or s == t.steps for s in _report_steps(cfg))
        check(
            ok,
            "metric",
            f"evaluations (eval.every={every}) report without {metric}: "
            f"make eval.every a multiple of trainer.log_every={t.log_every}",
        )


def _read_yaml(path: Path, key: str) -> dict[str, Any]:
    check(path.exists(), key, f"file not found: {path}")
    return read_yaml_file(path, key, **({"if_empty": "it defines no sweep"} if key == "spec" else {}))


TRIAL_SUFFIX_BYTES = 32  # "-" and Ray's trial id (e.g. 3a4b5_00012), or "-check"


def checked_sweep_name(spec: SweepSpec, name: str | None) -> str:
    """The sweep's name (--name, else the spec file's stem), checked as one path component: it
    names <output_dir>/sweeps/<name>/ and prefixes every trial's run name, <name>-<trial id>,
    which must fit trainer.name's bytes too."""
    check_path_name(
        name if name is not None else spec.name,
        "--name" if name is not None else "sweep name (the spec file's stem; give another with --name)",
        limit=MAX_NAME_BYTES - TRIAL_SUFFIX_BYTES,
    )
    return name if name is not None else spec.name


def load_spec(path: str | Path, overrides: list[str] | None = None, root: str | Path | None = None) -> SweepSpec:
    """Read and check a sweep spec; `overrides` as in the module docstring; `base` resolves against
    `root` (default: the repository root). Every problem is a one-line ConfigError naming the key."""
    p = Path(path)
    raw = _read_yaml(p, "spec")
    for item in overrides or []:
        _apply_cli(raw, item)
    unknown = sorted(set(raw) - set(SPEC_KEYS))
    check(not unknown, unknown[0] if unknown else "", f"unknown spec key (valid keys: {', '.join(SPEC_KEYS)})")
    for key in ("base", "search", "metric", "mode"):
        check(key in raw, key, "missing")
    base = coerce(raw["base"], str, "base")
    base_path = Path(base) if Path(base).is_absolute() else Path(root or REPO_ROOT) / base
    base_data = _read_yaml(base_path, "base")
    fixed = raw.get("overrides") or {}
    check(isinstance(fixed, dict), "overrides", "expected a mapping of SECTION.FIELD: value")
    search = raw["search"]
    check(
        isinstance(search, dict) and len(search) > 0, "search", "expected a non-empty mapping of SECTION.FIELD: domain"
    )
    for key in fixed:
        _hint(str(key), f"overrides.{key}")
        check(key not in search, f"search.{key}", "also fixed in overrides; drop one of the two")
    mode, metric = raw["mode"], coerce(raw["metric"], str, "metric")
    check(metric in METRICS, "metric", f"unknown metric {metric!r}; trials report {', '.join(METRICS)}")
    check(mode in ("max", "min"), "mode", f"expected max or min, got {mode!r}")
    sched_raw = raw.get("scheduler") or {}
    scheduler = from_dict(SchedulerSpec, sched_raw, "scheduler.")
    extra = sorted(set(sched_raw) - {"name"}) if scheduler.name == "fifo" else []
    check(not extra, f"scheduler.{extra[0]}" if extra else "", "only the asha scheduler takes it")
    spec = SweepSpec(
        name=p.stem,
        base=base,
        base_data=base_data,
        overrides={str(k): v for k, v in fixed.items()},
        search={str(k): _domain(str(k), d, _hint(str(k), f"search.{k}")) for k, d in search.items()},
        metric=metric,
        mode=mode,
        scheduler=scheduler,
        searcher=from_dict(SearcherSpec, raw.get("searcher") or {}, "searcher."),
        num_samples=coerce(raw.get("num_samples", 1), int, "num_samples"),
        max_concurrent_trials=coerce(raw.get("max_concurrent_trials", 1), int, "max_concurrent_trials"),
        resources=from_dict(Resources, raw.get("resources") or {}, "resources."),
    )
    check(spec.num_samples >= 1, "num_samples", f"must be >= 1, got {spec.num_samples}")
    check(spec.max_concurrent_trials >= 1, "max_concurrent_trials", f"must be >= 1, got {spec.max_concurrent_trials}")
    if spec.searcher.name == "optuna":
        grids = [k for k, d in spec.search.items() if d.kind == "grid"]
        check(
            not grids,
            f"search.{grids[0]}" if grids else "",
            "grid domains need searcher random; use choice with optuna",
        )
    _validate(spec, base_path)
    return spec


def _validate(spec: SweepSpec, base_path: Path) -> None:
    """Build the base, then each candidate value of each key into a Config: first with the keys
    before it at their first value and those after at the base's (so an error names the key that
    causes it), then with all others at their first value, as a trial; check the metric is in every
    report; resolve scheduler.max_t to the most reports a trial makes."""
    try:
        from_dict(Config, copy.deepcopy(spec.base_data))
    except ConfigError as e:
        raise ConfigError(f"base: {base_path} is not a valid config: {e}") from e
    try:
        spec._build({})
    except ConfigError as e:
        raise ConfigError(f"overrides/resources make an invalid config: {e}") from e
    rep, reports = spec.representative(), 0
    for trials in (False, True):
        checked: dict[str, Any] = {}
        if trials:
            _check_metric(spec.metric, spec._build(rep))
        for key, domain in spec.search.items():
            for value in domain.candidates():
                value = domain.cast(value, _is_int(_hint(key)))
                try:
                    cfg = spec._build({**(rep if trials else checked), key: value})
                    if trials:
                        _check_metric(spec.metric, cfg)
                except ConfigError as e:
                    msg = f"search.{key}: {domain.kind} value {value!r} makes an invalid config ({e})"
                    raise ConfigError(msg) from e
                if trials:
                    reports = max(reports, len(_report_steps(cfg)))
            checked[key] = rep[key]
    s = spec.scheduler
    if s.name == "asha":
        s.max_t = s.max_t or reports
        check(s.grace_period <= s.max_t, "scheduler.grace_period", f"{s.grace_period} exceeds max_t {s.max_t}")
