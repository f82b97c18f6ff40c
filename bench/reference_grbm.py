"""Exact test log-likelihood of the *reference* BiSM code (baofff/BiSM) on its checkerboard GRBM.

Runs the reference's own config (configs/grbm/toy/grbm_toy_*.yml), data, model, criterions and
training loop (`runners.BaseRunner.fit`), seed 1234 as in its main.py, with n_its reduced to
--its and its own evaluators switched off; a hook on `criterion.update` computes log p(v) on its
10k-point test set exactly (sum over the 2^H hidden states; closed-form log Z) every --every
iterations. One learner per subprocess (the reference keeps a global config), one at a time.

Reference worktree and its one extra dependency (nothing is installed into .venv):
    mkdir -p /tmp/refrun/BiSM
    git -C /work/.mirror/baofff+BiSM/repo archive HEAD | tar -x -C /tmp/refrun/BiSM
    # (or: git clone https://github.com/baofff/BiSM /tmp/refrun/BiSM; tested at 2909ca26)
    .venv/bin/pip install --no-deps --target /tmp/refrun/deps higher==0.2.1
Run (about 35 min single-threaded on the 2-core dev VM; BiSM K=5 dominates):
    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 nice .venv/bin/python bench/reference_grbm.py \
        --ref /tmp/refrun/BiSM --deps /tmp/refrun/deps
No reference file is modified; tensorboard, seaborn and torchvision (used only for logging and
plots) are replaced by empty stand-ins in sys.modules.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import platform
import subprocess
import sys
import time
import types
from pathlib import Path

import torch

# learner -> (config suffix, overrides of the reference config); the order is the run order
LEARNERS: dict[str, tuple[str, dict[str, dict[str, int]]]] = {
    "bidsm_k0": ("bidsm", {"update": {"n_unroll": 0}}),
    "dsm": ("dsm", {}),
    "cd1": ("cd", {"loss": {"k": 1}}),
    "bidsm_k5": ("bidsm", {"update": {"n_unroll": 5}}),
    "bissm_k0": ("bissm", {"update": {"n_unroll": 0}}),
    "ssm": ("ssm", {}),
    "pcd1": ("pcd", {"loss": {"k": 1}}),
    "bissm_k5": ("bissm", {"update": {"n_unroll": 5}}),
}
SHIMS = ["torch.utils.tensorboard.SummaryWriter -> no-op", "seaborn -> empty module",
         "torchvision{,.utils,.datasets,.transforms} -> empty modules (installed one fails to import)"]


def install_shims() -> None:
    def stub(name: str, **attrs: object) -> types.ModuleType:
        sys.modules[name] = mod = types.ModuleType(name)
        mod.__dict__.update(attrs)
        return mod

    class NoWriter:
        def __init__(self, *args: object, **kwargs: object) -> None: ...
        def add_scalar(self, *args: object, **kwargs: object) -> None: ...

    stub("torch.utils.tensorboard", SummaryWriter=NoWriter)
    stub("seaborn")
    stub("torchvision", utils=stub("torchvision.utils", make_grid=None, save_image=None),
         datasets=stub("torchvision.datasets"), transforms=stub("torchvision.transforms"))


def grbm_terms(model: torch.nn.Module) -> tuple[torch.Tensor, ...]:
    """Float64 copies of the reference GRBM's (W, b_v, b_h, log_std) and all 2^H hidden states."""
    w, bv, bh, ls = (p.detach().double() for p in (model.W, model.b_v, model.b_h, model.log_std))
    hs = torch.tensor(list(itertools.product([0.0, 1.0], repeat=w.shape[1])), dtype=torch.float64)
    return w, bv, bh, ls, hs


def exact_loglik(model: torch.nn.Module, v: torch.Tensor) -> torch.Tensor:
    """log p(v) for E(v,h) = ½Σ(v-b_v)²/σ² - b_h·h - (vW)·h  (the reference's `energy_net`)."""
    w, bv, bh, ls, hs = grbm_terms(model)
    v = v.double()
    neg_e = (-0.5 * ((v - bv) ** 2 * (-2 * ls).exp()).sum(-1, keepdim=True)
             + hs @ bh + (v @ w) @ hs.T)  # (N, 2^H)
    a = hs @ w.T  # ∫ exp(-E) dv = Π_i √(2π) σ_i exp(b_v·a + ½ Σ σ_i² a_i²), a = W h
    log_z = (torch.logsumexp(hs @ bh + a @ bv + 0.5 * (a ** 2 * (2 * ls).exp()).sum(-1), 0)
             + ls.sum() + 0.5 * len(bv) * math.log(2 * math.pi))
    return torch.logsumexp(neg_e, 1) - log_z


def checks(model: torch.nn.Module, v: torch.Tensor) -> dict[str, float]:
    """Our energy vs the reference's energy_net/free_energy_net, and ∫p(v)dv on a 2-D grid."""
    w, bv, bh, ls, hs = grbm_terms(model)
    h = hs[torch.arange(len(v)) % len(hs)]  # no RNG use: training stream untouched
    mine = 0.5 * ((v.double() - bv) ** 2 * (-2 * ls).exp()).sum(-1) - h @ bh - ((v.double() @ w) * h).sum(-1)
    e_err = (mine - model.energy_net(v, h.float()).double()).abs().max().item()
    lp = exact_loglik(model, v)
    f_err = (lp + model.free_energy_net(v).double() - (lp + model.free_energy_net(v).double()).mean()).abs().max()
    centres, s = bv + (hs @ w.T) * (2 * ls).exp(), ls.exp()
    lo, hi = (centres - 10 * s).min(0).values, (centres + 10 * s).max(0).values
    axes = [torch.linspace(lo[i].item(), hi[i].item(), 1201, dtype=torch.float64) for i in range(2)]
    grid = torch.stack(torch.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 2)
    cell = (axes[0][1] - axes[0][0]) * (axes[1][1] - axes[1][0])
    return {"energy_max_abs_err": e_err, "free_energy_max_abs_err_up_to_const": f_err.item(),
            "grid_integral_p": (exact_loglik(model, grid).exp().sum() * cell).item()}


def child(args: argparse.Namespace) -> dict:
    """Train one learner with the reference code in this process; its exact log-lik curve."""
    torch.set_num_threads(1)
    sys.path[:0] = [str(args.ref), str(args.deps)]
    install_shims()
    import logging
    import random

    import numpy as np
    from utils import load_yaml  # the reference's modules from here on
    from utils.config import config
    from utils.writer import writer

    suffix, overrides = LEARNERS[args.child]
    cfg = load_yaml(str(args.ref / f"configs/grbm/toy/grbm_toy_{suffix}.yml"))
    for section, kv in overrides.items():
        cfg[section].update(kv)
    cfg["training"]["n_its"] = args.its
    cfg["evaluate_options"] = {k: False for k in cfg["evaluate_options"]}
    ws = args.work / args.child
    cfg.update(device=torch.device("cpu"), workspace_root=str(ws))
    config.set_config(cfg)
    writer.set_path(str(ws / "summary"))
    ws.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(filename=ws / "train.log", level=logging.INFO, force=True)
    seed = cfg["others"]["seed"]
    torch.manual_seed(seed), np.random.seed(seed), random.seed(seed)  # as main.py's init()
    from runners import BaseRunner

    runner = BaseRunner()
    test = runner.data_factory.test.array
    out: dict = {"config": cfg | {"device": "cpu"}, "n_test": len(test), "loglik": {}, "train_seconds": 0.0}
    out["checks_init"] = checks(runner.model, test)
    params0 = {n: p.detach().clone() for n, p in runner.model.named_parameters()}
    update, deadline = runner.criterion.update, time.time() + args.budget_s

    def hooked(v: torch.Tensor, r: BaseRunner) -> None:
        if r.it % args.every == 0:
            out["loglik"][r.it] = exact_loglik(r.model, test).mean().item()
            if time.time() > deadline:
                raise TimeoutError(f"budget reached at it {r.it}")
        t0 = time.perf_counter()
        update(v, r)
        out["train_seconds"] += time.perf_counter() - t0
        if r.it == 0:
            out["params_with_grad_it0"] = [n for n, p in r.model.named_parameters()
                                           if p.grad is not None and p.grad.abs().sum() > 0]

    runner.criterion.update = hooked
    try:
        runner.fit()
        out["loglik"][args.its] = exact_loglik(runner.model, test).mean().item()
    except (RuntimeError, ValueError, TimeoutError) as e:  # a diverged or timed-out run still reports its curve so far
        out["error"] = repr(e)
    out["iterations"] = runner.it
    out["sec_per_it"] = out["train_seconds"] / max(runner.it, 1)
    out["param_change"] = {n: (p.detach() - params0[n]).norm().item() for n, p in runner.model.named_parameters()}
    out["final_params"] = {n: p.detach().tolist() for n, p in runner.model.named_parameters()}
    out["checks_final"] = checks(runner.model, test) if torch.isfinite(runner.model.W).all() else None
    return out


def plot(results: dict, path: Path) -> None:
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 5))
    for name, r in results.items():
        its = sorted(int(i) for i in r["loglik"])
        ax.plot(its, [r["loglik"][str(i)] for i in its], marker=".", label=name)
    ax.axhline(math.log(2), color="k", ls=":", label="data entropy bound, log 2")
    ax.set(xlabel="iteration", ylabel="exact test log-likelihood", ylim=(-3.0, 0.8),
           title="reference baofff/BiSM GRBM (H=4) on checkerboard, seed 1234")
    ax.grid(alpha=0.3), ax.legend()
    fig.savefig(path, dpi=120, bbox_inches="tight")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ref", type=Path, required=True, help="reference BiSM worktree")
    p.add_argument("--deps", type=Path, required=True, help="directory holding `higher`")
    p.add_argument("--its", type=int, default=20_000)
    p.add_argument("--every", type=int, default=1_000)
    p.add_argument("--learners", nargs="*", default=list(LEARNERS), choices=list(LEARNERS))
    p.add_argument("--budget-min", type=float, default=90.0, help="total wall budget; later learners are skipped")
    p.add_argument("--work", type=Path, default=Path("/tmp/refrun/work"), help="reference workspaces")
    p.add_argument("--out", type=Path, default=Path("bench/results"))
    p.add_argument("--child", choices=list(LEARNERS), help=argparse.SUPPRESS)
    p.add_argument("--budget-s", type=float, default=1e9, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"reference_grbm_{args.its}"
    commit = subprocess.run(["git", "-C", str(args.ref), "rev-parse", "HEAD"], check=False, capture_output=True, text=True)
    meta = {"machine": platform.platform(), "processor": platform.processor(), "python": platform.python_version(),
            "torch": torch.__version__, "threads": 1, "reference": "baofff/BiSM",
            "reference_commit": commit.stdout.strip() or "2909ca26ebc4db1fd4b412eca147ab0d906b1b85 (archive)",
            "patches_to_reference_code": [], "shims": SHIMS, "its": args.its, "every": args.every,
            "config_overrides": {"training/n_its": args.its, "evaluate_options/*": False, "device": "cpu",
                                 **{k: v for k, (_, v) in LEARNERS.items() if v}}}
    results: dict = {}
    t_start = time.time()
    for name in args.learners:
        left = args.budget_min * 60 - (time.time() - t_start)
        if left < 60:
            print(f"{name}: skipped, budget spent", flush=True)
            continue
        cmd = [sys.executable, __file__, "--child", name, "--ref", str(args.ref), "--deps", str(args.deps),
               "--its", str(args.its), "--every", str(args.every), "--work", str(args.work), "--budget-s", str(left)]
        proc = subprocess.run(cmd, check=False, capture_output=True, text=True)
        if proc.returncode != 0:
            results[name] = {"loglik": {}, "error": proc.stderr[-2000:]}
            print(f"{name}: failed\n{proc.stderr[-2000:]}", flush=True)
        else:
            results[name] = json.loads(proc.stdout.strip().splitlines()[-1])
            r = results[name]
            curve = {int(k): v for k, v in r["loglik"].items()}
            print(f"{name:9s} final {curve[max(curve)]:.4f} (it {max(curve)}) best {max(curve.values()):.4f} "
                  f"{r['sec_per_it'] * 1e3:.2f} ms/it {r.get('error', '')}", flush=True)
        stem.with_suffix(".json").write_text(json.dumps({"meta": meta, "results": results}, indent=1))
        plot(json.loads(stem.with_suffix(".json").read_text())["results"], stem.with_suffix(".png"))


if __name__ == "__main__":
    main()
