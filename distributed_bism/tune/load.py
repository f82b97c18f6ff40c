"""Reading a sweep file into a checked SweepSpec (`load_spec`), with CLI overrides, and the sweep's
name (`checked_sweep_name`). The file's keys and domains are described in spec.py.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

from distributed_bism.config import Config, ConfigError, check, coerce, from_dict
from distributed_bism.config.errors import MAX_NAME_BYTES, check_path_name
from distributed_bism.config.loading import parse_yaml, read_yaml_file
from distributed_bism.tune.spec import (
    ARITY,
    METRICS,
    REPORTED_BY,
    SPEC_KEYS,
    Domain,
    Resources,
    SchedulerSpec,
    SearcherSpec,
    SweepSpec,
    _hint,
    _is_int,
)


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
        ok = all(s % t.log_interval == 0 or s % t.checkpoint_every == 0 or s == t.steps for s in _report_steps(cfg))
        check(
            ok,
            "metric",
            f"evaluations (eval.every={every}) report without {metric}: "
            f"make eval.every a multiple of trainer.log_every={t.log_interval}",
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


def _base_path(base: str, spec_path: Path, root: str | Path | None) -> Path:
    """Where a spec's `base` is. A relative one resolves against `root` when given; otherwise
    against the project the spec sits in (tune_spaces/'s parent, where configs/ is), then the
    spec's own folder, then the working directory: the first that has it. That holds for a
    source checkout and for an installed package run from a checkout alike."""
    if Path(base).is_absolute():
        return Path(base)
    if root is not None:
        return Path(root) / base
    folder = spec_path.resolve().parent
    candidates = [folder.parent / base, folder / base, Path.cwd() / base]
    return next((c for c in candidates if c.exists()), candidates[0])


def load_spec(path: str | Path, overrides: list[str] | None = None, root: str | Path | None = None) -> SweepSpec:
    """Read and check a sweep spec; `overrides` as in the module docstring; a relative `base`
    resolves as `_base_path` says. Every problem is a one-line ConfigError naming the key."""
    p = Path(path)
    raw = _read_yaml(p, "spec")
    for item in overrides or []:
        _apply_cli(raw, item)
    unknown = sorted(set(raw) - set(SPEC_KEYS))
    check(not unknown, unknown[0] if unknown else "", f"unknown spec key (valid keys: {', '.join(SPEC_KEYS)})")
    for key in ("base", "search", "metric", "mode"):
        check(key in raw, key, "missing")
    base = coerce(raw["base"], str, "base")
    base_path = _base_path(base, p, root)
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
