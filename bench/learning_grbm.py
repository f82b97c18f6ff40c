"""Exact test log-likelihood curves of GRBM learners on the checkerboard (docs/methods.md §2).

Trains BiDSM (N=5, K=0 and K=5), DSM on the exact free energy (σ=0.05), CD-1 and PCD-1 in the
reference set-up (`experiments.checkerboard_grbm`: its initialisation, Adam 1e-3 with betas
(0.9, 0.95), batch 100, H=4, 60k training points) and records log p(test) by exact enumeration.
Writes JSON and a plot. bench_paper_loglik.py runs the same set-up over seeds and more learners.

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
from distributed_bism.data.synthetic import CHECKERBOARD_BEST_LOGLIK
from distributed_bism.experiments import CHECKERBOARD_METHODS, checkerboard_grbm
from distributed_bism.training.loop import TrainLoop


def train_curve(cfg: Config) -> dict:
    """Train `cfg` in this process with the library's loop; its wall time and test log-likelihood curve."""
    loop = TrainLoop.from_config(cfg, log=lambda s: None)
    start = time.perf_counter()
    history = loop.run()
    return {"seconds": time.perf_counter() - start, "test_loglik": history.test_loglik}


def run(method: str, steps: int, eval_every: int, seed: int) -> dict:
    return train_curve(from_dict(Config, checkerboard_grbm(method, steps=steps, log_every=eval_every,
                                                           eval_every=eval_every, seed=seed)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20_000)
    parser.add_argument("--eval-every", type=int, default=1_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--methods", nargs="*", default=list(CHECKERBOARD_METHODS))
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
            "threads": torch.get_num_threads(), "steps": args.steps, "seed": args.seed, "best_possible": CHECKERBOARD_BEST_LOGLIK,
            "setup": {k: v for k, v in checkerboard_grbm(args.methods[0], steps=args.steps, log_every=args.eval_every,
                                                         eval_every=args.eval_every, seed=args.seed).items()
                      if k != "objective"}}
    (args.out / f"{stem}.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1))

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for m, r in results.items():
        steps = sorted(r["test_loglik"])
        ax.plot(steps, [r["test_loglik"][s] for s in steps], label=m)
    ax.axhline(CHECKERBOARD_BEST_LOGLIK, color="k", ls="--", lw=0.8, label="log 2 (best)")
    ax.set(xlabel="iteration", ylabel="exact test log-likelihood", title="GRBM (H=4) on the checkerboard")
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out / f"{stem}.png", dpi=120)
    print(f"wrote {args.out / stem}.json and .png")


if __name__ == "__main__":
    main()
