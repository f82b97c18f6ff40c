"""The `bism` command.

    bism train CONFIG.yaml [key=value ...] [--address HOST:PORT]
    bism demo [key=value ...]      the embedded default: configs/demo.yaml (conv EBLVM, BiMDSM, digits, 2 DDP workers)
    bism tune SPEC.yaml [key=value ...] [--name N] [--output-dir D] [--address HOST:PORT]
                                   a Ray Tune sweep defined in tune_spaces/

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


def _tune(args: argparse.Namespace) -> int:
    try:
        from distributed_bism.tune.runner import run_sweep
        from distributed_bism.tune.spec import load_spec

        run_sweep(load_spec(args.spec, args.overrides), name=args.name, output_dir=args.output_dir,
                  address=args.address)
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
    p_tune = sub.add_parser("tune", help="run (or resume) a hyperparameter sweep from a tune_spaces/ YAML")
    p_tune.add_argument("spec", help="path to a sweep spec YAML")
    p_tune.add_argument("overrides", nargs="*", help="spec overrides, e.g. num_samples=4 scheduler.grace_period=1")
    p_tune.add_argument("--name", help="sweep name (default: the spec's file name); the same name resumes")
    p_tune.add_argument("--output-dir", default="outputs", help="where sweeps/<name>/ and the MLflow store go")
    p_tune.add_argument("--address", help="Ray cluster address, as for train")
    p_demo = sub.add_parser("demo", help=f"train the embedded default ({DEMO_CONFIG.name})")
    p_demo.add_argument("overrides", nargs="*", help="dotted overrides, e.g. trainer.steps=500")
    args = parser.parse_args(argv)
    if args.command == "tune":
        return _tune(args)
    path = args.config if args.command == "train" else DEMO_CONFIG
    try:
        cfg = load_config(path, args.overrides)
    except ConfigError as e:
        print(f"bism: error: {e}", file=sys.stderr)
        return 2
    return _train(cfg, getattr(args, "address", None))


if __name__ == "__main__":
    sys.exit(main())
