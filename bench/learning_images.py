"""Do the image methods learn, and which learns fastest? Sample quality against wall-clock time.

Every method trains the library's own loop (`TrainLoop.from_config`, one process, one torch
thread, no Ray, no MLflow) for the same budget of training time on the same data, and is
evaluated at fixed fractions of that budget (evaluation time is not counted against it). The
budget is the process's CPU time: with one thread that is the wall-clock time of a quiet core,
and other jobs on the machine (the benchmark's own second job included) cannot change how much
training a method gets. The lr schedule (cosine) is sized to end with the budget.

    classifier-FID / -KID   of conditional samples (v ~ p(v | h = E_q[h|v_train]), the reference's
                            image sampler) and of marginal samples (annealed Langevin on v with the
                            VaES score: draws of the model itself), against held-out test images
    denoise gain, energy gap (evaluation/learning_signal.py)

Floor and ceiling of the classifier-FID: held-out test images against training images, a
Gaussian fitted to the training pixels, and uniform noise, all with the same sample count.

Methods (configs/ gives each its full recipe; the plain EBM is the same ResNet as E(v), trained
by MDSM, i.e. what a user would train without a latent):

    bimdsm_k0, bimdsm_k1, bimdsm_k5   BiMDSM on the conv EBLVM, N warm-up steps, K unrolled
    bimdsm_k1_shared                  BiMDSM K=1 with one noise draw for all inner steps
    vages_mdsm                        VaGES-MDSM on the conv EBLVM (no unroll)
    bidvl                             BiDVL: marginal energy, encoder and decoder (decoder samples)
    ebm_mdsm                          the plain EBM E(v), MDSM

    nice .venv/bin/python bench/learning_images.py --dataset digits --budget 1200 --jobs 2
    .venv/bin/python bench/learning_images.py --quick --out /tmp/li     # smoke run, a minute

Writes bench/results/learning_images_<dataset>.{json,md,png} and the final sample grids
bench/results/learning_images_<dataset>_<method>.png.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_machine import machine_info  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
CALIBRATION_STEPS = 20

# method → (config file, overrides). The budget and data set are set by the run.
METHODS: dict[str, tuple[str, list[str]]] = {
    "bimdsm_k0": ("demo.yaml", ["objective.unroll_steps=0"]),
    "bimdsm_k1": ("demo.yaml", []),
    "bimdsm_k5": ("demo.yaml", ["objective.unroll_steps=5"]),
    "bimdsm_k1_shared": ("demo.yaml", ["objective.share_inner_noise=true"]),
    "vages_mdsm": ("digits_vages_mdsm.yaml", []),
    "bidvl": ("digits_bidvl.yaml", []),
    "ebm_mdsm": ("digits_ebm_mdsm.yaml", []),
}
# data set → overrides that move a digits config onto it
DATASETS: dict[str, list[str]] = {
    "digits": ["data.name=digits"],
    "fashion_mnist": ["data.name=fashion_mnist", "data.pad=2", "data.n_test=2000"],
}


def build(method: str, dataset: str, extra: list[str]) -> Any:
    from distributed_bism.config import load_config

    path, overrides = METHODS[method]
    return load_config(REPO / "configs" / path, overrides + DATASETS[dataset] + [
        "trainer.strategy=local", "trainer.num_workers=1", "trainer.steps=10000000", "tracking.enabled=false",
        f"trainer.name=bench_{method}"] + extra)


def evaluate(loop: Any, n: int, samplers: list[str]) -> dict[str, Any]:
    """classifier-FID/KID per sampler (and the references), denoise gain, energy gap of the loop's
    current model, and the first 100 samples of each sampler."""
    from distributed_bism.evaluation.metrics import run_metrics

    base = loop.cfg
    cfg = dataclasses.replace(base, eval=dataclasses.replace(base.eval, sampler=samplers[0],
                                                             compare_samplers=samplers[1:], fid_samples=n))
    ctx = _context(loop, cfg)
    names = ["classifier_fid", "classifier_kid"] + ([] if base.objective.name == "bidvl" else ["denoise", "energy_gap"])
    values = run_metrics(names, ctx)
    out: dict[str, Any] = {}
    for i, sampler in enumerate(samplers):
        suffix = f"_{sampler}" if i else ""
        out[f"cfid_{sampler}"] = values.get(f"eval/classifier_fid{suffix}", math.nan)
        out[f"ckid_{sampler}"] = values.get(f"eval/classifier_kid{suffix}", math.nan)
        out[f"samples_{sampler}"] = ctx.shared[f"real_and_fake/{sampler}"][1][:100].cpu().tolist()
    out.update({k.split("/")[-1]: v for k, v in values.items()
                if not k.startswith("eval/classifier_")})
    out["cfid_held_out"], out["cfid_noise"] = values["eval/classifier_fid_held_out"], values["eval/classifier_fid_noise"]
    return out


def _context(loop: Any, cfg: Any) -> Any:
    from distributed_bism.evaluation.metrics import EvalContext
    from distributed_bism.models import unwrap

    r = loop.replica
    return EvalContext(cfg=cfg, energy=unwrap(r.energy), posterior=unwrap(r.posterior) if r.posterior else None,
                       train_data=loop.batches.data, test_data=loop.test_data, image_shape=loop.image_shape,
                       step=loop.step, device=r.device)


def samplers_of(cfg: Any) -> list[str]:
    if cfg.objective.name == "bidvl":
        return ["bidvl_decoder"]
    if cfg.posterior.name == "encoder_decoder" or cfg.model.name.startswith("marginal"):
        return ["marginal_langevin"]
    return ["conditional", "marginal_langevin"]


def run_job(job: dict[str, Any], clock: Callable[[], float] = time.process_time) -> dict[str, Any]:
    """Train one method for job["budget"] seconds of training time, evaluating at fractions of it.

    `clock` measures training time (this process's CPU time; a test passes a fake one)."""
    import torch

    torch.set_num_threads(1)
    from distributed_bism.training.loop import TrainLoop
    from distributed_bism.training.optim import LRSchedule

    cfg = build(job["method"], job["dataset"], job["overrides"])
    loop = TrainLoop.from_config(cfg, log=lambda s: None)
    samplers = samplers_of(cfg)
    points, trained, budget = [], 0.0, job["budget"]
    marks = [budget * f for f in job["fractions"]]
    # The lr schedule (cosine) must end with the budget: time a few steps, then size it in steps.
    t0 = clock()
    for _ in range(CALIBRATION_STEPS):
        loop.run_step(loop.batches(loop.step))
    trained = clock() - t0
    total = max(CALIBRATION_STEPS + 1, int(budget / (trained / CALIBRATION_STEPS)))
    o = cfg.optim
    loop.schedules = (LRSchedule(o.lr, o.schedule, total, o.min_lr, warmup=o.warmup_steps),
                      LRSchedule(o.posterior_lr, o.schedule, total, o.min_lr, warmup=o.warmup_steps))
    bad = 0
    while marks:
        t0 = clock()
        while trained + (clock() - t0) < marks[0] and loop.step < total:
            loop.run_step(loop.batches(loop.step))
        trained += clock() - t0
        marks.pop(0)
        e0 = time.perf_counter()
        point = {"train_s": trained, "step": loop.step, **evaluate(loop, job["n"], samplers)}
        point["eval_s"] = time.perf_counter() - e0
        bad = loop.bad_steps
        points.append(point)
        print(f"[{job['method']}] {trained:.0f}s step {loop.step} " + "  ".join(
            f"{k} {v:.3g}" for k, v in point.items() if isinstance(v, float) and k not in ("train_s",)), flush=True)
    return {**job, "points": points, "bad_steps": bad, "samplers": samplers}


def reference_points(dataset: str, n: int) -> dict[str, float]:
    """classifier-FID of held-out data, a pixel Gaussian and uniform noise against test images."""
    import torch

    from distributed_bism.config import DataConfig
    from distributed_bism.data import load_dataset
    from distributed_bism.evaluation.classifier_fid import feature_classifier, frechet_distance

    torch.set_num_threads(1)
    over = dict(o.split("=", 1) for o in DATASETS[dataset])
    dcfg = DataConfig(name=dataset, pad=int(over.get("data.pad", 0)), n_test=int(over["data.n_test"])
                      if "data.n_test" in over else None)
    train, test = load_dataset(dcfg)
    clf = feature_classifier(dataset)
    n = min(n, len(test))
    real = clf.features(test[:n])
    gen = torch.Generator().manual_seed(0)
    flat = train.flatten(1)
    mean, cov = flat.mean(0), torch.cov(flat.T) + 1e-5 * torch.eye(flat.shape[1])
    torch.manual_seed(0)  # the Gaussian's draw, like the noise, is the same in every report
    gauss = torch.distributions.MultivariateNormal(mean.double(), cov.double()).sample((n,)).float()
    return {"held_out": frechet_distance(real, clf.features(train[:n])),
            "pixel_gaussian": frechet_distance(real, clf.features(gauss.reshape(n, *train.shape[1:]).clamp(0, 1))),
            "uniform_noise": frechet_distance(real, clf.features(torch.rand((n, *train.shape[1:]), generator=gen)))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dataset", default="digits", choices=sorted(DATASETS))
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--budget", type=float, default=1200.0, help="training CPU seconds per method (one thread)")
    ap.add_argument("--fractions", type=float, nargs="+", default=[0.1, 0.25, 0.5, 1.0])
    ap.add_argument("--n", type=int, default=500, help="samples per classifier-FID")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--override", nargs="*", default=[], help="config overrides for every method")
    ap.add_argument("--tag", default="", help="suffix of the output files")
    ap.add_argument("--quick", action="store_true", help="a smoke run: 20 s per method, 100 samples")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--resume", action="store_true", help="reuse the methods a previous run of the same stem finished")
    a = ap.parse_args()
    if a.quick:
        a.budget, a.fractions, a.n, a.tag = 20.0, [0.5, 1.0], 100, a.tag or "quick"
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    info, start = machine_info(), time.perf_counter()
    stem = f"learning_images_{a.dataset}" + (f"_{a.tag}" if a.tag else "")
    # Each finished method is kept in <stem>.jobs/ (not committed), so a failure or a kill loses
    # only the methods still running; --resume reuses what is there.
    done_dir = a.out / f"{stem}.jobs"
    done_dir.mkdir(parents=True, exist_ok=True)
    results = [json.loads((done_dir / f"{m}.json").read_text()) for m in a.methods
               if a.resume and (done_dir / f"{m}.json").is_file()]
    todo = [m for m in a.methods if m not in {r["method"] for r in results}]
    jobs = [{"method": m, "dataset": a.dataset, "budget": a.budget, "fractions": a.fractions, "n": a.n,
             "overrides": a.override} for m in todo]
    with ProcessPoolExecutor(max_workers=a.jobs) as pool:
        futures = {pool.submit(run_job, j): j for j in jobs}
        refs = pool.submit(reference_points, a.dataset, a.n)
        for f in as_completed(futures):
            try:
                result = f.result()
            except Exception as e:  # a method that fails is reported as failed; the others still count
                result = {**futures[f], "points": [], "samplers": [], "error": f"{type(e).__name__}: {e}"}
                print(f"[{result['method']}] failed: {result['error']}", flush=True)
            (done_dir / f"{result['method']}.json").write_text(json.dumps(result))
            results.append(result)
        reference = refs.result()
    from learning_images_report import write_report

    write_report(a.out, stem, results, reference, info=info, wall_s=time.perf_counter() - start,
                 args={k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()})
    print(f"wrote {a.out / stem}.json/.md/.png")


if __name__ == "__main__":
    main()
