"""Benchmark against the BiSM paper's claim "BiSM is comparable to CD and SM when they are applicable".

Trains Gaussian RBMs with eight learners under an equal budget (the same number of iterations,
batch size, optimiser and learning rate for every learner) and records the exact test
log-likelihood (enumeration of h) along the way:

    cd1, pcd1      contrastive divergence, 1 Gibbs sweep (persistent chains for pcd1)
    dsm            denoising score matching on the exact free energy, σ = 0.05
    ssm            sliced score matching on the exact free energy
    bidsm_k0/k5    BiDSM, N = 5 warm-up steps, K = 0 / 5 unrolled Adam steps, KL lower level
    bissm_k0/k5    BiSSM, N = 5, K = 0 / 5, KL lower level

on two data sets (docs/methods.md §2 hyperparameters, `experiments.checkerboard_grbm`: the reference
initialisation, Adam 1e-3 with betas (0.9, 0.95) for θ and φ, batch 100, linear Bernoulli posterior
with τ = 0.1):

    checkerboard   v = 2, H = 4, 60 000 training points (the reference's toy set-up)
    digits         scikit-learn's 8×8 digits as 64-d vectors, dequantised (data.dequantize: each
                   pixel uniform within its level, [k/17, (k+1)/17)), H = 16 (exact log Z). Without
                   dequantisation the log-likelihood is unbounded: 3 pixels are 0 in every image,
                   and a learner that shrinks their σ_i gains without end (measured: BiSSM took
                   their log σ to −9.3 in 4000 iterations, CD-1 to −4.0, DSM stays at log 0.05).

Every run is the library's own training loop (`TrainLoop.from_config`, one process, no Ray, no
MLflow), through `learning_grbm.train_curve`. Runs are independent jobs spread over `--jobs`
processes with one torch thread each. Writes bench/results/paper_loglik.{json,md,png}
(`--quick`: paper_loglik_quick.*, a smoke run whose numbers are not results).

    nice .venv/bin/python bench/bench_paper_loglik.py --jobs 1          # the measurement: 39 min on one core
    nice .venv/bin/python bench/bench_paper_loglik.py --jobs 1 --datasets checkerboard --seeds 0 \
        --steps 100000 --tag 100k --methods cd1 pcd1 dsm ssm bidsm_k0 bidsm_k5 bissm_k0 bissm_k5 \
        --reuse bench/results/paper_loglik_100k.json                       # the 100k subset
    .venv/bin/python bench/bench_paper_loglik.py --quick --out /tmp/b   # smoke run, seconds

`--reuse A.json B.json` takes the runs already in earlier results (same data set, learner, seed,
iterations and evaluation interval) instead of training them again, and reports them with the new
ones: a longer budget can be extended by a learner or a seed at a time.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/ siblings, also in spawned workers

from bench_machine import CpuSampler, machine_info  # noqa: E402
from learning_grbm import train_curve  # noqa: E402
from paper_report import BASELINES, BISM_METHODS, write_report  # noqa: E402

from distributed_bism.config import Config, apply_overrides, from_dict  # noqa: E402
from distributed_bism.experiments import checkerboard_grbm  # noqa: E402

# learner → (the checkerboard_grbm learner it starts from, objective keys replaced)
METHODS: dict[str, tuple[str, dict[str, Any]]] = {
    "cd1": ("cd1", {}),
    "pcd1": ("pcd1", {}),
    "dsm": ("dsm", {}),
    "ssm": ("dsm", {"name": "ssm"}),
    "bidsm_k0": ("bidsm_k0", {}),
    "bidsm_k5": ("bidsm_k5", {}),
    "bissm_k0": ("bidsm_k0", {"name": "bissm"}),
    "bissm_k5": ("bidsm_k5", {"name": "bissm"}),
}
assert set(METHODS) == set(BASELINES) | set(BISM_METHODS)

# data set → dotted overrides on top of the checkerboard set-up, and the default budget
DATASETS: dict[str, dict[str, Any]] = {
    "checkerboard": {"overrides": [], "steps": 20_000, "eval_every": 500},
    "digits": {"overrides": ["data.name=digits", "data.n_train=null", "data.dequantize=true", "model.h_dim=16"],
               "steps": 4_000, "eval_every": 200},
}
QUICK = {"steps": 40, "eval_every": 20}

# relative cost of one iteration (measured on the checkerboard, one thread, 2026-12-02: 0.95-1.1 ms
# for cd/pcd/dsm, 1.5 ssm, 3.9-4.1 bidsm_k0/bissm_k0, 8.7-9.0 bidsm_k5/bissm_k5), to start the
# longest jobs first
COST = {"cd1": 1.0, "pcd1": 1.0, "dsm": 1.0, "ssm": 1.3, "bidsm_k0": 4.0, "bissm_k0": 4.4, "bidsm_k5": 9.0, "bissm_k5": 10.0}


def experiment_config(dataset: str, method: str, *, steps: int, eval_every: int, seed: int) -> Config:
    """The Config of one run: the reference checkerboard GRBM set-up, the learner's objective,
    the data set's overrides; exact test log-likelihood every `eval_every` steps, no tracking."""
    base, objective = METHODS[method]
    cfg = checkerboard_grbm(base, steps=steps, log_every=eval_every, eval_every=eval_every, seed=seed)
    cfg["objective"].update(objective)
    apply_overrides(cfg, [*DATASETS[dataset]["overrides"], "eval.metrics=[test_loglik]",
                          "tracking.enabled=false", f"trainer.checkpoint_every={steps}"])
    return from_dict(Config, cfg)


def run_job(job: dict[str, Any]) -> dict[str, Any]:
    """One training run, in a worker process with one torch thread."""
    import torch

    torch.set_num_threads(1)
    cfg = experiment_config(job["dataset"], job["method"], steps=job["steps"], eval_every=job["eval_every"],
                            seed=job["seed"])
    t0 = time.time()
    out = train_curve(cfg)
    curve = {int(k): float(v) for k, v in out["test_loglik"].items()}
    return {**job, "seconds": out["seconds"], "t_start": t0, "t_end": time.time(), "test_loglik": curve}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="*", default=list(DATASETS), choices=list(DATASETS))
    parser.add_argument("--methods", nargs="*", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, help="iterations for every data set (default: per data set)")
    parser.add_argument("--jobs", type=int, default=1, help="worker processes (one torch thread each)")
    parser.add_argument("--rel-tol", type=float, default=0.05,
                        help="'comparable' tolerance: this fraction of the baseline's gain over the initial model")
    parser.add_argument("--quick", action="store_true", help=f"smoke run: {QUICK['steps']} iterations, seed 0")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--tag", help="write paper_loglik_<tag>.* (e.g. a longer budget on a subset) instead of paper_loglik.*")
    parser.add_argument("--reuse", type=Path, nargs="*", default=[], metavar="JSON",
                        help="earlier results whose runs are taken instead of training them again")
    args = parser.parse_args()
    reused = load_runs(args.reuse)
    seeds = [0] if args.quick else args.seeds
    jobs = []
    for ds in args.datasets:
        budget = QUICK if args.quick else DATASETS[ds]
        steps = args.steps or budget["steps"]
        jobs += [{"dataset": ds, "method": m, "seed": s, "steps": steps, "eval_every": min(budget["eval_every"], steps)}
                 for m in args.methods for s in seeds]
    wanted = {run_key(j) for j in jobs}
    reused = [r for r in reused if run_key(r) in wanted]
    jobs = [j for j in jobs if run_key(j) not in {run_key(r) for r in reused}]
    jobs.sort(key=lambda j: -COST[j["method"]] * j["steps"])
    for job in jobs:  # a bad combination fails here, before any training
        experiment_config(job["dataset"], job["method"], steps=job["steps"], eval_every=job["eval_every"],
                          seed=job["seed"])

    machine = machine_info()
    sampler = CpuSampler(interval=1.0)
    sampler.start()
    start = time.perf_counter()
    print(f"{len(jobs)} runs on {args.jobs} process(es), {len(reused)} reused; load average {os.getloadavg()[0]:.2f}",
          flush=True)
    if args.jobs == 1:
        results = [_announce(run_job(j)) for j in jobs]
    else:
        with ProcessPoolExecutor(max_workers=args.jobs) as pool:
            results = [_announce(f.result()) for f in as_completed([pool.submit(run_job, j) for j in jobs])]
    wall = time.perf_counter() - start
    sampler.sample()
    sampler.stop()
    for r in results:
        r["cores"] = sampler.cores(r["t_start"], r["t_end"])
    results += reused
    machine.update(wall_s=wall, jobs=args.jobs, torch_threads_per_job=1, loadavg_end=os.getloadavg(),
                   cores_whole_run=sampler.cores(sampler.samples[0][0], sampler.samples[-1][0]))
    if reused:
        machine["reused"] = {f: sum(r["reused_from"] == f for r in reused) for f in sorted({r["reused_from"] for r in reused})}
    command = "nice .venv/bin/python bench/bench_paper_loglik.py " + " ".join(sys.argv[1:])
    stem = "paper_loglik_quick" if args.quick else f"paper_loglik_{args.tag}" if args.tag else "paper_loglik"
    paths = write_report(results, machine=machine, command=command, rel_tol=args.rel_tol, out=args.out, stem=stem)
    print("wrote " + ", ".join(str(p) for p in paths))


def run_key(run: dict[str, Any]) -> tuple[str, str, int, int, int]:
    """What makes two runs the same measurement."""
    return (run["dataset"], run["method"], int(run["seed"]), int(run["steps"]), int(run["eval_every"]))


def load_runs(paths: list[Path]) -> list[dict[str, Any]]:
    """The runs stored in earlier results JSONs (curves keyed by int step), each marked with its file."""
    runs: dict[tuple[str, str, int, int, int], dict[str, Any]] = {}
    for path in paths:
        if not path.is_file():
            raise SystemExit(f"bench_paper_loglik: --reuse {path}: no such file")
        for r in json.loads(path.read_text())["runs"]:
            runs.setdefault(run_key(r), {**r, "test_loglik": {int(k): float(v) for k, v in r["test_loglik"].items()},
                                         "reused_from": r.get("reused_from", path.name)})
    return list(runs.values())


def _announce(r: dict[str, Any]) -> dict[str, Any]:
    final = r["test_loglik"][max(r["test_loglik"])]
    print(f"{r['dataset']:12s} {r['method']:9s} seed {r['seed']}  final {final:9.4f}  ({r['seconds']:.0f} s)", flush=True)
    return r


if __name__ == "__main__":
    main()
