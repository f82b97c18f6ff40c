"""Evaluation during training: exact test log-likelihood (GRBM) and labelled sample figures."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from distributed_bism.models import GaussianRBM, unwrap
from distributed_bism.sampler import SAMPLER_NAME, LangevinSchedule, conditional_samples


def exact_test_loglik(energy: nn.Module, data: Tensor, *, batch_size: int = 10_000) -> float:
    """Mean exact log p(v) of a Gaussian RBM over `data` (N, D), by enumerating h."""
    energy = unwrap(energy)
    assert isinstance(energy, GaussianRBM), "exact log-likelihood needs a Gaussian RBM"
    with torch.no_grad():
        log_z = energy.log_partition()
        total = sum(energy.log_likelihood(chunk, log_z=log_z).sum().item() for chunk in data.split(batch_size))
    return total / len(data)


def save_sample_figure(samples: Tensor, data_shape: tuple[int, ...], path: Path, *, title: str,
                       reference: Tensor | None = None) -> Path:
    """Write samples (B, ...) as an image grid when the data are images (C, H, W), or flat data
    with a square number of dims (e.g. 64-d digits for a GRBM); as a scatter plot for 2-D data.
    The title names the sampler."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    x = samples.detach().float().cpu()
    side = int(round(x[0].numel() ** 0.5))
    if len(data_shape) == 1 and data_shape[0] == 2:
        fig, ax = plt.subplots(figsize=(4.5, 4.5))
        if reference is not None:
            r = reference.float().cpu()
            ax.scatter(r[:, 0], r[:, 1], s=2, alpha=0.3, label="data")
        ax.scatter(x[:, 0], x[:, 1], s=2, label="samples")
        ax.legend(loc="upper right", fontsize=7)
    else:
        if len(data_shape) == 3:
            imgs = x.reshape(-1, *data_shape)
        elif side * side == x[0].numel():
            imgs = x.reshape(-1, 1, side, side)
        else:
            raise ValueError(f"cannot draw samples of shape {tuple(data_shape)} as images")
        n = len(imgs)
        cols = int(n ** 0.5) or 1
        rows = -(-n // cols)
        c, h, w = imgs.shape[1:]
        grid = torch.ones(c, rows * (h + 1) - 1, cols * (w + 1) - 1)
        for i, im in enumerate(imgs.clamp(0, 1)):
            r, q = divmod(i, cols)
            grid[:, r * (h + 1): r * (h + 1) + h, q * (w + 1): q * (w + 1) + w] = im
        fig, ax = plt.subplots(figsize=(5, 5.3))
        ax.imshow(grid.permute(1, 2, 0).squeeze(-1).numpy(), cmap="gray" if c == 1 else None, vmin=0, vmax=1)
        ax.axis("off")
    ax.set_title(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def sample_figure(energy: nn.Module, posterior: nn.Module | None, v_data: Tensor, data_shape: tuple[int, ...],
                  path: Path, *, schedule: LangevinSchedule, step: int, seed: int = 0) -> Path:
    """Conditional samples for the first rows of v_data, drawn and saved as a figure."""
    samples = conditional_samples(energy, posterior, v_data, schedule, seed=seed)
    return save_sample_figure(samples, data_shape, path, title=f"step {step} — {SAMPLER_NAME}", reference=v_data)
