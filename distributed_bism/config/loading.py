"""Loading configs: YAML files and dicts into `Config`, dotted overrides, type checks.

Every section `from_dict` builds is checked twice: by its own `__post_init__` (schema.py: types
and ranges) and then by validate.py (names against the registries, how the sections fit).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from distributed_bism.config.errors import ConfigError, check
from distributed_bism.config.schema import Config
from distributed_bism.config.validate import validate


def coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`; ints are accepted where floats are expected."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return coerce(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{key}: bad value {value!r}")
    if origin is dict:
        check(isinstance(value, dict), key, f"expected a mapping, got {type(value).__name__} {value!r}")
        key_tp, value_tp = typing.get_args(tp)
        return {coerce(k, key_tp, key): coerce(v, value_tp, f"{key}.{k}") for k, v in value.items()}
    if origin is list:
        check(isinstance(value, (list, tuple)), key, f"expected a list, got {type(value).__name__} {value!r}")
        (item,) = typing.get_args(tp)
        return [coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is float:
        if isinstance(value, str):  # PyYAML (YAML 1.1) reads "1e-4" as a string
            try:
                value = float(value)
            except ValueError:
                pass
        check(
            isinstance(value, (int, float)) and not isinstance(value, bool),
            key,
            f"expected a number, got {type(value).__name__} {value!r}",
        )
        return float(value)
    if tp is int or tp is bool or tp is str:
        check(type(value) is tp, key, f"expected {tp.__name__}, got {type(value).__name__} {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported annotation {tp!r}")


def from_dict(cls: type, data: dict[str, Any] | None, prefix: str = "") -> Any:
    """Build dataclass `cls` from a nested dict, rejecting unknown keys, wrong types and names no
    registry holds (validate.py)."""
    data = data or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{prefix}{unknown[0]}: unknown key (valid keys: {', '.join(sorted(names))})")
    kwargs = {}
    for name, value in data.items():
        tp = hints[name]
        key = f"{prefix}{name}"
        is_section = isinstance(tp, type) and dataclasses.is_dataclass(tp)
        kwargs[name] = from_dict(tp, value, f"{key}.") if is_section else coerce(value, tp, key)
    try:
        section = cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{prefix.rstrip('.')}: {e}") from e
    validate(section)
    return section


class _DuplicateKey(ConfigError):
    """Raised inside the loader; parse_yaml names where the text came from."""


class _StrictLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key given twice in one mapping (PyYAML keeps the last one
    silently, so a second `trainer:` section would drop the first)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor`: its keys may be overridden
                continue
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if isinstance(key, typing.Hashable) and key in seen:
                raise _DuplicateKey(
                    f"key {key!r} appears twice in one mapping (lines {seen[key]} and {line}); keep one"
                )
            if isinstance(key, typing.Hashable):
                seen[key] = line
        return super().construct_mapping(node, deep=deep)


def parse_yaml(text: str, where: str) -> Any:
    """`text` as YAML (duplicate keys refused); a one-line ConfigError naming `where` and the
    position of a syntax error."""
    try:
        return yaml.load(text, Loader=_StrictLoader)  # a SafeLoader subclass: no arbitrary objects
    except _DuplicateKey as e:
        raise ConfigError(f"{where}: {e}") from None
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ConfigError(f"{where}: not valid YAML{at} ({e.problem or e.__class__.__name__})") from e
    except yaml.YAMLError as e:
        raise ConfigError(f"{where}: not valid YAML ({e.__class__.__name__})") from e


EMPTY_CONFIG = "it sets nothing, so a full default run would start; write the settings, or `{}` to mean the defaults"


def read_yaml_file(path: str | Path, key: str, *, if_empty: str = EMPTY_CONFIG) -> dict[str, Any]:
    """A YAML mapping from the file `path`; one-line ConfigErrors naming `key` and the path for a
    file that is missing, a directory, unreadable, not UTF-8, not YAML, empty (`if_empty` says
    why that is refused) or not a mapping."""
    p = Path(path)
    if p.is_dir():
        raise ConfigError(f"{key}: {p} is a directory, not a YAML file")
    if not p.exists():
        raise ConfigError(f"{key} file not found: {p}")
    try:
        raw = p.read_bytes()
    except OSError as e:
        raise ConfigError(f"{key}: cannot read {p} ({e.strerror or e})") from e
    try:
        text = raw.decode("utf-8-sig")  # a byte-order mark is fine
    except UnicodeDecodeError as e:
        raise ConfigError(
            f"{key}: {p} is not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start}); save it as UTF-8"
        ) from e
    data = parse_yaml(text, f"{key} {p}")
    if data is None:
        raise ConfigError(f"{key}: {p} is empty ({if_empty})")
    check(isinstance(data, dict), key, f"{p}: expected a mapping of sections, got {type(data).__name__}")
    return data


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `a.b=value` overrides (value parsed as YAML) to a nested dict, in place."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        node = data
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{key}: {part} is not a section")
        node[parts[-1]] = parse_yaml(raw, f"override {item!r}")
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load a YAML config (or the defaults when `path` is None) and apply dotted overrides."""
    data = read_yaml_file(path, "config") if path is not None else {}
    apply_overrides(data, overrides or [])
    return from_dict(Config, data)
