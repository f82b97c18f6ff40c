"""The `bism` command.

    bism train CONFIG.yaml [key=value ...]   train one process on this machine
    bism demo [key=value ...]                the embedded default: a GRBM on the checkerboard
"""

from __future__ import annotations

import argparse
import sys

from distributed_bism.config import Config, ConfigError, from_dict, load_config

# The demo is the checkerboard GRBM with the reference hyperparameters (METHODS.md §2),
# shortened to a couple of minutes on a laptop CPU.
DEMO = {
    "data": {"name": "checkerboard"},
    "model": {"name": "grbm", "h_dim": 4},
    "posterior": {"name": "bernoulli"},
    "objective": {"name": "bidsm", "sigma": 0.05, "warmup_steps": 5, "unroll_steps": 5, "lower_level": "kl"},
    "optim": {"lr": 1e-3, "posterior_lr": 1e-3},
    "trainer": {"steps": 3000, "batch_size": 100, "log_every": 250, "eval_every": 500},
}


def _train(cfg: Config) -> float | None:
    from distributed_bism.trainer import TrainLoop

    print("resolved config:\n" + cfg.to_yaml(), flush=True)
    loop = TrainLoop.from_config(cfg, log=lambda s: print(s, flush=True))
    loop.run()
    final = loop.evaluate()
    if "test_loglik" in final:
        print(f"exact test log-likelihood: {final['test_loglik']:.4f} nats"
              + (f"  (best possible on the checkerboard: log 2 = 0.6931)" if cfg.data.name == "checkerboard" else ""))
        return final["test_loglik"]
    return None


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
        if args.command == "train":
            cfg = load_config(args.config, args.overrides)
        else:
            from distributed_bism.config import apply_overrides
            import copy

            cfg = from_dict(Config, apply_overrides(copy.deepcopy(DEMO), args.overrides))
    except ConfigError as e:
        print(f"bism: error: {e}", file=sys.stderr)
        return 2
    _train(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
