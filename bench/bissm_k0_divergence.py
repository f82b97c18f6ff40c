"""Why BiSSM at K=0 loses the checkerboard's log-likelihood while BiSSM at K=5 does not.

The hypothesis this measures. A GRBM's marginal is a mixture over the 2^H hidden states,
p(v) = Σ_h π_h N(v; b + σ²Wh, σ²), with log π_h = (c + Wᵀb)ᵀh + ½‖σ⊙Wh‖² + const. Score matching
sees only the score at the data, which a far-away component does not change; and at K=0 the
hidden bias c gets no gradient at all (the score ∇_v log p(v,h) = −(v−b)/σ² + Wh has no c, and
without the unroll nothing carries c's effect on q into the outer loss). So nothing holds back
the weight π_h of a configuration h that the data never uses: if W grows, ½‖σ⊙Wh‖² sends the
mass of Z to such an h, log Z grows, and the log-likelihood of every test point falls with it,
while the score near the data can still be right.

What is recorded every `--every` iterations, for BiSSM K=0 and K=5 from the same start
(`bench_paper_loglik.experiment_config`: the reference set-up):
    test_loglik     exact mean log p(v) over the test set
    tv_pi_usage     ½ Σ_h |π_h − u_h|, where u_h = mean over test points of the model's p(h|v).
                    For a model that fits, u ≈ π (Bayes: E_{v~p}[p(h|v)] = π_h); near 1 means the
                    mass of Z sits on states the data does not use.
    top_h, top_pi, top_usage, top_distance
                    the most probable state, its weight, its usage by the test data, and the
                    distance of its component mean b + σ²Wh from the nearest test point
    w_norm, c_change, log_sigma
                    ‖W‖_F, ‖c − c_0‖ (0 at K=0 if c gets no gradient), mean log σ
    q_kl            mean KL(q(h|v) ‖ p(h|v)) over test points: how well φ tracks θ's posterior
                    (absent for learners without a posterior)

A learner named `ssm:frozen_c` is SSM on the exact free energy with c held at its initial draw:
whether frozen thresholds alone make the same runaway, without any posterior.

    nice .venv/bin/python bench/bissm_k0_divergence.py --steps 20000 --every 500 --out bench/results
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/ siblings

from bench_paper_loglik import experiment_config

from distributed_bism.models import unwrap
from distributed_bism.training.loop import TrainLoop


@torch.no_grad()
def snapshot(loop: TrainLoop, c0: torch.Tensor) -> dict[str, Any]:
    """The quantities of the module docstring for the loop's current model."""
    energy = unwrap(loop.replica.energy)
    v = loop.test_data
    states = energy.hidden_states(0, 2**energy.h_dim)  # (S, H)
    log_pi = torch.log_softmax(energy.hidden_log_weight(states), 0)  # (S,)
    p = torch.sigmoid(energy.posterior_logits(v))  # (N, H): the model's p(h_j = 1 | v)
    # p(h|v) for every state: Π_j p_j^h_j (1 − p_j)^(1 − h_j), (N, S)
    log_post = (states[None] * torch.log(p[:, None] + 1e-30) + (1 - states[None]) * torch.log1p(-p[:, None])).sum(-1)
    usage = log_post.exp().mean(0)  # (S,)
    top = int(log_pi.argmax())
    mean_top = energy.visible_mean(states[top])  # (D,)
    row = {
        "test_loglik": float(energy.log_likelihood(v).mean()),
        "tv_pi_usage": float(0.5 * (log_pi.exp() - usage).abs().sum()),
        "top_h": [int(x) for x in states[top].tolist()],
        "top_pi": float(log_pi[top].exp()),
        "top_usage": float(usage[top]),
        "top_distance": float((v - mean_top).norm(dim=-1).min()),
        "w_norm": float(energy.W.norm()),
        "c_change": float((energy.c - c0).norm()),
        "log_sigma": float(energy.log_sigma.mean()),
    }
    if loop.replica.posterior is not None:
        q = torch.sigmoid(unwrap(loop.replica.posterior)(v))  # (N, H)
        kl = (q * (torch.log(q + 1e-30) - torch.log(p + 1e-30))
              + (1 - q) * (torch.log1p(-q + 1e-30) - torch.log1p(-p + 1e-30))).sum(-1).mean()
        row["q_kl"] = float(kl)
    return row


def trace(method: str, *, steps: int, every: int, seed: int) -> dict[str, Any]:
    """Train `method` on the checkerboard with the library's loop, one iteration at a time."""
    learner, _, variant = method.partition(":")
    cfg = experiment_config("checkerboard", learner, steps=steps, eval_every=steps, seed=seed)
    loop = TrainLoop.from_config(cfg, log=lambda s: None)
    c0 = unwrap(loop.replica.energy).c.detach().clone()
    if variant == "frozen_c":  # a zero gradient from the start: Adam's moments stay 0, c never moves
        unwrap(loop.replica.energy).c.register_hook(torch.zeros_like)
    elif variant:
        raise SystemExit(f"unknown variant {variant!r} of {learner} (known: frozen_c)")
    rows = {0: snapshot(loop, c0)}
    start = time.perf_counter()
    while loop.step < steps:
        loop.run_step(loop.batches(loop.step))
        if loop.step % every == 0:
            rows[loop.step] = snapshot(loop, c0)
    return {"seconds": time.perf_counter() - start, "trace": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20_000)
    parser.add_argument("--every", type=int, default=500)
    parser.add_argument("--seeds", type=int, nargs="*", default=[0])
    parser.add_argument("--methods", nargs="*", default=["bissm_k0", "bissm_k5", "ssm:frozen_c"])
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    results: dict[str, Any] = {}
    for seed in args.seeds:
        for m in args.methods:
            r = trace(m, steps=args.steps, every=args.every, seed=seed)
            last = r["trace"][max(r["trace"])]
            print(f"{m} seed {seed}: loglik {last['test_loglik']:.3f}  tv(π, usage) {last['tv_pi_usage']:.3f}  "
                  f"top h {last['top_h']} π {last['top_pi']:.3f} usage {last['top_usage']:.4f}  "
                  f"|W| {last['w_norm']:.2f}  c moved {last['c_change']:.3f}  ({r['seconds']:.0f} s)", flush=True)
            results[f"{m}_seed{seed}"] = r
    meta = {"machine": platform.platform(), "processor": platform.processor() or "unknown",
            "torch": torch.__version__, "threads": torch.get_num_threads(), "steps": args.steps,
            "command": "nice .venv/bin/python bench/bissm_k0_divergence.py " + " ".join(sys.argv[1:])}
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"bissm_k0_divergence_{args.steps}"
    stem.with_suffix(".json").write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    plot(results, stem.with_suffix(".png"))
    print(f"wrote {stem}.json and .png")


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [("test_loglik", "exact test log-likelihood"), ("tv_pi_usage", "TV(π, usage by test data)"),
            ("w_norm", "‖W‖_F"), ("c_change", "‖c − c₀‖")]
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.4))
    for name, r in results.items():
        steps = sorted(r["trace"], key=int)
        for ax, (k, label) in zip(axes, keys):
            ys = [r["trace"][s][k] for s in steps]
            if k == "test_loglik":
                ys = [max(y, -10.0) for y in ys]  # clipped: the collapse goes to −50
            ax.plot([int(s) for s in steps], ys, label=name)
            ax.set(xlabel="iteration", title=label + (" (clipped at −10)" if k == "test_loglik" else ""))
    axes[0].axhline(math.log(2), color="k", ls="--", lw=0.8)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
