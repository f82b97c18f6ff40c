"""The `bism` command.

    bism train CONFIG.yaml [key=value ...] [--address HOST:PORT]
    bism demo [key=value ...]      the embedded default: configs/demo.yaml (conv EBLVM, BiMDSM, digits, 2 DDP workers)
    bism tune SPEC.yaml [key=value ...] [--name N] [--output-dir D] [--address HOST:PORT]
                                   a Ray Tune sweep defined in tune_spaces/
    bism diagnose MODEL [--k 0,1,5,10] [--batches 5] [--reference exact|unroll]
                                   bias of the K-step hypergradient at a trained model (diagnose.py)
    bism eval MODEL [--metrics M ...]
                                   evaluate a model; the table is logged into its own MLflow run
    bism sample MODEL [-n 64] [--sampler NAME] -o grid.png|samples.npz|samples.pt [--force]
                                   a sample figure titled with the sampler, or the samples themselves
    bism config show CONFIG.yaml [key=value ...]
                                   the resolved config as YAML (commands/config_cmd.py)
    bism config keys [FILTER]      every config key with its type, default and meaning
    bism --version                 the installed package's version

MODEL: a checkpoint directory, a run directory (its newest readable checkpoint), or an MLflow
model: models:/NAME/VERSION, models:/NAME@alias, a logged-model id (m-...) or a run id (its final
model), looked up in --tracking-uri (default $MLFLOW_TRACKING_URI, else outputs/mlflow.db).

Options may stand anywhere among a command's overrides. Bad input (config, data set, paths,
tracking store, cluster) is one line on stderr and exit 2, before any worker starts.
"""

from __future__ import annotations

import argparse
import functools
import importlib.metadata
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from distributed_bism.commands import config_cmd
from distributed_bism.config import Config, ConfigError, load_config
from distributed_bism.config.limits import MAX_EXAMPLES, MAX_INNER_STEPS
from distributed_bism.registry.samplers import SAMPLERS

# The embedded default: configs/demo.yaml of the source checkout the package runs from (an
# editable install), else of the working directory (an installed package run from a checkout).
DEMO_CONFIG = Path("configs") / "demo.yaml"


def demo_config() -> Path:
    """The demo's config file; a ConfigError naming where it looked when there is none."""
    candidates = [Path(__file__).resolve().parents[1] / DEMO_CONFIG, Path.cwd() / DEMO_CONFIG]
    found = next((c for c in candidates if c.is_file()), None)
    if found is None:
        raise ConfigError(
            f"bism demo: {DEMO_CONFIG} is in neither {candidates[0].parents[1]} nor the working directory; "
            "run it from the repository, or train a config with `bism train PATH`"
        )
    return found


def package_version() -> str:
    """The installed distribution's version; a source tree run without installing has none."""
    try:
        return importlib.metadata.version("distributed-bism")
    except importlib.metadata.PackageNotFoundError:
        return "unknown (not installed)"


Command = Callable[..., int]
MODEL_HELP = (
    "checkpoint directory, run directory, or an MLflow model: models:/NAME/VERSION, models:/NAME@alias, "
    "a logged-model id m-... or a run id"
)


def _input_errors() -> tuple[type[Exception], ...]:
    from distributed_bism.data import DataError
    from distributed_bism.training.checkpointing import CheckpointError

    return ConfigError, DataError, CheckpointError


def _one_line_errors(*extra: type[Exception]) -> Callable[[Command], Command]:
    """Make a command's bad input (config, data set, checkpoint, and the `extra` errors) one line
    on stderr and exit status 2."""

    def wrap(command: Command) -> Command:
        @functools.wraps(command)
        def run(*args: Any) -> int:
            try:
                return command(*args)
            except (*_input_errors(), *extra) as e:
                print(f"bism: error: {e}", file=sys.stderr)
                return 2

        return run

    return wrap


def _at_most(value: int, cap: int, option: str, what: str) -> None:
    """A ValueError (one line, exit 2) for a count past what any machine does: it would hang or
    exhaust memory instead of failing (schema.py's caps, for options outside a config)."""
    if value > cap:
        raise ValueError(f"{option}: {value} is more than the {cap} allowed ({what})")


@_one_line_errors()
def _train(cfg: Config, address: str | None) -> int:
    from distributed_bism.api import train

    train(cfg, address=address)
    return 0


@_one_line_errors()
def _config(args: argparse.Namespace) -> int:
    return config_cmd.run(args)


@_one_line_errors()
def _tune(args: argparse.Namespace) -> int:
    from distributed_bism.tune.load import checked_sweep_name, load_spec
    from distributed_bism.tune.runner import run_sweep

    spec = load_spec(args.spec, args.overrides)
    run_sweep(spec, name=checked_sweep_name(spec, args.name), output_dir=args.output_dir, address=args.address)
    return 0


@_one_line_errors(ValueError)  # bad --k, --batches or --reference
def _diagnose(args: argparse.Namespace) -> int:
    from distributed_bism.commands.diagnose import diagnose

    try:
        ks = [int(k) for k in args.k.split(",")]
    except ValueError:
        raise ValueError(f"--k: expected comma-separated integers, got {args.k!r}") from None
    _at_most(max(ks, default=0), MAX_INNER_STEPS, "--k", "unrolled steps, all kept in memory")
    _at_most(args.reference_steps, MAX_INNER_STEPS, "--reference-steps", "unrolled steps, all kept in memory")
    _at_most(args.batches, MAX_INNER_STEPS, "--batches", "training batches, each differentiated at every K")
    out = diagnose(
        args.checkpoint,
        ks=ks,
        num_batches=args.batches,
        reference=args.reference,
        reference_steps=args.reference_steps,
        seed=args.seed,
        tracking_uri=args.tracking_uri,
        output_dir=args.output_dir,
        log=not args.no_log,
    )
    print(out.report.table())
    if out.run_id:
        print(f"logged to MLflow run {out.run_id} (metrics unroll_bias/*, artifacts diagnose/)")
    if out.plot:
        print(f"plot: {out.plot}")
    return 0


@_one_line_errors(ValueError)  # bad --metrics
def _eval(args: argparse.Namespace) -> int:
    from distributed_bism.commands.evaluate import evaluate_checkpoint

    report = evaluate_checkpoint(
        args.checkpoint, metrics=args.metrics, tracking_uri=args.tracking_uri, log=not args.no_log, use_ema=args.ema
    )
    print(report.table())
    if report.run_id:
        print(f"logged to MLflow run {report.run_id} at step {report.step}")
    return 0


@_one_line_errors(ValueError, FileExistsError)  # bad --sampler or -n; an output file that exists
def _sample(args: argparse.Namespace) -> int:
    from distributed_bism.commands.evaluate import sample_checkpoint

    _at_most(args.n, MAX_EXAMPLES, "-n", "samples, held in memory at once")
    paths = sample_checkpoint(
        args.checkpoint,
        args.output,
        n=args.n,
        sampler=args.sampler,
        seed=args.seed,
        force=args.force,
        tracking_uri=args.tracking_uri,
        use_ema=args.ema,
    )
    print("wrote " + " and ".join(str(p) for p in paths))
    return 0


def parse(
    parser: argparse.ArgumentParser, commands: dict[str, argparse.ArgumentParser], argv: list[str] | None
) -> argparse.Namespace:
    """The command line, with a command's options allowed anywhere among its positionals
    (`bism train C.yaml --address X k=v`): plain parse_args stops filling the overrides at the
    first option and calls what follows it unrecognized. argparse's intermixed parsing does not
    support subparsers, so the command's own parser reads everything after the command's name."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in commands:
        args = commands[argv[0]].parse_intermixed_args(argv[1:])
        args.command = argv[0]
        return args
    return parser.parse_args(argv)  # --help, or a missing or unknown command: argparse's own message


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bism", description="bi-level score matching for EBLVMs, on Ray")
    parser.add_argument("--version", action="version", version=f"%(prog)s {package_version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    p_train = sub.add_parser("train", help="train from a YAML config")
    p_train.add_argument("config", help="path to a YAML config")
    p_train.add_argument("overrides", nargs="*", help="dotted overrides, e.g. objective.unroll_steps=5")
    p_train.add_argument(
        "--address", help="Ray cluster address (default: $RAY_ADDRESS, a running cluster, or a new local one)"
    )
    p_tune = sub.add_parser("tune", help="run (or resume) a hyperparameter sweep from a tune_spaces/ YAML")
    p_tune.add_argument("spec", help="path to a sweep spec YAML")
    p_tune.add_argument("overrides", nargs="*", help="spec overrides, e.g. num_samples=4 scheduler.grace_period=1")
    p_tune.add_argument("--name", help="sweep name (default: the spec's file name); the same name resumes")
    p_tune.add_argument("--output-dir", default="outputs", help="where sweeps/<name>/ and the MLflow store go")
    p_tune.add_argument("--address", help="Ray cluster address, as for train")
    p_demo = sub.add_parser("demo", help=f"train the embedded default ({DEMO_CONFIG.name})")
    p_demo.add_argument("overrides", nargs="*", help="dotted overrides, e.g. trainer.steps=500")
    p_diag = sub.add_parser("diagnose", help="bias of the K-step hypergradient at a checkpoint")
    p_diag.add_argument("checkpoint", help=MODEL_HELP)
    p_diag.add_argument("--k", default="0,1,5,10", help="unroll depths, comma-separated (default 0,1,5,10)")
    p_diag.add_argument("--batches", type=int, default=5, help="training batches to average over (default 5)")
    p_diag.add_argument(
        "--reference",
        choices=("exact", "unroll"),
        help="exact posterior (GRBM; the default there) or a long unroll (default otherwise)",
    )
    p_diag.add_argument("--reference-steps", type=int, default=50, help="K of the unroll reference (default 50)")
    p_diag.add_argument("--seed", type=int, default=0)
    p_diag.add_argument("--tracking-uri", help="MLflow store (default: the one the run's config names)")
    p_diag.add_argument("--output-dir", type=Path, help="also keep the plot and JSON here")
    p_diag.add_argument("--no-log", action="store_true", help="do not log to the checkpoint's MLflow run")
    p_eval = sub.add_parser("eval", help="evaluate a checkpoint and log the table into its MLflow run")
    p_eval.add_argument("checkpoint", help=MODEL_HELP)
    p_eval.add_argument("--metrics", nargs="+", help="metrics to run (default: the run's eval.metrics)")
    p_eval.add_argument("--tracking-uri", help="MLflow store (default: the one the run's config names)")
    p_eval.add_argument("--no-log", action="store_true", help="print only; log nothing to MLflow")
    p_eval.add_argument("--ema", action="store_true", help="evaluate the EMA weights of θ")
    p_sample = sub.add_parser("sample", help="draw samples of a checkpoint into a figure")
    p_sample.add_argument("checkpoint", help=MODEL_HELP)
    p_sample.add_argument("-n", type=int, default=64, help="number of samples (default 64)")
    p_sample.add_argument(
        "--sampler", default="conditional", help=f"one of {', '.join(SAMPLERS)} (default: %(default)s)"
    )
    p_sample.add_argument(
        "-o",
        "--output",
        type=Path,
        required=True,
        help="a figure (.png), or the samples (n, C, H, W) as .npz or .pt, clipped to the data's "
        "range with the raw values beside them, plus the figure as .png",
    )
    p_sample.add_argument("--force", action="store_true", help="replace an existing output file")
    p_sample.add_argument("--seed", type=int, default=0)
    p_sample.add_argument("--tracking-uri", help="MLflow store, to resolve a model or run id")
    p_sample.add_argument("--ema", action="store_true", help="sample from the EMA weights of θ")
    config_cmd.add_parser(sub)  # its own subcommands: parsed by argparse as they are, not intermixed
    args = parse(parser, {p.prog.split()[-1]: p for p in (p_train, p_tune, p_demo, p_diag, p_eval, p_sample)}, argv)
    if args.command == "config":
        return _config(args)
    if args.command == "eval":
        return _eval(args)
    if args.command == "sample":
        return _sample(args)
    if args.command == "tune":
        return _tune(args)
    if args.command == "diagnose":
        return _diagnose(args)
    try:
        path = args.config if args.command == "train" else demo_config()
        cfg = load_config(path, args.overrides)
    except ConfigError as e:
        print(f"bism: error: {e}", file=sys.stderr)
        return 2
    return _train(cfg, getattr(args, "address", None))


if __name__ == "__main__":
    sys.exit(main())
