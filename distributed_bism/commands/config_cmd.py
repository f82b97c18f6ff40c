"""`bism config`: what a run would be given, and what can be set.

    bism config show CONFIG [key=value ...]   the resolved config as YAML: the file, the overrides
                                              and every default, validated as `bism train` does
    bism config keys [FILTER]                 every key (section.field) with its type, default and
                                              meaning (config/keys.py), or those whose name
                                              contains FILTER (a section such as `objective`, or
                                              part of a key such as `sigma`)

Bad input is a ConfigError, which the CLI prints as the same one line `bism train` prints.
Imports only the config package (no torch): both answer at once.
"""

from __future__ import annotations

import argparse

from distributed_bism.config import Config, ConfigError, load_config
from distributed_bism.config.keys import KeyDoc, config_keys

KEYS_HEADER = ("KEY", "TYPE", "DEFAULT", "MEANING")


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add `config show` and `config keys` to the CLI's subcommands `sub`."""
    p = sub.add_parser("config", help="print a resolved config, or every config key with its meaning")
    actions = p.add_subparsers(dest="action", required=True)
    show = actions.add_parser(
        "show", help="the resolved config (file, overrides and defaults, validated as `bism train` does) as YAML"
    )
    show.add_argument("config", help="path to a YAML config")
    show.add_argument("overrides", nargs="*", help="dotted overrides, e.g. objective.unroll_steps=5")
    keys = actions.add_parser("keys", help="every config key with its type, default and meaning")
    keys.add_argument("filter", nargs="?", help="only keys whose name contains this, e.g. objective or sigma")
    return p


def run(args: argparse.Namespace) -> int:
    """`bism config ACTION ...`: print the answer to stdout; a ConfigError for bad input."""
    if args.action == "show":
        print(show(args.config, args.overrides), end="")
    else:
        print(keys_table(matching_keys(args.filter)))
    return 0


def show(path: str, overrides: list[str]) -> str:
    """The YAML of the Config `bism train path overrides...` would run (before the run's name is
    chosen: a config without trainer.name shows null). It loads back to the same Config."""
    return load_config(path, overrides).to_yaml()


def matching_keys(text: str | None) -> list[KeyDoc]:
    """Every key, or those whose name contains `text` (case-insensitive); a ConfigError when none does."""
    keys = config_keys(Config)
    if text is None:
        return keys
    found = [k for k in keys if text.lower() in k.key.lower()]
    if not found:
        sections = ", ".join(dict.fromkeys(k.key.split(".")[0] for k in keys))
        raise ConfigError(f"config keys: no key contains {text!r} (sections: {sections})")
    return found


def keys_table(keys: list[KeyDoc]) -> str:
    """One line per key: key, type and default in aligned columns, then its meaning."""
    rows = [KEYS_HEADER] + [(k.key, k.type, k.default_text, k.help) for k in keys]
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row[:3], widths)) + "  " + row[3] for row in rows)
