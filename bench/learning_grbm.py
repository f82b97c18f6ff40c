"""Exact test log-likelihood curves of GRBM learners on the checkerboard (METHODS.md §2).

Trains BiDSM (N=5, K=0 and K=5), DSM on the exact free energy (σ=0.05), CD-1 and PCD-1 with
the reference hyperparameters (Adam 1e-3, batch 100, H=4) and records log p(test) by exact
enumeration. Writes JSON and a plot.

    .venv/bin/python bench/learning_grbm.py --steps 20000 --eval-every 1000 --out bench/results
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from distributed_bism.config import Config, from_dict
from distributed_bism.trainer import TrainLoop

METHODS: dict[str, dict] = {
    "bidsm_k0": {"name": "bidsm", "warmup_steps": 5, "unroll_steps": 0},
    "bidsm_k5": {"name": "bidsm", "warmup_steps": 5, "unroll_steps": 5},
    "dsm": {"name": "dsm"},
    "cd1": {"name": "cd", "cd_steps": 1},
    "pcd1": {"name": "pcd", "cd_steps": 1},
}


def method_config(method: str, steps: int, eval_every: int, seed: int) -> Config:
    """The reference checkerboard set-up for one method."""
    return from_dict(Config, {
        "data": {"name": "checkerboard"},
        "model": {"name": "grbm", "h_dim": 4},
        "posterior": {"name": "bernoulli", "temperature": 0.1},
        "objective": {"sigma": 0.05, "lower_level": "kl", **METHODS[method]},
        "optim": {"lr": 1e-3, "posterior_lr": 1e-3},
        "trainer": {"steps": steps, "batch_size": 100, "seed": seed, "log_every": eval_every, "eval_every": eval_every},
    })


def run(method: str, steps: int, eval_every: int, seed: int) -> dict:
    loop = TrainLoop.from_config(method_config(method, steps, eval_every, seed), log=lambda s: None)
    start = time.perf_counter()
    history = loop.run()
    return {"seconds": time.perf_counter() - start, "test_loglik": history.test_loglik}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20_000)
    parser.add_argument("--eval-every", type=int, default=1_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--methods", nargs="*", default=list(METHODS))
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    results = {}
    for m in args.methods:
        r = run(m, args.steps, args.eval_every, args.seed)
        curve = r["test_loglik"]
        print(f"{m:10s} initial {curve[0]:8.4f}  final {curve[max(curve)]:8.4f}  best {max(curve.values()):8.4f}"
              f"  ({r['seconds']:.0f}s)", flush=True)
        results[m] = r
    stem = f"learning_grbm_{args.steps}"
    meta = {"machine": platform.platform(), "processor": platform.processor(), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "steps": args.steps, "seed": args.seed, "best_possible": 0.6931}
    (args.out / f"{stem}.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1))

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for m, r in results.items():
        steps = sorted(r["test_loglik"])
        ax.plot(steps, [r["test_loglik"][s] for s in steps], label=m)
    ax.axhline(0.6931, color="k", ls="--", lw=0.8, label="log 2 (best)")
    ax.set(xlabel="iteration", ylabel="exact test log-likelihood", title="GRBM (H=4) on the checkerboard")
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out / f"{stem}.png", dpi=120)
    print(f"wrote {args.out / stem}.json and .png")


if __name__ == "__main__":
    main()
