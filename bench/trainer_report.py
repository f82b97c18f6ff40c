"""Reporting for bench_trainer.py: the summary (rates, scaling efficiency, harness overhead, time
to first step, each against its goal), the method as recorded in the JSON, the plot and the
printed table."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

GOALS = {"scaling_efficiency_min": 0.80, "harness_overhead_max": 0.05, "time_to_first_step_max_s": 30.0,
         "deepspeed_vs_ddp_min": 0.95}

METHOD = {
    "rate": "train/perf/samples_per_s logged by rank 0 every log_every steps (global samples over the wall time "
            "since the previous log), read from MLflow; the first skip_windows windows of each run are "
            "dropped; median over the remaining windows of all repeats. ray.train.report runs only at "
            "checkpoints (checkpoint_every=steps: once, after the last window)",
    "efficiency": "rate(w workers) / (w × rate(1 worker)), same strategy and per-worker batch",
    "overhead": "1 - rate(ddp, 1 worker) / rate(local); local runs in the benchmark process with "
                "torch.set_num_threads(1)",
    "time_to_first_step": "fresh `bism train CONFIG ... trainer.address=local` subprocess (a new local Ray "
                          "cluster, even where another runs on the machine) with its own RAY_TMPDIR, after the "
                          "benchmark's own cluster is down; wall time until its output shows `step N/..` with "
                          "N >= 1 (trainer.log_every=1); includes Ray's forwarding of worker output",
    "vs_ddp": "rate(deepspeed run, w workers) / rate(ddp, w workers): the same work and per-worker batch, "
              "measured in the same benchmark run (so also the per-worker ratio)",
    "cores": "from /proc/stat and this process tree's CPU times, sampled every 0.5 s: cores used by the "
             "benchmark's processes and by everything else during the steady windows",
}


def summarise(runs: list[dict[str, Any]], ttfs: list[dict[str, Any]], workers: Sequence[int]) -> dict[str, Any]:
    rates: dict[str, dict[str, Any]] = {}
    for r in runs:
        rates.setdefault(f"{r['strategy']}/{r['workers']}", {"strategy": r["strategy"], "workers": r["workers"],
                                                             "windows": []})["windows"].extend(r["steady_rates"])
    for v in rates.values():
        w = v["windows"]
        v.update(median=statistics.median(w), min=min(w), max=max(w), n_windows=len(w))
    median = {k: v["median"] for k, v in rates.items()}
    out: dict[str, Any] = {"goals": GOALS, "samples_per_s": rates, "scaling": {}, "overhead": None,
                           "vs_ddp": {}, "time_to_first_step": {}}
    for key, v in rates.items():
        ddp = median.get(f"ddp/{v['workers']}")
        if v["strategy"].startswith("deepspeed") and ddp:
            ratio = v["median"] / ddp
            out["vs_ddp"][key] = {"ratio": ratio, "meets_goal": ratio >= GOALS["deepspeed_vs_ddp_min"]}
    for strategy in sorted({r["strategy"] for r in runs} - {"local"}):
        base = median.get(f"{strategy}/1")
        for w in workers:
            if w > 1 and base and f"{strategy}/{w}" in median:
                eff = median[f"{strategy}/{w}"] / (w * base)
                out["scaling"][f"{strategy}/{w}"] = {"efficiency": eff, "ideal_samples_per_s": w * base,
                                                     "meets_goal": eff >= GOALS["scaling_efficiency_min"]}
    if "local/1" in median and "ddp/1" in median:
        ov = 1 - median["ddp/1"] / median["local/1"]
        out["overhead"] = {"ddp1_vs_local": ov, "meets_goal": ov <= GOALS["harness_overhead_max"]}
    for t in ttfs:
        d = out["time_to_first_step"].setdefault(f"{t['strategy']}/{t['workers']}", {"first_step_s": []})
        d["first_step_s"].append(t["first_step_s"])
    for d in out["time_to_first_step"].values():
        ok = [x for x in d["first_step_s"] if x is not None]
        d["median_s"] = statistics.median(ok) if ok else None
        d["meets_goal"] = bool(ok) and len(ok) == len(d["first_step_s"]) and \
            max(ok) < GOALS["time_to_first_step_max_s"]
    return out


def plot(doc: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = doc["summary"]
    rates = s["samples_per_s"]
    keys = sorted(rates, key=lambda k: (rates[k]["strategy"] != "local", rates[k]["strategy"], rates[k]["workers"]))
    colors = {"local": "tab:gray", "ddp": "tab:blue", "deepspeed": "tab:orange", "deepspeed-z0": "tab:brown",
              "deepspeed-z1": "tab:orange", "deepspeed-z2": "tab:red"}
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12.5, 4.8), gridspec_kw={"width_ratios": [1.5, 1]})
    xs = range(len(keys))
    med = [rates[k]["median"] for k in keys]
    err = [[m - rates[k]["min"] for k, m in zip(keys, med)], [rates[k]["max"] - m for k, m in zip(keys, med)]]
    ax.bar(xs, med, yerr=err, capsize=4, color=[colors.get(rates[k]["strategy"], "tab:green") for k in keys])
    ax.set_xticks(list(xs), [f"{rates[k]['strategy']}\n{rates[k]['workers']} worker(s)" for k in keys])
    ax.set_ylabel("samples/s (median of steady windows; bars: min–max)")
    top = max(med)
    for i, k in enumerate(keys):
        sc = s["scaling"].get(k)
        if sc:  # the ideal: w × the 1-worker rate
            ax.hlines(sc["ideal_samples_per_s"], i - 0.4, i + 0.4, colors="k", linestyles="--")
            ax.annotate(f"{sc['efficiency']:.0%} of ideal", (i, sc["ideal_samples_per_s"]), ha="center",
                        va="bottom", fontsize=8, xytext=(0, 3), textcoords="offset points")
            top = max(top, sc["ideal_samples_per_s"])
        vd = s.get("vs_ddp", {}).get(k)
        if vd:
            ax.annotate(f"{vd['ratio']:.1%} of ddp", (i, med[i]), ha="center", va="top", fontsize=8,
                        xytext=(0, -4), textcoords="offset points", color="white", fontweight="bold")
    if s["overhead"] and "local/1" in rates and "ddp/1" in keys:
        i = keys.index("ddp/1")
        ax.hlines(rates["local/1"]["median"], -0.4, i + 0.4, colors="tab:gray", linestyles=":")
        ax.annotate(f"overhead vs local {s['overhead']['ddp1_vs_local']:+.1%}", (i, med[i]), ha="center",
                    va="bottom", fontsize=8, xytext=(0, 14), textcoords="offset points")
    ax.plot([], [], "k--", label="ideal: workers × 1-worker rate")
    ax.set_ylim(0, top * 1.2)
    ax.legend(fontsize=8, loc="upper left")
    st = doc["settings"]
    ax.set_title(f"throughput, batch {st['batch_per_worker']}/worker, 1 core/worker", fontsize=10)
    ax.grid(axis="y", alpha=0.3)

    # Time to first step: one stacked bar per launch, split at the stages seen in the output.
    ttfs = [t for t in doc["time_to_first_step"] if t["first_step_s"] is not None]
    stages = [("start → config", "resolved_config"), ("→ MLflow run", "mlflow_run"),
              ("→ workers ready", "workers_ready"), ("→ first step", None)]
    stage_colors = ["tab:gray", "tab:purple", "tab:blue", "tab:green"]
    for j, t in enumerate(ttfs):
        prev = 0.0
        for (label, key), c in zip(stages, stage_colors):
            end = t["first_step_s"] if key is None else t["marks_s"].get(key)
            if end is None:
                continue
            ax2.barh(j, end - prev, left=prev, height=0.5, color=c, label=label if j == 0 else None)
            prev = end
        ax2.annotate(f"{t['first_step_s']:.1f} s", (t["first_step_s"], j), va="center", xytext=(3, 0),
                     textcoords="offset points", fontsize=8)
    ax2.set_yticks(range(len(ttfs)), [f"{t['strategy']} × {t['workers']}" for t in ttfs])
    ax2.set_ylim(-0.75, max(len(ttfs), 2) - 0.25)
    goal = GOALS["time_to_first_step_max_s"]
    ax2.axvline(goal, color="r", ls="--", label=f"goal {goal:g} s")
    ax2.set_xlim(0, 1.15 * max([goal, *(t["first_step_s"] for t in ttfs)]))  # room for the labels
    ax2.set_xlabel("seconds from launching `bism train`")
    ax2.set_title("time to first step (fresh process, new local Ray)", fontsize=10)
    ax2.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=3)
    ax2.grid(axis="x", alpha=0.3)
    if not ttfs:
        ax2.text(0.5, 0.5, "not measured", ha="center", transform=ax2.transAxes)
    m = doc["machine"]
    fig.suptitle(("QUICK SMOKE RUN (not a measurement): " if st["quick"] else "")
                 + f"{m['cpu_model']}, {m['cpus_available']} cores; torch {m['torch']}, ray {m['ray']}, "
                 f"deepspeed {m['deepspeed']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def print_table(doc: dict[str, Any]) -> None:
    s = doc["summary"]
    head = f"{'strategy':<13} {'workers':>7} {'samples/s':>10} {'min':>8} {'max':>8} {'windows':>7}  vs ideal / local"
    print("\n" + head + "\n" + "-" * len(head))
    for k, v in s["samples_per_s"].items():
        note = ""
        if k in s["scaling"]:
            note = f"efficiency {s['scaling'][k]['efficiency']:.1%} (goal ≥ {GOALS['scaling_efficiency_min']:.0%})"
        elif k == "ddp/1" and s["overhead"]:
            note = f"overhead {s['overhead']['ddp1_vs_local']:+.1%} (goal ≤ {GOALS['harness_overhead_max']:.0%})"
        if k in s.get("vs_ddp", {}):
            note += f"{'; ' if note else ''}{s['vs_ddp'][k]['ratio']:.1%} of ddp (goal ≥ {GOALS['deepspeed_vs_ddp_min']:.0%})"
        print(f"{v['strategy']:<13} {v['workers']:>7} {v['median']:>10.1f} {v['min']:>8.1f} {v['max']:>8.1f} "
              f"{v['n_windows']:>7}  {note}")
    for r in doc["runs"]:
        c = r["cores_during_steady_windows"]
        if c:
            print(f"  {r['name']:<16} cores during steady windows: benchmark {c['benchmark']:.2f}, "
                  f"other processes {c['other_processes']:.2f}")
    for t in doc["time_to_first_step"]:
        marks = ", ".join(f"{k} {v:.1f}s" for k, v in t["marks_s"].items())
        fs = f"{t['first_step_s']:.1f}s" if t["first_step_s"] is not None else "never"
        print(f"time to first step {t['strategy']} × {t['workers']}: {fs} ({marks}; exit {t['exit_s']:.1f}s, "
              f"rc {t['rc']})")
