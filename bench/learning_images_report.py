"""JSON, Markdown, curves and sample grids of bench/learning_images.py."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

SAMPLER_NAMES = {"conditional": "conditional", "marginal_langevin": "marginal (model)",
                 "bidvl_decoder": "decoder (model)"}


def _final(r: dict[str, Any], key: str) -> float:
    return r["points"][-1].get(key, math.nan) if r["points"] else math.nan


def _fmt(x: float, spec: str = ".1f") -> str:
    return "—" if x is None or math.isnan(x) else format(x, spec)


def first_below(r: dict[str, Any], key: str, level: float) -> float | None:
    """Training seconds at the first evaluation whose `key` is below `level`, or None."""
    return next((p["train_s"] for p in r["points"] if p.get(key, math.inf) < level), None)


def write_report(out: Path, stem: str, results: list[dict[str, Any]], reference: dict[str, float], *,
                 info: dict[str, Any], wall_s: float, args: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    from distributed_bism.evaluation.figures import save_sample_figure

    results = sorted(results, key=lambda r: r["method"])
    grids = {}
    for r in results:
        for sampler in r["samplers"]:
            samples = r["points"][-1].get(f"samples_{sampler}") if r["points"] else None
            if samples is None:
                continue
            t = torch.tensor(samples)
            name = f"{stem}_{r['method']}_{sampler}.png"
            save_sample_figure(t, tuple(t.shape[1:]), out / name,
                               title=f"{r['method']}, {r['points'][-1]['train_s']:.0f} s — {SAMPLER_NAMES[sampler]}")
            grids[f"{r['method']}/{sampler}"] = name
    slim = [{**r, "points": [{k: v for k, v in p.items() if not k.startswith("samples_")} for p in r["points"]]}
            for r in results]
    (out / f"{stem}.json").write_text(json.dumps({"machine": info, "wall_s": wall_s, "args": args,
                                                  "reference": reference, "results": slim, "grids": grids}, indent=1))

    pg = reference["pixel_gaussian"]
    lines = [f"# Image learning at equal training time: {args['dataset']}", "",
             f"{args['budget']:.0f} CPU seconds of training per method (one torch thread each: the time of a quiet core), "
             f"{args['jobs']} jobs at once on "
             f"{info['cpu_model']} ({info['cpu_count']} cores); classifier-FID with {args['n']} samples, or as many as there are held-out images (297 for digits), against "
             f"held-out test images. Wall clock of this invocation {wall_s:.0f} s"
             + (" (methods finished by earlier invocations were reused: --resume)." if args.get("resume") else "."), "",
             f"Reference classifier-FIDs: held-out data {reference['held_out']:.1f} (floor), pixel Gaussian "
             f"{pg:.1f}, uniform noise {reference['uniform_noise']:.1f} (ceiling).", "",
             "| method | steps | cFID conditional | cFID marginal (model) | cKID marginal | denoise gain | energy gap "
             "| first below pixel Gaussian (model samples) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        if r.get("error"):
            lines.append(f"| {r['method']} | failed: {r['error'][:120]} | | | | | | |")
            continue
        model_key = "cfid_bidvl_decoder" if "bidvl_decoder" in r["samplers"] else "cfid_marginal_langevin"
        kid_key = model_key.replace("cfid", "ckid")
        t = first_below(r, model_key, pg)
        lines.append(f"| {r['method']} | {r['points'][-1]['step'] if r['points'] else 0} "
                     f"| {_fmt(_final(r, 'cfid_conditional'))} | {_fmt(_final(r, model_key))} "
                     f"| {_fmt(_final(r, kid_key), '.3f')} "
                     f"| {_fmt(_final(r, 'denoise_gain'), '.3f')} | {_fmt(_final(r, 'energy_gap'))} "
                     f"| {'—' if t is None else f'{t:.0f} s'} |")
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, sampler in zip(axes, ("conditional", "model")):
        for i, r in enumerate(results):  # one colour per method in both panels
            key = ("cfid_conditional" if sampler == "conditional" else
                   "cfid_bidvl_decoder" if "bidvl_decoder" in r["samplers"] else "cfid_marginal_langevin")
            xs = [p["train_s"] for p in r["points"] if key in p]
            if xs:
                ax.plot(xs, [p[key] for p in r["points"] if key in p], marker="o", label=r["method"], color=f"C{i}")
        for name, style in (("held_out", ":"), ("pixel_gaussian", "--"), ("uniform_noise", "-.")):
            ax.axhline(reference[name], color="grey", ls=style, lw=1, label=name.replace("_", " "))
        ax.set_yscale("log")
        ax.set_xlabel("training CPU seconds (one thread)")
        ax.set_ylabel("classifier-FID")
        ax.set_title(f"{args['dataset']}: {'conditional samples' if sampler == 'conditional' else 'model samples'}")
    for ax in axes:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / f"{stem}.png", dpi=110)
    plt.close(fig)
