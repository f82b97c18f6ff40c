"""Out-of-distribution detection by the energy: the `ood_auroc` metric (BiDVL, Kan et al. 2022).

A low energy marks typical data, so −E(v) scores "in-distribution". The metric is the area
under the ROC curve of that score separating the in-distribution test split (positives) from
an OOD set (negatives) of the same size (sklearn.metrics.roc_auc_score):

    eval.ood_dataset = uniform_noise   U(lo, hi) images, [lo, hi] the test data's range
                     = <data set name> its test split, resized (area interpolation) to the
                                         in-distribution image size; channels must match

1.0 separates perfectly, 0.5 is chance. The energy must be a function of v alone: a marginal
energy E(v) (BiDVL) or a GRBM's free energy F(v); other models are skipped with a note.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distributed_bism.config import DataConfig
from distributed_bism.evaluation.metrics import EvalContext, register_metric
from distributed_bism.models import GaussianRBM, MarginalEnergy, unwrap

OOD_SEED = 12_345  # the uniform-noise set is the same at every evaluation


def marginal_energy_fn(energy: nn.Module) -> Callable[[Tensor], Tensor] | None:
    """v (N, ...) → E(v) (N,) for models with an energy of v alone, else None."""
    energy = unwrap(energy)
    if isinstance(energy, MarginalEnergy):
        return energy
    if isinstance(energy, GaussianRBM):
        return energy.free_energy
    return None


def ood_data(name: str, like: Tensor, data_cfg: DataConfig) -> Tensor:
    """len(like) OOD examples shaped like `like` (N, ...): uniform noise over like's range, or the
    first N of data set `name`'s test split (fewer if it is smaller), resized to like's size."""
    if name == "uniform_noise":
        gen = torch.Generator().manual_seed(OOD_SEED)
        lo, hi = like.min().item(), like.max().item()
        return (torch.rand(like.shape, generator=gen) * (hi - lo) + lo).to(like.dtype).to(like.device)
    from distributed_bism.data import load_dataset

    _, test = load_dataset(dataclasses.replace(data_cfg, name=name, n_train=None, n_test=None))
    x = test[: len(like)].to(like.dtype)
    if x.dim() != like.dim() or (like.dim() == 4 and x.shape[1] != like.shape[1]):
        raise ValueError(
            f"eval.ood_dataset: {name} examples have shape {tuple(x.shape[1:])}, "
            f"not comparable with the data's {tuple(like.shape[1:])}"
        )
    if like.dim() == 4 and x.shape[2:] != like.shape[2:]:
        x = F.interpolate(x, size=tuple(like.shape[2:]), mode="area")
    return x.to(like.device)


@torch.no_grad()
def energy_auroc(energy: Callable[[Tensor], Tensor], in_data: Tensor, ood: Tensor, *, batch_size: int = 1_000) -> float:
    """AUROC of −E separating in_data (N, ...) (positives) from ood (M, ...) (negatives)."""
    from sklearn.metrics import roc_auc_score

    def scores(x: Tensor) -> Tensor:
        return torch.cat([-energy(chunk).double().cpu() for chunk in x.split(batch_size)])

    s = torch.cat([scores(in_data), scores(ood)]).numpy()
    labels = np.concatenate([np.ones(len(in_data)), np.zeros(len(ood))])
    return float(roc_auc_score(labels, s))


@register_metric("ood_auroc")
def ood_auroc(ctx: EvalContext) -> dict[str, float]:
    """eval/ood_auroc: −E separating the test split from eval.ood_dataset (rank 0)."""
    fn = marginal_energy_fn(ctx.energy)
    if fn is None or ctx.test_data is None:
        ctx.notes.append(
            f"ood_auroc: skipped ({'no test data' if fn is not None else 'the energy is not a function of v alone'})"
        )
        return {}
    # compared as images (a GRBM sees flat vectors), scored in the shape the energy takes
    images = ctx.test_data.reshape(-1, *ctx.image_shape)
    ood = ood_data(ctx.cfg.eval.ood_dataset, images, ctx.cfg.data).reshape(-1, *ctx.test_data.shape[1:])
    return {"eval/ood_auroc": energy_auroc(fn, ctx.test_data, ood)}
