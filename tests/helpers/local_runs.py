"""Shared set-up of the local-strategy tests (test_trainer.py, test_tracking.py): a tiny GRBM
config, where its files go, and exact comparisons."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch

from distributed_bism.config import Config, from_dict

BASE: dict[str, Any] = {
    "data": {"name": "checkerboard", "n_train": 512, "n_test": 128},
    "model": {"name": "grbm", "h_dim": 4, "init": "small", "init_std": 0.1},
    "posterior": {"name": "bernoulli", "temperature": 0.5},
    "objective": {"name": "bidsm", "sigma": 0.1, "warmup_steps": 1, "unroll_steps": 0},
    "optim": {"lr": 1e-2, "posterior_lr": 1e-2},
    "trainer": {"name": "tiny", "strategy": "local", "num_workers": 1, "steps": 12, "batch_size": 32,
                "log_every": 4, "checkpoint_every": 4, "num_to_keep": 2, "ema_decay": 0.9},
    "tracking": {"enabled": False, "experiment": "bism-tests"},
    "eval": {"every": 1000, "metrics": ["test_loglik"], "num_samples": 16, "langevin_steps": [2, 2, 2]},
}


@pytest.fixture(autouse=True)
def scratch_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Run each test from its own empty directory, so nothing relative (./mlruns, ./outputs) can
    land in the checkout, and the tests can check that nothing did."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    return cwd


def tiny(out: Path, **overrides: Any) -> Config:
    """BASE with trainer.output_dir=out and {"section.key": value} overrides."""
    d = copy.deepcopy(BASE)
    d["trainer"]["output_dir"] = str(out)
    for key, value in overrides.items():
        section, name = key.split(".")
        d[section][name] = value
    return from_dict(Config, d)


def run_dir(cfg: Config) -> Path:
    """Where the local strategy keeps the run's checkpoints (default storage_path)."""
    return Path(cfg.trainer.output_dir).resolve() / "ray_results" / str(cfg.trainer.name)


def checkpoint_dirs(cfg: Config) -> list[Path]:
    return sorted(p for p in run_dir(cfg).glob("checkpoint_*") if p.is_dir())


def assert_same(a: Any, b: Any, where: str = "") -> None:
    """Bit-for-bit equality of nested dicts/lists of tensors and plain values."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a, b), f"{where}: differs (max |Δ| {(a.double() - b.double()).abs().max().item():.3g})"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"{where}: keys {sorted(a)} != {sorted(b)}"
        for k in a:
            assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def snapshot(root: Path) -> dict[str, tuple[int, bytes]]:
    """{relative path: (mtime_ns, content)} of every file under root."""
    return {str(p.relative_to(root)): (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(root.rglob("*"))
            if p.is_file()}
