"""Datasets, selected by `data.name`. Each returns (train, test) float tensors."""

from __future__ import annotations

from torch import Tensor

from distributed_bism.config import DataConfig
from distributed_bism.data.synthetic import SYNTHETIC, make_synthetic

DATASETS = tuple(SYNTHETIC)


def load_dataset(cfg: DataConfig) -> tuple[Tensor, Tensor]:
    """(train (N, ...), test (M, ...)) for `cfg.name`; unknown names are a clear error."""
    if cfg.name in SYNTHETIC:
        return make_synthetic(cfg.name, cfg.n_train, seed=cfg.seed), make_synthetic(cfg.name, cfg.n_test, seed=cfg.seed + 1)
    raise ValueError(f"data.name: unknown dataset {cfg.name!r}; available: {', '.join(DATASETS)}")
