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
