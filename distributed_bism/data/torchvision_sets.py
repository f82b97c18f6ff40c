"""Cluster data sets downloaded with torchvision.datasets: mnist, cifar10, celeba.

Where: data.root, or ~/.cache/distributed_bism/<name> (per machine; point data.root at shared
storage on a cluster). With data.download=True torchvision downloads missing files there (a
file lock keeps concurrent workers on one machine from downloading at once); offline, or with
download=False and files missing, the DataError names the directory and the files it needs.

torchvision only downloads (and checksums what it downloads); the files in the layout it leaves
are read here. So a set copied in by hand loads without importing torchvision, an existing copy
costs no md5 pass, and a damaged file is a DataError naming it rather than a re-download or
torchvision's bare assert.

What each returns (float32 in [0, 1], official train/test splits, subsets = the first n of a
permutation seeded with data.seed; None = the whole split in stored order):
- mnist: (60000, 1, 28, 28) / (10000, 1, 28, 28) from the idx image files (raw or .gz) in
  <root>/MNIST/raw/, where torchvision.datasets.MNIST puts them.
- cifar10: (50000, 3, 32, 32) / (10000, 3, 32, 32), unpickled from <root>/cifar-10-batches-py/.
  (torchvision's CIFAR10 would refuse any file whose md5 differs, tiny test sets included.)
- celeba: (162770, 3, 64, 64) / (19962, 3, 64, 64): the aligned 178×218 images, centre-cropped to
  140×140 and resized to 64×64 (PIL bilinear with antialiasing, as torchvision's
  CenterCrop(140) + Resize(64) on PIL images). torchvision's CelebA downloads (from Google Drive;
  it needs `gdown`) and md5-checks its txt files; here only list_eval_partition.txt and
  img_align_celeba/ are read. Images are decoded into uint8 and converted once; a whole decoded
  split is cached as <root>/celeba/celeba64_<split>.npy, as decoding ~160k JPEGs takes minutes.
"""

from __future__ import annotations

import contextlib
import os
import pickle
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from torch import Tensor

from distributed_bism.config import DataConfig
from distributed_bism.data.common import DataError, data_root, subset_index, take, uint8_to_float
from distributed_bism.data.images import check_idx_header, find_idx, read_idx_images

MNIST_FILES = ("train-images-idx3-ubyte", "t10k-images-idx3-ubyte")  # the label files are not needed
CIFAR_DIR = "cifar-10-batches-py"
CIFAR_BATCHES = {"train": tuple(f"data_batch_{i}" for i in range(1, 6)), "test": ("test_batch",)}
CELEBA_DIR = "celeba"
CELEBA_SPLITS = {"train": 0, "test": 2}  # list_eval_partition.txt codes; 1 (valid) is unused
CELEBA_CROP, CELEBA_SIZE = 140, 64


def expected_files(name: str, root: Path) -> tuple[Path, list[str]]:
    """(directory, files it must hold) for a torchvision set under `root`."""
    if name == "mnist":
        return root / "MNIST" / "raw", [f"{stem}[.gz]" for stem in MNIST_FILES]
    if name == "cifar10":
        return root / CIFAR_DIR, [*CIFAR_BATCHES["train"], *CIFAR_BATCHES["test"]]
    if name == "celeba":
        return root / CELEBA_DIR, ["list_eval_partition.txt", "img_align_celeba/"]
    raise KeyError(name)


def missing_files(name: str, root: Path) -> list[str]:
    """The expected files of `name` that are not under `root` (cheap: stats only)."""
    directory, files = expected_files(name, root)
    if name == "mnist":
        return [f for f, stem in zip(files, MNIST_FILES) if find_idx(directory, stem) is None]
    return [f for f in files if not (directory / f.rstrip("/")).exists()]


def _brief(e: BaseException, limit: int = 200) -> str:
    """An exception as one short line (torchvision's download errors span several lines)."""
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:limit]}{'...' if len(text) > limit else ''}"


def _missing_error(name: str, root: Path, why: str) -> DataError:
    directory, files = expected_files(name, root)
    return DataError(
        f"{name}: {why}; fill {directory} with {', '.join(files)} (e.g. download on a machine with "
        f"internet and copy the directory), or set data.root=DIR to where they are"
    )


def check_torchvision_set(cfg: DataConfig) -> None:
    """DataError if files are missing and data.download is False (with download=True: a later
    attempt), or if mnist's idx files are there but cut off or foreign (their headers and sizes)."""
    root = data_root(cfg.root, cfg.name)
    missing = missing_files(cfg.name, root)
    if not cfg.download and missing:
        raise _missing_error(cfg.name, root, f"data.download=False and files are missing under {root}")
    if cfg.name == "mnist" and not missing:
        directory, _ = expected_files("mnist", root)
        for stem in MNIST_FILES:
            check_idx_header(find_idx(directory, stem), (28, 28), "mnist")  # type: ignore[arg-type]


@contextlib.contextmanager
def _download_lock(root: Path) -> Iterator[None]:
    """An exclusive lock on <root>/.download.lock, so workers sharing a machine download once."""
    import fcntl  # POSIX only, like the clusters this runs on; imported here so the module loads anywhere

    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".download.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _ensure_files(cfg: DataConfig, root: Path) -> None:
    """Download the set with torchvision if files are missing and allowed; else a DataError naming them."""
    if not missing_files(cfg.name, root):
        return
    check_torchvision_set(cfg)
    from distributed_bism.data.torchvision_guard import import_torchvision

    try:
        datasets = import_torchvision().datasets
    except ModuleNotFoundError as e:
        raise _missing_error(cfg.name, root, f"downloading needs torchvision ({e})") from e
    with _download_lock(root):
        if not missing_files(cfg.name, root):  # another worker finished while we waited
            return
        try:
            if cfg.name == "mnist":
                datasets.MNIST(str(root), train=True, download=True)
            elif cfg.name == "cifar10":
                datasets.CIFAR10(str(root), train=True, download=True)
            elif cfg.name == "celeba":
                datasets.CelebA(str(root), split="all", target_type=[], download=True)
        # URLError is an OSError; torchvision raises RuntimeError for failed mirrors, md5 mismatches and a missing gdown
        except (OSError, RuntimeError) as e:
            raise _missing_error(cfg.name, root, f"download failed ({_brief(e)})") from e


# ---------------------------------------------------------------------------------------- mnist
def load_mnist(cfg: DataConfig) -> tuple[Tensor, Tensor]:
    """(train (60000, 1, 28, 28), test (10000, 1, 28, 28)) float32 in [0, 1]."""
    root = data_root(cfg.root, "mnist")
    _ensure_files(cfg, root)
    out = []
    for stem, key, n in ((MNIST_FILES[0], "data.n_train", cfg.n_train), (MNIST_FILES[1], "data.n_test", cfg.n_test)):
        images = read_idx_images(find_idx(root / "MNIST" / "raw", stem))  # type: ignore[arg-type]
        index = subset_index(len(images), n, cfg.seed, name="mnist", key=key)
        out.append(uint8_to_float(take(images, index)[:, None]))
    return out[0], out[1]


# ---------------------------------------------------------------------------------------- cifar10
def read_cifar_batch(path: Path) -> np.ndarray:
    """uint8 (N, 3, 32, 32) from one CIFAR-10 python batch file (a pickled dict with b'data'/'data' (N, 3072))."""
    try:
        with open(path, "rb") as f:
            entry = pickle.load(f, encoding="latin1")  # the format is pickle; these are files we downloaded
        data = np.asarray(entry["data"], dtype=np.uint8)
        return data.reshape(-1, 3, 32, 32)
    except (OSError, EOFError, pickle.UnpicklingError, KeyError, TypeError, ValueError) as e:
        raise DataError(
            f"cifar10: {path} is not a valid CIFAR-10 batch ({type(e).__name__}: {e}); "
            "delete it to re-download, or replace it with the original"
        ) from e


def load_cifar10(cfg: DataConfig) -> tuple[Tensor, Tensor]:
    """(train (50000, 3, 32, 32), test (10000, 3, 32, 32)) float32 in [0, 1]."""
    root = data_root(cfg.root, "cifar10")
    _ensure_files(cfg, root)
    out = []
    for split, key, n in (("train", "data.n_train", cfg.n_train), ("test", "data.n_test", cfg.n_test)):
        images = np.concatenate([read_cifar_batch(root / CIFAR_DIR / b) for b in CIFAR_BATCHES[split]])
        index = subset_index(len(images), n, cfg.seed, name="cifar10", key=key)
        out.append(uint8_to_float(take(images, index)))
    return out[0], out[1]


# ---------------------------------------------------------------------------------------- celeba
def _celeba_files(directory: Path, split: str) -> list[str]:
    """Image file names of a split, in list_eval_partition.txt order."""
    code = str(CELEBA_SPLITS[split])
    with open(directory / "list_eval_partition.txt") as f:
        rows = [line.split() for line in f if line.strip()]
    return [row[0] for row in rows if len(row) == 2 and row[1] == code]


def celeba_image(path: Path) -> np.ndarray:
    """uint8 (64, 64, 3): centre crop 140×140 (offsets rounded as torchvision does), resize to 64×64."""
    from PIL import Image

    with Image.open(path) as source:
        img = source.convert("RGB")
        w, h = img.size
        left, top = int(round((w - CELEBA_CROP) / 2.0)), int(round((h - CELEBA_CROP) / 2.0))
        img = img.crop((left, top, left + CELEBA_CROP, top + CELEBA_CROP))
        return np.asarray(img.resize((CELEBA_SIZE, CELEBA_SIZE), Image.Resampling.BILINEAR))


def _decode_celeba(directory: Path, files: list[str]) -> np.ndarray:
    out = np.empty((len(files), CELEBA_SIZE, CELEBA_SIZE, 3), dtype=np.uint8)  # uint8: 4× less than float32
    for i, name in enumerate(files):
        try:
            out[i] = celeba_image(directory / "img_align_celeba" / name)
        except OSError as e:  # missing file, or PIL's UnidentifiedImageError (an OSError)
            raise DataError(f"celeba: cannot read {directory / 'img_align_celeba' / name} ({e})") from e
    return out


def load_celeba(cfg: DataConfig) -> tuple[Tensor, Tensor]:
    """(train (162770, 3, 64, 64), test (19962, 3, 64, 64)) float32 in [0, 1]."""
    root = data_root(cfg.root, "celeba")
    _ensure_files(cfg, root)
    directory = root / CELEBA_DIR
    out = []
    for split, key, n in (("train", "data.n_train", cfg.n_train), ("test", "data.n_test", cfg.n_test)):
        files = _celeba_files(directory, split)
        index = subset_index(len(files), n, cfg.seed, name="celeba", key=key)
        cache = directory / f"celeba{CELEBA_SIZE}_{split}.npy"
        if cache.is_file():  # memory-mapped, so a subset reads only its rows
            images = take(np.load(cache, mmap_mode="r"), index)
        elif index is not None:  # a subset: decode only its images
            images = _decode_celeba(directory, [files[i] for i in index.tolist()])
        else:
            images = _decode_celeba(directory, files)
            tmp = cache.with_name(f"{cache.stem}.{os.getpid()}.tmp.npy")
            np.save(tmp, images)
            os.replace(tmp, cache)  # atomic: concurrent workers never see half a cache
        out.append(uint8_to_float(images, channels_last=True))
    return out[0], out[1]
