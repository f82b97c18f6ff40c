"""Classifier-FID and classifier-KID: FID and KID in the feature space of a small CNN classifier
that the project trains itself on the same data set (digits, fashion_mnist).

They are not the standard FID/KID (whose features come from an ImageNet Inception network), so
they are always reported as "classifier-FID" / "classifier-KID" and compare runs on the same
data set only. The classifier is trained once per (data set, split seed, architecture version)
on the training split, cached on disk with its test accuracy, and its penultimate layer (F = 64
ReLU units) gives the features.

    classifier-FID = ‖μ_r − μ_f‖² + tr(Σ_r + Σ_f − 2 (Σ_r Σ_f)^{1/2})        Gaussians fitted to features
    classifier-KID = unbiased MMD² with k(x, y) = (xᵀy / F + 1)³
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distributed_bism.config import DataConfig
from distributed_bism.data.common import DataError
from distributed_bism.evaluation.feature_stats import FeatureStats, frechet_of_stats
from distributed_bism.progress_bars import bar

ARCH_VERSION = 1  # bump when FeatureNet or its training changes: old caches are then ignored
CLASSIFIER_SETS = ("digits", "fashion_mnist")
FEATURES = 64
# Training budget per set: (epochs, batch, intra-op threads of training and features; None =
# torch's default). Digits: 5 s and 97.6% test accuracy on one core. Its 8×8 convolutions gain
# nothing from threads, and on a busy 2-core machine two spinning threads made the same training
# 50× slower (measured).
TRAINING: dict[str, tuple[int, int, int | None]] = {"digits": (20, 64, 1), "fashion_mnist": (3, 128, None)}


class FeatureNet(nn.Module):
    """conv3×3(C→w) → conv3×3 stride 2 (w→2w) → conv3×3 stride 2 (2w→2w) → mean pool → linear(2w→F)
    → ReLU = the features; a linear head to 10 classes. Input (B, C, H, W) in [0, 1]."""

    def __init__(self, channels: int, width: int = 32, features: int = FEATURES, classes: int = 10):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, width, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(2 * width, 2 * width, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(2 * width, features),
            nn.ReLU(),
        )
        self.head = nn.Linear(features, classes)

    def forward(self, x: Tensor) -> Tensor:
        """Class logits (B, 10)."""
        return self.head(self.body(x))


@dataclass
class FeatureClassifier:
    """A trained FeatureNet for one data set; `accuracy` on that set's test split."""

    dataset: str
    net: FeatureNet
    image_shape: tuple[int, ...]
    accuracy: float

    @torch.no_grad()
    def features(self, x: Tensor, *, batch_size: int = 500, progress: bool = True) -> Tensor:
        """Penultimate-layer features (B, F) of x (B, C, H, W) or flat (B, D), float64 on the CPU.
        Images padded on every side (data.pad) are cropped back to the classifier's size first.
        `progress`: a bar over the batches (progress_bars; off where the caller draws its own)."""
        c, h, w = self.image_shape
        x = x.detach()
        if x.dim() == 4 and x.shape[-2] > h and x.shape[-1] > w:
            top, left = (x.shape[-2] - h) // 2, (x.shape[-1] - w) // 2
            x = x[..., top : top + h, left : left + w]
        x = x.reshape(-1, c, h, w).float().cpu()
        self.net.eval()
        with _threads(TRAINING[self.dataset][2]):
            chunks: Iterable[Tensor] = x.split(batch_size)
            if progress:
                chunks = bar(chunks, "classifier features", unit="batch")
            return torch.cat([self.net.body(chunk) for chunk in chunks]).double()

    def payload(self) -> dict[str, Any]:
        """What the cache file holds and `from_payload` rebuilds: weights, accuracy, image shape."""
        return {
            "state_dict": self.net.state_dict(),
            "accuracy": self.accuracy,
            "image_shape": list(self.image_shape),
            "dataset": self.dataset,
            "arch_version": ARCH_VERSION,
        }

    @classmethod
    def from_payload(cls, saved: dict[str, Any]) -> FeatureClassifier:
        net = FeatureNet(saved["image_shape"][0])
        net.load_state_dict(saved["state_dict"])
        return cls(saved["dataset"], net.eval(), tuple(saved["image_shape"]), float(saved["accuracy"]))


@contextlib.contextmanager
def _threads(n: int | None) -> Iterator[None]:
    """torch's intra-op threads set to n (None: unchanged) inside the block."""
    before = torch.get_num_threads()
    torch.set_num_threads(n or before)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# --------------------------------------------------------------------------- labelled data
def _idx_labels(path: Path) -> np.ndarray:
    """The uint8 labels (N,) of an idx1-ubyte file (magic 0x00000801)."""
    import gzip

    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    if len(raw) < 8 or raw[:4] != b"\x00\x00\x08\x01":
        raise DataError(f"{path} is not an idx1-ubyte label file (magic {raw[:4].hex()}, expected 00000801)")
    return np.frombuffer(raw, dtype=np.uint8, offset=8)


def labelled_splits(dataset: str, root: str | None, seed: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(train images, train labels, test images, test labels) of the data set's full splits, the
    images as the data loader gives them (so the split matches a run with data.seed = seed)."""
    from distributed_bism.data import load_dataset

    cfg = DataConfig(name=dataset, root=root, seed=seed, download=False)
    train, test = load_dataset(cfg)
    if dataset == "digits":
        from sklearn.datasets import load_digits

        from distributed_bism.data.images import DIGITS_TEST, _split

        y_train, y_test = _split(torch.as_tensor(load_digits().target), DIGITS_TEST, cfg, "digits")
    elif dataset == "fashion_mnist":
        from distributed_bism.data.images import fashion_mnist_dir, find_idx

        labels = []
        for stem in ("train-labels-idx1-ubyte", "t10k-labels-idx1-ubyte"):
            path = find_idx(fashion_mnist_dir(cfg), stem)
            if path is None:
                raise DataError(f"classifier-FID for fashion_mnist needs {stem}[.gz] in {fashion_mnist_dir(cfg)}")
            labels.append(torch.as_tensor(_idx_labels(path).astype(np.int64)))
        y_train, y_test = labels
    else:
        raise DataError(f"classifier-FID needs a labelled image set ({', '.join(CLASSIFIER_SETS)}), got {dataset!r}")
    return train, y_train.long(), test, y_test.long()


# --------------------------------------------------------------------------- the classifier
def _train(net: FeatureNet, x: Tensor, y: Tensor, epochs: int, batch: int, seed: int) -> None:
    """Adam (lr 3e-3, cosine to 0) on cross-entropy, with its own RNG streams (the caller's are kept)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        opt = torch.optim.Adam(net.parameters(), lr=3e-3)
        steps = epochs * math.ceil(len(x) / batch)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
        net.train()
        for _ in bar(range(epochs), "classifier training", unit="epoch"):
            for idx in torch.randperm(len(x)).split(batch):
                opt.zero_grad()
                F.cross_entropy(net(x[idx]), y[idx]).backward()
                opt.step()
                sched.step()
        net.eval()


@torch.no_grad()
def _accuracy(net: FeatureNet, x: Tensor, y: Tensor) -> float:
    return sum((net(xb).argmax(1) == yb).sum().item() for xb, yb in zip(x.split(1000), y.split(1000))) / len(x)


def default_cache_dir() -> Path:
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "distributed_bism" / "classifiers"


def _stdout_line(s: str) -> None:
    sys.stdout.write(s + "\n")


def feature_classifier(
    dataset: str,
    *,
    root: str | None = None,
    cache_dir: str | Path | None = None,
    seed: int = 0,
    log: Callable[[str], None] | None = None,
) -> FeatureClassifier:
    """The cached classifier of `dataset` (split seed `seed`), trained and cached first if missing.
    Cache file: <cache_dir>/<dataset>-seed<seed>-v<ARCH_VERSION>.pt with weights and test accuracy."""
    if dataset not in CLASSIFIER_SETS:
        raise DataError(f"classifier-FID needs a labelled image set ({', '.join(CLASSIFIER_SETS)}), got {dataset!r}")
    log = log or _stdout_line
    cache = Path(cache_dir or default_cache_dir()) / f"{dataset}-seed{seed}-v{ARCH_VERSION}.pt"
    if cache.is_file():
        return FeatureClassifier.from_payload(
            {"dataset": dataset} | torch.load(cache, map_location="cpu", weights_only=True)
        )
    x, y, x_test, y_test = labelled_splits(dataset, root, seed)
    start = time.perf_counter()
    net = FeatureNet(x.shape[1])
    epochs, batch, threads = TRAINING[dataset]
    with _threads(threads):
        _train(net, x, y, epochs, batch, seed)
        accuracy = _accuracy(net, x_test, y_test)
    log(
        f"classifier-FID: trained the {dataset} feature classifier in {time.perf_counter() - start:.0f} s, "
        f"test accuracy {accuracy:.4f}; cached in {cache}"
    )
    clf = FeatureClassifier(dataset, net, tuple(x.shape[1:]), accuracy)
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(f".tmp{os.getpid()}")
    torch.save(clf.payload(), tmp)
    tmp.replace(cache)  # atomic: a concurrent reader sees the old state or the whole file
    return clf


# --------------------------------------------------------------------------- the distances
def frechet_distance(a: Tensor, b: Tensor) -> float:
    """‖μ_a − μ_b‖² + tr(Σ_a + Σ_b − 2 (Σ_a Σ_b)^{1/2}) of Gaussians fitted to rows of a (N, F), b (M, F)
    (feature_stats.py, which also reduces the Gaussians across ranks); NaN when a feature is not finite."""
    return frechet_of_stats(FeatureStats.of(a), FeatureStats.of(b))


def polynomial_mmd2(a: Tensor, b: Tensor) -> float:
    """Unbiased MMD² between rows of a (N, F) and b (M, F), N, M ≥ 2, with k(x, y) = (xᵀy / F + 1)³;
    NaN when a feature is not finite."""
    a, b = a.double(), b.double()
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        return math.nan
    d = a.shape[1]
    k_aa, k_bb, k_ab = ((a @ a.T) / d + 1) ** 3, ((b @ b.T) / d + 1) ** 3, ((a @ b.T) / d + 1) ** 3
    n, m = len(a), len(b)
    within_a = (k_aa.sum() - k_aa.diagonal().sum()) / (n * (n - 1))
    within_b = (k_bb.sum() - k_bb.diagonal().sum()) / (m * (m - 1))
    return float(within_a + within_b - 2 * k_ab.mean())


def classifier_fid(real: Tensor, fake: Tensor, clf: FeatureClassifier) -> float:
    """Classifier-FID between images real (N, ...) and fake (M, ...) (see the module docstring)."""
    return frechet_distance(clf.features(real), clf.features(fake))


def classifier_kid(real: Tensor, fake: Tensor, clf: FeatureClassifier) -> float:
    """Classifier-KID between images real (N, ...) and fake (M, ...) (see the module docstring)."""
    return polynomial_mmd2(clf.features(real), clf.features(fake))
