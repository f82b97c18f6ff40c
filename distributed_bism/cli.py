"""The `bism` command.

    bism train CONFIG.yaml [key=value ...]   train one process on this machine
    bism demo [key=value ...]                the embedded default: a GRBM on the checkerboard
"""

from __future__ import annotations

import argparse
import sys

from distributed_bism.config import Config, ConfigError, apply_overrides, from_dict, load_config
from distributed_bism.data.synthetic import CHECKERBOARD_BEST_LOGLIK
from distributed_bism.experiments import checkerboard_grbm


def demo_config(overrides: list[str]) -> Config:
    """BiDSM (N=5, K=5) on the checkerboard GRBM, shortened to 3000 iterations (about 40 s on 2 cores)."""
    return from_dict(Config, apply_overrides(checkerboard_grbm("bidsm_k5", steps=3000, log_every=250, eval_every=500),
                                             overrides))


def _train(cfg: Config) -> None:
    from distributed_bism.trainer import TrainLoop  # torch loads only once the config is valid

    print("resolved config:\n" + cfg.to_yaml(), flush=True)
    loop = TrainLoop.from_config(cfg, log=lambda s: print(s, flush=True))
    history = loop.run()
    if history.test_loglik:  # run() evaluates at the last step
        best = f"  (best possible on the checkerboard: log 2 = {CHECKERBOARD_BEST_LOGLIK:.4f})" \
            if cfg.data.name == "checkerboard" else ""
        print(f"exact test log-likelihood: {history.test_loglik[loop.step]:.4f} nats{best}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bism", description="bi-level score matching for EBLVMs")
    sub = parser.add_subparsers(dest="command", required=True)
    p_train = sub.add_parser("train", help="train from a YAML config")
    p_train.add_argument("config", help="path to a YAML config")
    p_train.add_argument("overrides", nargs="*", help="dotted overrides, e.g. objective.unroll_steps=5")
    p_demo = sub.add_parser("demo", help="train the embedded default (checkerboard GRBM, BiDSM)")
    p_demo.add_argument("overrides", nargs="*", help="dotted overrides, e.g. trainer.steps=500")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides) if args.command == "train" else demo_config(args.overrides)
    except ConfigError as e:
        print(f"bism: error: {e}", file=sys.stderr)
        return 2
    _train(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
