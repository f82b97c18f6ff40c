"""Reporting for bench_bilevel.py: per-K medians and slopes, the plot and the printed tables."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bilevel_impls import IMPL_LABELS, IMPLS


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
            "speedup_vs_torchopt": {k: t["torchopt"][k] / t[n][k] for k in ks},
            "over_floor": {k: t[n][k] / t["floor"][k] for k in ks},
            # peak memory growth per unrolled step: least-squares slope of peak RSS growth on K
            "peak_growth_per_K_mib": _slope(ks, [max(raw["peak_rss_delta_mib"][n][str(k)]) for k in ks])
            if len(ks) > 1 else math.nan,
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
    style: dict[str, dict[str, Any]] = {
        "ours": dict(marker="o", lw=2),
        "ours_stacked": dict(marker="o", ls="--"),
        "ours_unbatched": dict(marker="o", ls=":"),
        "ours_checkpoint": dict(marker="D", ls="-."),
        "ours_shared": dict(marker="s", ls="--"),
        "higher": dict(marker="^"),
        "torchopt": dict(marker="v"),
        "floor": dict(marker="x", color="k", ls=":"),
    }
    for col, name in enumerate(names):
        s = results[name]["summary"]
        for impl in IMPLS:
            d = s["impl"][impl]
            axes[0][col].plot(s["K"], [d["time_s"][k] for k in s["K"]], label=IMPL_LABELS[impl], **style[impl])
            axes[1][col].plot(s["K"], [d["peak_rss_delta_mib"][k] for k in s["K"]], **style[impl])
        axes[0][col].set_title(name)
        axes[0][col].set_ylabel("time per iteration [s] (median)")
        axes[1][col].set_ylabel("peak RSS growth [MiB]")
        n_warm = 2 if results[name]["config"]["model"] == "demo" else 5
        axes[1][col].set_xlabel(f"K (unrolled steps), N={n_warm}")
        for ax in (axes[0][col], axes[1][col]):
            ax.set_xticks(s["K"])
            ax.grid(alpha=0.3)
            ax.set_ylim(bottom=0)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def print_table(results: dict[str, Any]) -> None:
    head = f"{'config':<9} {'K':>2}  {'implementation':<15} {'time/it':>10} {'n':>3} {'peakΔMiB':>9} " \
           f"{'higher/impl':>11} {'impl/floor':>10} {'(tK-t0)/K':>10} {'/plain':>7}"
    print("\n" + head + "\n" + "-" * len(head))
    for name, res in results.items():
        s = res["summary"]
        for k in s["K"]:
            for impl in IMPLS:
                d = s["impl"][impl]
                m = d["marginal_unrolled_step_s"].get(k)
                r = d["marginal_over_plain"].get(k)
                print(f"{name:<9} {k:>2}  {impl:<15} {_fmt_s(d['time_s'][k]):>10} {d['n'][k]:>3} "
                      f"{d['peak_rss_delta_mib'][k]:>9.1f} {d['speedup_vs_higher'][k]:>10.2f}x "
                      f"{d['over_floor'][k]:>9.2f}x "
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
            diffs = ", ".join(f"{n} {d['grad_rel_err']:.1e}" for n, d in e["vs_ours"].items())
            print(f"{name:<9} equivalence at K={e['K']}, dJ/dθ rel. err vs ours: {diffs}")
        print("-" * len(head))


def headline(results: dict[str, Any]) -> dict[str, Any]:
    """The issue's targets, from the medians: demo K=1 against higher and the floor; at the
    reference size the worst K against higher and torchopt and against the floor; and the
    memory-bounded unroll's growth per unrolled step and time at the largest K."""
    out: dict[str, Any] = {}
    for name, res in results.items():
        s, ks = res["summary"]["impl"], res["summary"]["K"]
        ours, ck = s["ours"], s["ours_checkpoint"]
        kmax = max(ks)
        out[name] = {
            "ours_speedup_vs_higher": ours["speedup_vs_higher"],
            "ours_speedup_vs_torchopt": ours["speedup_vs_torchopt"],
            "ours_over_floor": ours["over_floor"],
            "min_speedup_vs_higher": min(ours["speedup_vs_higher"].values()),
            "min_speedup_vs_torchopt": min(ours["speedup_vs_torchopt"].values()),
            "max_over_floor": max(ours["over_floor"].values()),
            "checkpoint_growth_ratio": ck["peak_growth_per_K_mib"] / ours["peak_growth_per_K_mib"]
            if ours["peak_growth_per_K_mib"] > 0 else math.nan,
            "checkpoint_time_ratio_at_kmax": ck["time_s"][kmax] / ours["time_s"][kmax],
            "kmax": kmax,
        }
    return out


def print_headline(results: dict[str, Any]) -> None:
    print()
    for name, h in headline(results).items():
        k1 = 1 if 1 in h["ours_speedup_vs_higher"] else min(h["ours_speedup_vs_higher"])
        print(f"{name}: K={k1} higher/ours {h['ours_speedup_vs_higher'][k1]:.2f}x, ours/floor "
              f"{h['ours_over_floor'][k1]:.2f}x; over K: min higher/ours {h['min_speedup_vs_higher']:.2f}x, "
              f"min torchopt/ours {h['min_speedup_vs_torchopt']:.2f}x, max ours/floor {h['max_over_floor']:.2f}x; "
              f"unroll_checkpoint: memory growth per K {h['checkpoint_growth_ratio']:.2f} of ours, "
              f"time at K={h['kmax']} {h['checkpoint_time_ratio_at_kmax']:.2f}x")


def _fmt_s(x: float) -> str:
    return f"{x * 1e3:.2f}ms" if abs(x) < 1 else f"{x:.2f}s"
