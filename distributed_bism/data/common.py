"""Shared pieces of the data loaders: the error type, seeded subsets and uint8 → float images.

Nothing here imports torchvision or reads files, so `check_dataset` can use it cheaply.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch import Tensor


class DataError(ValueError):
    """A data set that cannot be loaded; the one-line message names the set, the path and the fix."""


def too_many(key: str, n: int, name: str, total: int) -> DataError:
    """The error for data.n_train / data.n_test = n larger than the `total` images of the split."""
    return DataError(f"{key}={n} but {name} has only {total} images in that split; lower {key} or leave it unset")


def seeded_perm(n: int, seed: int) -> Tensor:
    """A permutation of range(n), (n,) int64, from its own generator (the global RNG is untouched)."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))


def subset_index(total: int, n: int | None, seed: int, *, name: str, key: str) -> Tensor | None:
    """Indices of the first `n` of a `seed`-ed permutation of `total` items; None means all, in stored order.

    `key` is the config key (data.n_train / data.n_test) named when `n` exceeds the split.
    """
    if n is None:
        return None
    if n > total:
        raise too_many(key, n, name, total)
    return seeded_perm(total, seed)[:n]


def take(x: np.ndarray | Tensor, index: Tensor | None) -> np.ndarray | Tensor:
    """x[index] along the first axis, or x itself for index None."""
    if index is None:
        return x
    return x[index.numpy()] if isinstance(x, np.ndarray) else x[index]


def uint8_to_float(images: np.ndarray | Tensor, *, channels_last: bool = False) -> Tensor:
    """uint8 images (N, C, H, W) — or (N, H, W, C) with channels_last — to float32 (N, C, H, W) in [0, 1].

    Conversion happens once, after any subsetting, so only the kept images are held as float32.
    """
    if images.dtype not in (np.uint8, torch.uint8):
        raise TypeError(f"expected uint8 images, got {images.dtype}")
    if isinstance(images, np.ndarray):
        # The float32 copy is made by numpy, so read-only inputs (np.frombuffer, memmaps) need no extra copy.
        a = images.transpose(0, 3, 1, 2) if channels_last else images
        return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)).div_(255.0)
    t = images.permute(0, 3, 1, 2) if channels_last else images
    return t.contiguous().to(torch.float32).div_(255.0)


def data_root(root: str | None, name: str) -> Path:
    """The directory of set `name`: `root` when given, else ~/.cache/distributed_bism/<name>.

    The default honours XDG_CACHE_HOME; it is per machine, so on a cluster every node downloads
    (or is given) its own copy unless data.root points at shared storage.
    """
    if root is not None:
        return Path(root).expanduser()
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "distributed_bism" / name
