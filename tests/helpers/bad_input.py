"""Shared by the bad-input tests: a tiny valid config, `ray.init` replaced by a failure (so a
check that runs after the cluster start fails the test instead of starting Ray on a shared
machine), and the one-line-error assertion."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from distributed_bism.cli import main

TINY = {
    "data": {"name": "checkerboard", "n_train": 64, "n_test": 32},
    "model": {"name": "grbm", "h_dim": 4},
    "objective": {"name": "bidsm", "warmup_steps": 1, "unroll_steps": 0},
    "trainer": {"name": "bad-input", "strategy": "local", "steps": 2, "batch_size": 8},
    "tracking": {"enabled": False},
    "eval": {"metrics": ["test_loglik"]},
}


@pytest.fixture(autouse=True)
def no_ray(monkeypatch: pytest.MonkeyPatch):
    """Fail the test if anything calls ray.init; after the test, Ray must not be initialised."""
    import ray

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"ray.init{args}{kwargs} was called: the input check must come before Ray starts")

    monkeypatch.setattr(ray, "init", refuse)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    yield
    assert not ray.is_initialized()


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    """A valid tiny local config, its outputs under tmp_path/out."""
    data = {**TINY, "trainer": {**TINY["trainer"], "output_dir": str(tmp_path / "out")}}
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def bism_error(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    """Run `bism ARGV`; assert exit status 2 and exactly one `bism: error:` line on stderr; return it."""
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, f"exit status {code}, stderr: {err!r}"
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("bism: error: "), f"expected one error line, got {err!r}"
    return lines[0]
