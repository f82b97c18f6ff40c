"""The `bism` command.

    bism train CONFIG.yaml [key=value ...] [--address HOST:PORT]
    bism demo [key=value ...]      the embedded default: configs/demo.yaml (conv EBLVM, BiMDSM, digits, 2 DDP workers)

Bad input (config, data set, paths, tracking store, cluster) is one line on stderr and exit 2,
before any worker starts.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from distributed_bism.config import Config, ConfigError, load_config

DEMO_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"


def _input_errors() -> tuple[type[Exception], ...]:
    from distributed_bism.checkpoint import CheckpointError
    from distributed_bism.data import DataError

    return ConfigError, DataError, CheckpointError


def _train(cfg: Config, address: str | None) -> int:
    from distributed_bism.run import train

    try:
        train(cfg, address=address)
    except _input_errors() as e:
        print(f"bism: error: {e}", file=sys.stderr)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bism", description="bi-level score matching for EBLVMs, on Ray")
    sub = parser.add_subparsers(dest="command", required=True)
    p_train = sub.add_parser("train", help="train from a YAML config")
    p_train.add_argument("config", help="path to a YAML config")
    p_train.add_argument("overrides", nargs="*", help="dotted overrides, e.g. objective.unroll_steps=5")
    p_train.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS, a running cluster, or a new local one)")
    p_demo = sub.add_parser("demo", help=f"train the embedded default ({DEMO_CONFIG.name})")
    p_demo.add_argument("overrides", nargs="*", help="dotted overrides, e.g. trainer.steps=500")
    args = parser.parse_args(argv)
    path = args.config if args.command == "train" else DEMO_CONFIG
    try:
        cfg = load_config(path, args.overrides)
    except ConfigError as e:
        print(f"bism: error: {e}", file=sys.stderr)
        return 2
    return _train(cfg, getattr(args, "address", None))


if __name__ == "__main__":
    sys.exit(main())
