#!/usr/bin/env python
"""Wall time and peak memory of ONE bi-level training iteration against the unroll depth K.

One iteration = N = 5 warm-up steps on φ + K unrolled (differentiable) steps + the higher-level
loss + its backward + the θ optimiser step (METHODS.md §1). It is measured for

    ours          distributed_bism.bilevel.step_from_config (functional Adam unroll on dicts)
    ours_shared   the same with share_inner_noise=True. NOT the same estimator: one noise draw
                  serves all N + K inner steps. Reported as its own series, never as "ours".
    higher        the reference formulation written on the `higher` library (innerloop_ctx +
                  DifferentiableAdam), reusing our loss functions so that the estimator is the
                  same as "ours" (checked: same θ-gradient under the same RNG stream).

on three configurations: the checkerboard Gaussian RBM (batch 100) and the conv EBLVM at
1×32×32 (batch 16 and 64). Each configuration runs in a fresh subprocess; inside it the three
implementations hold their own identically seeded models and are timed in interleaved,
rotated order, so that a drifting machine load hits them alike.

Peak memory: torch's CPU allocations bypass tracemalloc, so we measure resident memory. Before
each timed iteration we run gc + malloc_trim(0) (hand freed heap pages back to the OS), reset
the kernel's RSS high-water mark (write "5" to /proc/self/clear_refs) and read VmRSS; after
it, VmHWM. The difference is the iteration's peak extra resident memory. Where the reset is not
allowed we fall back to the child's ru_maxrss (lifetime peak; marked in the JSON).

Usage: .venv/bin/python bench/bench_bilevel.py [--quick] [--out DIR] (see --help).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import importlib.metadata
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Protocol

RESULT_MARK = "@@BENCH_RESULT@@ "
IMPLS = ("ours", "ours_shared", "higher")
IMPL_LABELS = {
    "ours": "ours (functional unroll)",
    "ours_shared": "ours, share_inner_noise=True (different estimator)",
    "higher": "higher 0.2.1 (reference formulation)",
}
WARMUP_STEPS = 5  # N, as in the reference configs


# ============================================================================ configuration
@dataclass(frozen=True)
class BenchConfig:
    """One model/batch configuration and how much to measure it.

    warmup_iters: untimed iterations per implementation at K=1 before anything is timed (the
        conv nets create their oneDNN kernels and the allocator grows its pools here).
    warmup_per_k: further untimed iterations per implementation at each K.
    repeats: timed iterations per (implementation, K); the median is reported.
    plain_repeats: timed single lower-level steps per implementation.
    """

    name: str
    model: str  # grbm | conv
    batch: int
    ks: tuple[int, ...] = (0, 1, 2, 5, 10)
    warmup_iters: int = 1
    warmup_per_k: int = 0
    repeats: int = 3
    plain_repeats: int = 5
    check: bool = True  # run the ours-vs-higher gradient equivalence check in this child


# Repeats are the fewest that still give a median: the default run takes ~13 minutes single-
# threaded on a 2-core cloud VM, ~60% of it in conv-b64. A conv iteration costs seconds (an
# 11M-parameter ResNet, differentiated twice), over a minute at batch 64 and K=10, so the conv
# configurations get one or two repeats; raise them with --repeats on a bigger machine. The
# GRBM costs milliseconds and gets many.
FULL_CONFIGS = (
    BenchConfig("grbm", "grbm", 100, warmup_iters=3, warmup_per_k=3, repeats=30, plain_repeats=100),
    BenchConfig("conv-b16", "conv", 16, repeats=2, plain_repeats=3),
    # No equivalence check here: the estimator does not depend on the batch size (checked at 16).
    BenchConfig("conv-b64", "conv", 64, repeats=1, plain_repeats=2, check=False),
)
QUICK_CONFIGS = (
    BenchConfig("grbm", "grbm", 100, warmup_iters=2, warmup_per_k=1, repeats=5, plain_repeats=10),
    BenchConfig("conv-b16", "conv", 16, ks=(0, 1), warmup_iters=1, repeats=1, plain_repeats=1),
)


@dataclass(frozen=True)
class ChildSpec:
    """What a child process measures (passed as JSON on its command line)."""

    config: BenchConfig
    threads: int
    seed: int
    check: bool  # allow the ours-vs-higher gradient equivalence check (--no-check clears it)


# ============================================================================ peak memory
class PeakRSS:
    """Peak resident memory of a code region, as a delta over the RSS at its start (MiB)."""

    def __init__(self) -> None:
        try:
            self._libc: ctypes.CDLL | None = ctypes.CDLL("libc.so.6")
        except OSError:
            self._libc = None
        self.method = "VmHWM-reset" if self._reset_hwm() else "ru_maxrss"
        self._base_kib = 0

    @staticmethod
    def _status_kib(key: str) -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
        raise KeyError(key)

    @staticmethod
    def _reset_hwm() -> bool:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # Linux >= 4.0: reset the peak RSS to the current RSS
            return True
        except OSError:
            return False

    def start(self) -> None:
        """Drop freed memory, then mark the current RSS as the baseline."""
        gc.collect()
        if self._libc is not None:
            self._libc.malloc_trim(0)  # otherwise freed heap pages stay resident and hide growth
        if self.method == "VmHWM-reset":
            self._reset_hwm()
        self._base_kib = self._status_kib("VmRSS")

    def peak_delta_mib(self) -> float:
        """Peak RSS since `start` minus the baseline. With ru_maxrss only the lifetime peak is
        known, so later regions can read too low; the JSON records which method was used."""
        if self.method == "VmHWM-reset":
            peak = self._status_kib("VmHWM")
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
        return (peak - self._base_kib) / 1024


# ============================================================================ the models
@dataclass
class Setup:
    """Models, optimisers and data of one implementation (each owns its own copies)."""

    energy: Any
    posterior: Any
    opt_energy: Any
    opt_posterior: Any
    v: Any
    lr: float
    betas: tuple[float, float]
    objective_kwargs: dict[str, Any]


def build_setup(model: str, batch: int, seed: int) -> Setup:
    """Identically seeded models and data for configuration `model` at batch size `batch`."""
    import torch

    from distributed_bism.models import BernoulliPosterior, ConvEBLVM, GaussianPosterior, GaussianRBM

    torch.manual_seed(seed)
    if model == "grbm":
        # Checkerboard GRBM (METHODS.md §2): Adam 1e-3, BiDSM σ = 0.05, KL lower level.
        energy, posterior = GaussianRBM(2, 4), BernoulliPosterior(2, 4, temperature=0.1)
        v = torch.rand(batch, 2)
        lr, betas = 1e-3, (0.9, 0.999)
        obj = dict(name="bidsm", sigma=0.05, lower_level="kl")
    elif model == "conv":
        # MNIST-sized deep EBLVM: BiMDSM σ ∈ linspace[0.05, 1.2], σ0 = 0.1, Fisher lower level.
        energy = ConvEBLVM((1, 32, 32), 20, ch=64, blocks_per_stage=1)
        posterior = GaussianPosterior((1, 32, 32), 20, encoder="conv")
        v = torch.rand(batch, 1, 32, 32)
        lr, betas = 1e-4, (0.9, 0.95)
        obj = dict(name="bimdsm", sigma_begin=0.05, sigma_end=1.2, sigma_schedule="linear", sigma0=0.1,
                   lower_level="fisher")
    else:
        raise ValueError(f"unknown model {model!r}")
    return Setup(energy, posterior, torch.optim.Adam(energy.parameters(), lr, betas=betas),
                 torch.optim.Adam(posterior.parameters(), lr, betas=betas), v, lr, betas, obj)


def objective_config(setup: Setup, unroll_steps: int, share_inner_noise: bool = False) -> Any:
    from distributed_bism.config import ObjectiveConfig

    return ObjectiveConfig(**setup.objective_kwargs, warmup_steps=WARMUP_STEPS, unroll_steps=unroll_steps,
                           unroll_optimizer="adam", share_inner_noise=share_inner_noise)


# ============================================================================ implementations
class Impl(Protocol):
    s: Setup

    def set_unroll(self, k: int) -> None: ...

    def iteration(self, *, step_theta: bool = True) -> float:
        """One whole iteration; returns the higher-level loss (to check it stays finite)."""
        ...

    def plain_step(self) -> None:
        """One ordinary lower-level optimiser step on φ (θ frozen)."""
        ...


class Ours:
    """distributed_bism's BilevelStep, built exactly as the trainer builds it."""

    def __init__(self, setup: Setup, *, share_inner_noise: bool = False):
        from distributed_bism.bilevel import BilevelStep
        from distributed_bism.objectives import get_objective

        self.s, self.share = setup, share_inner_noise
        self.objective = get_objective(objective_config(setup, 0, share_inner_noise))
        self.plain = BilevelStep(self.objective, warmup_steps=1)  # one warm-up step = one plain step
        self.set_unroll(0)

    def set_unroll(self, k: int) -> None:
        from distributed_bism.bilevel import step_from_config
        from distributed_bism.objectives import get_objective

        cfg = objective_config(self.s, k, self.share)
        self.objective = get_objective(cfg)
        self.step = step_from_config(self.objective, cfg, posterior_lr=self.s.lr, posterior_betas=self.s.betas)

    def iteration(self, *, step_theta: bool = True) -> float:
        s = self.s
        s.opt_energy.zero_grad(set_to_none=True)
        out = self.step(energy=s.energy, v=s.v, posterior=s.posterior, posterior_optimizer=s.opt_posterior)
        if step_theta:
            s.opt_energy.step()
        return float(out.loss)

    def plain_step(self) -> None:
        self.plain.warmup(self.s.energy, self.s.posterior, self.s.v, self.s.opt_posterior)


class Higher:
    """The reference formulation (baofff/BiSM `_update`) on `higher`, with our loss functions.

        warm-up: energy.requires_grad_(False); N × (zero_grad, inner_loss(v).backward(), opt_q.step())
        with higher.innerloop_ctx(q, opt_q) as (fq, diffopt):
            K × diffopt.step(inner_loss(v) using fq)
            loss = outer(v) using fq; loss.backward(); opt_θ.step()
        q.load_state_dict(backup)

    inner_loss(v) draws fresh noise on every call, as the reference does. The energy is called
    as a whole module (f(ṽ) recomputed inside each loss), as the reference does.
    """

    def __init__(self, setup: Setup):
        self.s = setup
        self.set_unroll(0)

    def set_unroll(self, k: int) -> None:
        from distributed_bism.objectives import get_objective

        self.k = k
        self.objective = get_objective(objective_config(self.s, k))

    def _inner_loss(self, q: Any) -> Any:
        from distributed_bism.models.posterior import PosteriorView

        batch = self.objective.perturbation(self.s.v)  # fresh noise per call
        return self.objective.inner_loss(self.s.energy, PosteriorView(module=q), batch).mean()

    def _warmup_step(self) -> None:
        s = self.s
        s.opt_posterior.zero_grad()
        self._inner_loss(s.posterior).backward()
        s.opt_posterior.step()

    def iteration(self, *, step_theta: bool = True) -> float:
        import higher

        from distributed_bism.models.posterior import PosteriorView

        s = self.s
        s.energy.requires_grad_(False)
        s.posterior.requires_grad_(True)
        for _ in range(WARMUP_STEPS):
            self._warmup_step()

        s.energy.requires_grad_(True)
        # As in the reference: state_dict() holds references, not copies; innerloop_ctx never
        # writes q's own parameters (copy_initial_weights=True), so the restore is a no-op copy.
        backup = s.posterior.state_dict()
        with higher.innerloop_ctx(s.posterior, s.opt_posterior) as (fq, diffopt):
            for _ in range(self.k):
                diffopt.step(self._inner_loss(fq))
            batch = self.objective.perturbation(s.v)
            loss = self.objective.outer(s.energy, PosteriorView(module=fq), batch).mean()
            s.opt_energy.zero_grad(set_to_none=True)
            s.posterior.requires_grad_(False)
            loss.backward()
            if step_theta:
                s.opt_energy.step()
        s.posterior.load_state_dict(backup)
        s.posterior.requires_grad_(True)
        return float(loss.detach())

    def plain_step(self) -> None:
        self.s.energy.requires_grad_(False)
        self._warmup_step()
        self.s.energy.requires_grad_(True)


def make_impl(name: str, model: str, batch: int, seed: int) -> Impl:
    setup = build_setup(model, batch, seed)
    if name == "ours":
        return Ours(setup)
    if name == "ours_shared":
        return Ours(setup, share_inner_noise=True)
    if name == "higher":
        return Higher(setup)
    raise ValueError(name)


# ============================================================================ measurements
def equivalence_check(model: str, batch: int, seed: int, k: int = 2) -> dict[str, Any]:
    """Run one iteration of ours and of higher from the same models and the same RNG stream
    and compare dJ/dθ and the persistent φ. Equal up to float error means both compute the same
    estimator (higher's Adam puts eps outside the bias correction, so not bit-for-bit)."""
    import torch

    grads, phis, losses = {}, {}, {}
    for name in ("ours", "higher"):
        impl = make_impl(name, model, batch, seed)
        impl.set_unroll(k)
        torch.manual_seed(seed + 1)  # the same noise stream for both
        losses[name] = impl.iteration(step_theta=False)
        s = impl.s
        # A parameter J does not reach has no .grad (the GRBM's hidden bias c at K=0): count it as 0.
        grads[name] = torch.cat([(torch.zeros_like(p) if p.grad is None else p.grad).flatten()
                                 for p in s.energy.parameters()])
        phis[name] = torch.cat([p.detach().flatten() for p in s.posterior.parameters()])
    g, gh = grads["ours"].double(), grads["higher"].double()  # float32 sums over 11M entries drift
    return {
        "K": k,
        "loss_ours": losses["ours"],
        "loss_higher": losses["higher"],
        "grad_rel_err": float((g - gh).norm() / gh.norm().clamp_min(1e-30)),
        "grad_cosine": float(torch.nn.functional.cosine_similarity(g, gh, dim=0)),
        "phi_max_abs_diff": float((phis["ours"] - phis["higher"]).abs().max()),
    }


def run_child(spec: ChildSpec) -> dict[str, Any]:
    """Measure every (implementation, K) of one configuration in this (fresh) process."""
    import torch

    torch.set_num_threads(spec.threads)
    cfg = spec.config
    log = lambda msg: print(f"[{cfg.name}] {msg}", file=sys.stderr, flush=True)  # noqa: E731
    out: dict[str, Any] = {"config": asdict(cfg), "threads": torch.get_num_threads()}

    if spec.check and cfg.check:
        t0 = time.perf_counter()
        out["equivalence"] = equivalence_check(cfg.model, cfg.batch, spec.seed)
        log(f"equivalence check {out['equivalence']} ({time.perf_counter() - t0:.1f}s)")
        gc.collect()

    impls = {name: make_impl(name, cfg.model, cfg.batch, spec.seed) for name in IMPLS}
    mem = PeakRSS()
    out["memory_method"] = mem.method

    t0 = time.perf_counter()
    for impl in impls.values():
        impl.set_unroll(1)  # K=1 runs every code path (warm-up, unroll, outer)
        for _ in range(cfg.warmup_iters):
            impl.iteration()
    log(f"warm-up done ({time.perf_counter() - t0:.1f}s)")

    # A plain lower-level step, the unit in which an unrolled step's cost is expressed.
    plain: dict[str, list[float]] = {"ours": [], "higher": []}
    for r in range(cfg.plain_repeats):
        for name in rotate(list(plain), r):
            t = time.perf_counter()
            impls[name].plain_step()
            plain[name].append(time.perf_counter() - t)
    out["plain_step_s"] = plain

    times: dict[str, dict[int, list[float]]] = {n: {} for n in IMPLS}
    peaks: dict[str, dict[int, list[float]]] = {n: {} for n in IMPLS}
    losses: dict[str, dict[int, list[float]]] = {n: {} for n in IMPLS}
    for k in cfg.ks:
        for impl in impls.values():
            impl.set_unroll(k)
            for _ in range(cfg.warmup_per_k):
                impl.iteration()
        for r in range(cfg.repeats):
            for name in rotate(list(IMPLS), r):  # rotated so no implementation always goes first
                mem.start()
                t = time.perf_counter()
                loss = impls[name].iteration()
                dt = time.perf_counter() - t
                times[name].setdefault(k, []).append(dt)
                peaks[name].setdefault(k, []).append(mem.peak_delta_mib())
                losses[name].setdefault(k, []).append(loss)
        log("K=%d  " % k + "  ".join(f"{n} {statistics.median(times[n][k]):.4g}s" for n in IMPLS))
    out.update(times_s=times, peak_rss_delta_mib=peaks, losses=losses,
               child_ru_maxrss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return out


def rotate(items: list[str], r: int) -> list[str]:
    r %= len(items)
    return items[r:] + items[:r]


# ============================================================================ orchestration
def machine_info(threads: int) -> dict[str, Any]:
    import torch

    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    try:
        higher_version: str | None = importlib.metadata.version("higher")
    except importlib.metadata.PackageNotFoundError:
        higher_version = None
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_model": cpu,
        "cpu_count": os.cpu_count(),
        "cpus_available": len(os.sched_getaffinity(0)),
        "torch": torch.__version__,
        "torch_threads": threads,
        "cuda_available": torch.cuda.is_available(),
        "higher": higher_version,
        "loadavg_start": os.getloadavg(),
        "time_start": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def machine_cpu_s() -> tuple[float, float]:
    """(busy, steal) CPU seconds of the whole machine since boot, all cores (/proc/stat)."""
    with open("/proc/stat") as f:
        user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in f.readline().split()[1:9])
    hz = os.sysconf("SC_CLK_TCK")
    return (user + nice + system + irq + softirq) / hz, steal / hz


def children_cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def spawn_child(spec: ChildSpec) -> dict[str, Any]:
    """Run one configuration in a fresh interpreter and return its result, with how many cores
    other processes kept busy meanwhile (machine busy time minus the child's own CPU time)."""
    env = dict(os.environ, OMP_NUM_THREADS=str(spec.threads), MKL_NUM_THREADS=str(spec.threads))
    payload = json.dumps({**asdict(spec), "config": asdict(spec.config)})
    load0, (busy0, steal0), own0, t0 = os.getloadavg(), machine_cpu_s(), children_cpu_s(), time.perf_counter()
    proc = subprocess.run([sys.executable, __file__, "--child", payload], env=env, stdout=subprocess.PIPE,
                          text=True, check=False)
    wall = time.perf_counter() - t0
    (busy1, steal1), own1 = machine_cpu_s(), children_cpu_s()
    if proc.returncode != 0:
        raise RuntimeError(f"child for {spec.config.name} failed with exit status {proc.returncode}")
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT_MARK))
    result = json.loads(line[len(RESULT_MARK):])
    result["loadavg_before_after"] = [load0, os.getloadavg()]
    result["child_wall_s"] = wall
    result["other_processes_cores"] = max(0.0, (busy1 - busy0) - (own1 - own0)) / wall
    result["steal_cores"] = (steal1 - steal0) / wall
    return result


def _median(xs: Sequence[float]) -> float:
    return statistics.median(xs)


def summarise(raw: dict[str, Any]) -> dict[str, Any]:
    """Medians, speed-ups vs higher, marginal cost of an unrolled step and its ratio to a plain
    lower-level step, from one child's raw samples (JSON keys are strings after the round trip)."""
    ks = sorted(int(k) for k in raw["times_s"]["ours"])
    t = {n: {k: _median(raw["times_s"][n][str(k)]) for k in ks} for n in IMPLS}
    plain = {n: _median(v) for n, v in raw["plain_step_s"].items()}
    summary: dict[str, Any] = {"K": ks, "plain_step_s": plain, "impl": {}}
    for n in IMPLS:
        marginal = {k: (t[n][k] - t[n][0]) / k for k in ks if k > 0} if 0 in ks else {}
        slope = _slope(ks, [t[n][k] for k in ks]) if len(ks) > 1 else math.nan
        ref_plain = plain.get(n, plain["ours"])  # ours_shared's plain step is ours'
        summary["impl"][n] = {
            "label": IMPL_LABELS[n],
            "time_s": t[n],
            "n": {k: len(raw["times_s"][n][str(k)]) for k in ks},
            "peak_rss_delta_mib": {k: max(raw["peak_rss_delta_mib"][n][str(k)]) for k in ks},
            "speedup_vs_higher": {k: t["higher"][k] / t[n][k] for k in ks},
            "marginal_unrolled_step_s": marginal,
            "marginal_over_plain": {k: m / ref_plain for k, m in marginal.items()},
            "fit_slope_s_per_K": slope,
            "fit_slope_over_plain": slope / ref_plain,
        }
    return summary


def _slope(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Least-squares slope of ys on xs."""
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def plot(results: dict[str, Any], path: Path) -> None:
    """Time and peak memory vs K, one column per configuration."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    fig, axes = plt.subplots(2, len(names), figsize=(4.6 * len(names), 7), squeeze=False)
    style = {"ours": dict(marker="o"), "ours_shared": dict(marker="s", ls="--"), "higher": dict(marker="^")}
    for col, name in enumerate(names):
        s = results[name]["summary"]
        for impl in IMPLS:
            d = s["impl"][impl]
            axes[0][col].plot(s["K"], [d["time_s"][k] for k in s["K"]], label=IMPL_LABELS[impl], **style[impl])
            axes[1][col].plot(s["K"], [d["peak_rss_delta_mib"][k] for k in s["K"]], **style[impl])
        axes[0][col].set_title(name)
        axes[0][col].set_ylabel("time per iteration [s] (median)")
        axes[1][col].set_ylabel("peak RSS growth [MiB]")
        axes[1][col].set_xlabel(f"K (unrolled steps), N={WARMUP_STEPS}")
        for ax in (axes[0][col], axes[1][col]):
            ax.set_xticks(s["K"])
            ax.grid(alpha=0.3)
            ax.set_ylim(bottom=0)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def print_table(results: dict[str, Any]) -> None:
    head = f"{'config':<9} {'K':>2}  {'implementation':<12} {'time/it':>10} {'n':>3} {'peakΔMiB':>9} " \
           f"{'higher/impl':>11} {'(tK-t0)/K':>10} {'/plain':>7}"
    print("\n" + head + "\n" + "-" * len(head))
    for name, res in results.items():
        s = res["summary"]
        for k in s["K"]:
            for impl in IMPLS:
                d = s["impl"][impl]
                m = d["marginal_unrolled_step_s"].get(k)
                r = d["marginal_over_plain"].get(k)
                print(f"{name:<9} {k:>2}  {impl:<12} {_fmt_s(d['time_s'][k]):>10} {d['n'][k]:>3} "
                      f"{d['peak_rss_delta_mib'][k]:>9.1f} {d['speedup_vs_higher'][k]:>10.2f}x "
                      f"{_fmt_s(m) if m is not None else '-':>10} {f'{r:.2f}' if r is not None else '-':>7}")
        p = s["plain_step_s"]
        slopes = "  ".join(f"{i} {_fmt_s(s['impl'][i]['fit_slope_s_per_K'])}/K "
                           f"(={s['impl'][i]['fit_slope_over_plain']:.2f} plain)" for i in IMPLS)
        print(f"{name:<9} plain lower-level step: ours {_fmt_s(p['ours'])}, higher {_fmt_s(p['higher'])};"
              f" fitted slope: {slopes}")
        print(f"{name:<9} other processes kept {res['other_processes_cores']:.2f} cores busy meanwhile "
              f"(steal {res['steal_cores']:.2f}); memory method {res['memory_method']}")
        if "equivalence" in res:
            e = res["equivalence"]
            print(f"{name:<9} equivalence at K={e['K']}: dJ/dθ rel. err {e['grad_rel_err']:.2e}, "
                  f"cos {e['grad_cosine']:.6f}, max|Δφ| {e['phi_max_abs_diff']:.1e}")
        print("-" * len(head))


def print_headline(results: dict[str, Any]) -> None:
    """The numbers asked for most often: speed-up at K=5 and the unrolled-step cost ratio."""
    print()
    for name, res in results.items():
        s = res["summary"]["impl"]
        k = 5 if 5 in res["summary"]["K"] else max(res["summary"]["K"])
        kmax = max(res["summary"]["K"])
        print(f"{name}: higher/ours time at K={k}: {s['ours']['speedup_vs_higher'][k]:.2f}x "
              f"(shared noise {s['ours_shared']['speedup_vs_higher'][k]:.2f}x); "
              f"unrolled step at K={kmax} costs {s['ours']['marginal_over_plain'].get(kmax, math.nan):.2f} plain "
              f"steps (higher {s['higher']['marginal_over_plain'].get(kmax, math.nan):.2f}, "
              f"shared {s['ours_shared']['marginal_over_plain'].get(kmax, math.nan):.2f})")


def _fmt_s(x: float) -> str:
    return f"{x * 1e3:.2f}ms" if abs(x) < 1 else f"{x:.2f}s"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke run: GRBM + conv batch 16 at K∈{0,1}, ~1 min")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results",
                   help="output folder for bilevel.json and bilevel.png (default bench/results)")
    p.add_argument("--configs", nargs="+", help="subset of configurations (grbm conv-b16 conv-b64)")
    p.add_argument("--ks", type=int, nargs="+", help="override the K values (0 is needed for marginal costs)")
    p.add_argument("--repeats", type=int, help="override the timed repeats of every configuration")
    p.add_argument("--threads", type=int, default=1,
                   help="torch.set_num_threads in every child (default 1: see bench/README.md)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-check", action="store_true", help="skip the ours-vs-higher gradient check")
    p.add_argument("--child", help=argparse.SUPPRESS)  # internal: JSON ChildSpec
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        d = json.loads(args.child)
        spec = ChildSpec(config=BenchConfig(**{**d["config"], "ks": tuple(d["config"]["ks"])}),
                         threads=d["threads"], seed=d["seed"], check=d["check"])
        print(RESULT_MARK + json.dumps(run_child(spec)), flush=True)
        return 0

    try:
        import higher  # noqa: F401
    except ImportError:
        sys.exit("the `higher` library is missing: run `make bench-deps` "
                 "(.venv/bin/pip install --no-deps higher==0.2.1)")

    configs = list(QUICK_CONFIGS if args.quick else FULL_CONFIGS)
    if args.configs:
        known = {c.name: c for c in FULL_CONFIGS}
        configs = [next((c for c in configs if c.name == n), known[n]) for n in args.configs]
    if args.ks:
        configs = [replace(c, ks=tuple(sorted(set(args.ks)))) for c in configs]
    if args.repeats:
        configs = [replace(c, repeats=args.repeats) for c in configs]

    info = machine_info(args.threads)
    busy0, _ = machine_cpu_s()
    time.sleep(1.0)
    info["busy_cores_at_start"] = machine_cpu_s()[0] - busy0
    if info["busy_cores_at_start"] > 0.2:
        # Another process is using the CPU: absolute times will be inflated, and with more than
        # one thread every parallel region can stall a whole scheduler time slice.
        print(f"warning: other processes keep {info['busy_cores_at_start']:.1f} cores busy; "
              "timings will be contaminated", file=sys.stderr)
    t_start = time.perf_counter()
    results: dict[str, Any] = {}
    for cfg in configs:
        print(f"== {cfg.name}: batch {cfg.batch}, K {list(cfg.ks)}, {cfg.repeats} repeats", file=sys.stderr, flush=True)
        raw = spawn_child(ChildSpec(cfg, args.threads, args.seed, check=not args.no_check))
        raw["summary"] = summarise(raw)
        results[cfg.name] = raw
    info["loadavg_end"] = os.getloadavg()
    info["wall_s"] = time.perf_counter() - t_start

    args.out.mkdir(parents=True, exist_ok=True)
    doc = {
        "what": "one bi-level iteration: N=5 warm-up + K unrolled steps + higher-level loss + backward + θ step",
        "machine": info,
        "implementations": IMPL_LABELS,
        "timing": "median wall time (time.perf_counter) over `repeats` iterations after untimed warm-up; "
                  "implementations interleaved in rotated order within one process per configuration",
        "memory": "peak RSS growth during one iteration: gc + malloc_trim(0), reset VmHWM via "
                  "/proc/self/clear_refs, VmHWM - VmRSS(start); max over repeats",
        "results": results,
    }
    (args.out / "bilevel.json").write_text(json.dumps(doc, indent=1))
    plot(results, args.out / "bilevel.png")
    print_table(results)
    print_headline(results)
    print(f"\nthreads {args.threads}, {info['cpu_model']}, torch {info['torch']}; "
          f"wall {info['wall_s']:.0f}s; load avg start {info['loadavg_start'][0]:.2f} end {info['loadavg_end'][0]:.2f}")
    print(f"wrote {args.out / 'bilevel.json'} and {args.out / 'bilevel.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
