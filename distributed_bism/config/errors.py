"""The config error type and the checks every section uses."""

from __future__ import annotations

import os
from pathlib import Path


class ConfigError(ValueError):
    """A bad configuration value; the message names the key."""


def check(cond: bool, key: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{key}: {msg}")


def check_writable_dir(path: Path, key: str) -> None:
    """Create `path` if needed; a ConfigError naming `key` if it cannot be created or written."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"{key}: cannot create {path} ({e.strerror})") from e
    if not os.access(path, os.W_OK):
        raise ConfigError(f"{key}: {path} is not writable")


# A name that becomes one path component (a run's directory, a sweep's): letters and digits of any
# script and these marks. No separators, no `.`/`..`, no leading `-` (read as an option by shell
# tools) or `.` (a hidden directory), no spaces, quotes or control characters (MLflow filter
# strings and shells), and short enough that suffixes (checkpoint_000123, trial ids) still fit a
# file name's 255 bytes.
NAME_MARKS = "._-+=@"
MAX_NAME_BYTES = 128


def check_path_name(name: str, key: str, *, limit: int = MAX_NAME_BYTES) -> None:
    """A ConfigError naming `key` unless `name` is safe as one path component (see NAME_MARKS), of
    at most `limit` bytes in UTF-8."""
    bad = sorted({c for c in name if not (c.isalnum() or c in NAME_MARKS)})
    check(name != "", key, "must not be empty")
    check(
        name not in (".", ".."),
        key,
        f"{name!r} names a directory itself ('.' is this one, '..' the one above), "
        "not a run: choose a name such as my-run",
    )
    check(
        not bad,
        key,
        f"{name!r} has {', '.join(repr(c) for c in bad)}: a name becomes a directory, so it may "
        f"hold only letters, digits and {' '.join(NAME_MARKS)}",
    )
    check(
        name[0] not in ".-",
        key,
        f"{name!r} starts with {name[0]!r}: a name becomes a directory, so it must "
        "start with a letter, a digit or one of _ + = @",
    )
    size = len(name.encode())
    check(size <= limit, key, f"is {size} bytes long; the most is {limit}")


def check_label(label: str, key: str, *, limit: int = 256) -> None:
    """A name shown but never a path (an MLflow experiment or run name): non-empty, printable,
    one line and at most `limit` characters."""
    check(label.strip() != "", key, "must not be empty")
    bad = sorted({c for c in label if not c.isprintable()})
    check(not bad, key, f"{label!r} has control characters ({', '.join(repr(c) for c in bad)})")
    check(len(label) <= limit, key, f"is {len(label)} characters long; the most is {limit}")


def check_values(section: object, prefix: str) -> None:
    """Every float of a config section (and of its lists and mappings) is finite, and no string
    holds a NUL byte: an inf or nan learning rate, noise level or β passes `> 0`-style range
    checks (inf) or poisons training (nan); a NUL in a path is a ValueError traceback deep in
    pathlib or MLflow."""
    import dataclasses
    import math

    for f in dataclasses.fields(section):  # type: ignore[arg-type]
        value = getattr(section, f.name)
        items = (
            value.items()
            if isinstance(value, dict)
            else enumerate(value)
            if isinstance(value, list)
            else [(None, value)]
        )
        for sub, x in items:
            where = f"{prefix}{f.name}" + ("" if sub is None else f".{sub}" if isinstance(value, dict) else f"[{sub}]")
            if isinstance(x, float) and not math.isfinite(x):
                raise ConfigError(f"{where}: must be a finite number, got {x}")
            if isinstance(x, str) and "\x00" in x:
                raise ConfigError(f"{where}: {x!r} holds a NUL character")
