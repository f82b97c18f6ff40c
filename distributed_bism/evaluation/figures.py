"""Figures of an evaluation: sample grids (titled with the sampler), samples over training, and
metric curves. Matplotlib with the Agg backend, written as PNG files."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor


def pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def fit_titles(fig: Any) -> None:
    """Wrap every axes title and the suptitle of `fig` onto as many lines as it takes for each line
    to fit the figure's width (measured as drawn), so that a long title (a sampler's label, a sweep's
    name) is never cut off at the figure's edges. Call before tight_layout, which then makes room."""
    import textwrap

    renderer = fig.canvas.get_renderer()
    room = fig.bbox.width * 0.96
    texts = [ax.title for ax in fig.axes if ax.get_title()]
    if getattr(fig, "_suptitle", None) is not None:
        texts.append(fig._suptitle)
    for text in texts:
        lines = [" ".join(line.split()) for line in text.get_text().split("\n")]  # its own breaks kept
        limit = max(len(line) for line in lines)
        while limit > 8 and text.get_window_extent(renderer).width > room * _axes_share(fig, text):
            limit = int(limit * 0.85)
            text.set_text("\n".join(textwrap.fill(line, limit) for line in lines))


def _axes_share(fig: Any, text: Any) -> float:
    """The fraction of the figure's width a title has: its axes' share for an axes title (one of
    several side by side), the whole width for the suptitle."""
    for ax in fig.axes:
        if ax.title is text:
            return max(ax.get_position().width / 0.9, 1 / max(len(fig.axes), 1))
    return 1.0


def finish_figure(fig: Any, path: Path, **savefig: Any) -> None:
    """Titles wrapped to fit, the layout tightened around them, then the figure written and closed."""
    fit_titles(fig)
    fig.tight_layout()
    fig.savefig(path, **savefig)
    pyplot().close(fig)


def as_images(samples: Tensor, data_shape: Sequence[int]) -> Tensor:
    """Samples (B, ...) as images (B, C, H, W): data of shape (C, H, W), or flat data with a square
    number of dims (e.g. 64-d digits for a GRBM). ValueError for anything else."""
    x = samples.detach().float().cpu()
    side = int(round(x[0].numel() ** 0.5))
    if len(data_shape) == 3:
        return x.reshape(-1, *data_shape)
    if side * side == x[0].numel():
        return x.reshape(-1, 1, side, side)
    raise ValueError(f"cannot draw samples of shape {tuple(data_shape)} as images")


def tile(images: Tensor, cols: int) -> Tensor:
    """Images (B, C, H, W) clamped to [0, 1] on a white grid (C, rows·(H+1)−1, cols·(W+1)−1)."""
    n = len(images)
    rows = -(-n // cols)
    c, h, w = images.shape[1:]
    grid = torch.ones(c, rows * (h + 1) - 1, cols * (w + 1) - 1)
    for i, im in enumerate(images.clamp(0, 1)):
        r, q = divmod(i, cols)
        grid[:, r * (h + 1) : r * (h + 1) + h, q * (w + 1) : q * (w + 1) + w] = im
    return grid


def _show(ax: Any, grid: Tensor) -> None:
    c = grid.shape[0]
    ax.imshow(grid.permute(1, 2, 0).squeeze(-1).numpy(), cmap="gray" if c == 1 else None, vmin=0, vmax=1)
    ax.set_xticks([])
    ax.set_yticks([])


def save_sample_figure(
    samples: Tensor, data_shape: tuple[int, ...], path: Path, *, title: str, reference: Tensor | None = None
) -> Path:
    """Write samples (B, ...) as an image grid when the data are images, as a scatter plot over
    `reference` data for 2-D data. The title names the sampler."""
    plt = pyplot()
    path.parent.mkdir(parents=True, exist_ok=True)
    x = samples.detach().float().cpu()
    if len(data_shape) == 1 and data_shape[0] == 2:
        fig, ax = plt.subplots(figsize=(4.5, 4.5))
        if reference is not None:
            r = reference.float().cpu()
            ax.scatter(r[:, 0], r[:, 1], s=2, alpha=0.3, label="data")
        ax.scatter(x[:, 0], x[:, 1], s=2, label="samples")
        ax.legend(loc="upper right", fontsize=7)
    else:
        imgs = as_images(x, data_shape)
        fig, ax = plt.subplots(figsize=(5, 5.3))
        _show(ax, tile(imgs, int(len(imgs) ** 0.5) or 1))
        ax.axis("off")
    ax.set_title(title, fontsize=8)
    finish_figure(fig, path, dpi=110, metadata={"Title": title})  # the sampler, readable without looking
    return path


def save_sample_strip(
    rows: Mapping[int, Tensor], data_shape: tuple[int, ...], path: Path, *, title: str, per_row: int = 10
) -> Path:
    """Samples over training: one row of the first `per_row` samples per evaluation step
    (step → samples (B, ...)), labelled with the step. 2-D data: one small scatter per step."""
    plt = pyplot()
    path.parent.mkdir(parents=True, exist_ok=True)
    steps = sorted(rows)
    if len(data_shape) == 1 and data_shape[0] == 2:
        every = torch.cat([rows[s].float().cpu() for s in steps])  # one scale for all steps
        lo, hi = every.min(0).values.tolist(), every.max(0).values.tolist()
        fig, axes = plt.subplots(1, len(steps), figsize=(2.2 * len(steps), 2.4), squeeze=False)
        for ax, s in zip(axes[0], steps):
            x = rows[s].float().cpu()
            ax.scatter(x[:, 0], x[:, 1], s=1)
            ax.set_title(f"step {s}", fontsize=7)
            ax.set_xlim(lo[0], hi[0])
            ax.set_ylim(lo[1], hi[1])
            ax.set_xticks([])
            ax.set_yticks([])
    else:
        fig, axes = plt.subplots(len(steps), 1, figsize=(0.6 * per_row + 1, 0.75 * len(steps) + 0.6), squeeze=False)
        for ax, s in zip(axes[:, 0], steps):
            _show(ax, tile(as_images(rows[s][:per_row], data_shape), per_row))
            ax.set_ylabel(f"step {s}", fontsize=7, rotation=0, ha="right", va="center")
    fig.suptitle(title, fontsize=8)
    finish_figure(fig, path, dpi=100)
    return path


def save_curve(
    points: Mapping[int | float, float],
    path: Path,
    *,
    xlabel: str,
    ylabel: str,
    title: str,
    spread: Mapping[int | float, float] | None = None,
) -> Path:
    """A line plot of y against x (sorted by x), with ± `spread` error bars when given."""
    plt = pyplot()
    path.parent.mkdir(parents=True, exist_ok=True)
    xs = sorted(points)
    fig, ax = plt.subplots(figsize=(5, 3.4))
    ys = [points[x] for x in xs]
    if spread:
        ax.errorbar(xs, ys, yerr=[spread.get(x, 0.0) for x in xs], marker="o", ms=3, capsize=3)
    else:
        ax.plot(xs, ys, marker="o", ms=3)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=8)
    ax.grid(alpha=0.3)
    finish_figure(fig, path, dpi=110)
    return path
