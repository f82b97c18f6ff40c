"""Bad addresses and storage paths on the job/cluster paths of `bism train` and `bism tune` fail
fast, naming them: no cluster is needed (nothing listens at the address), and no Ray starts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.helpers.ray_nodes import free_port
from tests.unit.test_bad_input import TINY as LOCAL_TINY
from tests.unit.test_bad_input import bism_error, no_ray  # noqa: F401  (no_ray: autouse, nothing here may call ray.init)


def write_yaml(path: Path, data: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    data = {**LOCAL_TINY, "trainer": {**LOCAL_TINY["trainer"], "strategy": "ddp", "output_dir": str(tmp_path / "out")}}
    return write_yaml(tmp_path / "tiny.yaml", data)


@pytest.fixture
def sweep_file(tmp_path: Path, config_file: Path) -> Path:
    return write_yaml(tmp_path / "sweep.yaml", {
        "base": str(config_file), "search": {"optim.lr": {"grid": [1e-2]}}, "metric": "eval/test_loglik",
        "mode": "max", "scheduler": {"name": "fifo"}, "num_samples": 1})


def dead_address() -> str:
    return f"127.0.0.1:{free_port()}"  # bound and released at once: nothing listens there


@pytest.mark.parametrize("form", ["host:port", "ray://host:port", "RAY_ADDRESS"])
def test_train_against_no_cluster(form: str, config_file: Path, capsys: pytest.CaptureFixture[str],
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """A job's driver gets the cluster from $RAY_ADDRESS; by hand it is --address, maybe ray://."""
    address = dead_address()
    argv = ["train", str(config_file)]
    if form == "RAY_ADDRESS":
        monkeypatch.setenv("RAY_ADDRESS", address)
    else:
        address = address if form == "host:port" else f"ray://{address}"
        argv += ["--address", address]
    line = bism_error(capsys, argv)
    assert address in line and "no Ray cluster answers" in line


def test_dashboard_url_is_not_a_cluster_address(config_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The dashboard's http:// address is what `ray job submit` takes, not `bism --address`."""
    line = bism_error(capsys, ["train", str(config_file), "--address", "http://127.0.0.1:8265"])
    assert "http://127.0.0.1:8265" in line and "not a Ray cluster address" in line


def test_tune_against_no_cluster(sweep_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    address = dead_address()
    line = bism_error(capsys, ["tune", str(sweep_file), "--address", address, "--output-dir", str(tmp_path / "o")])
    assert address in line and "no Ray cluster answers" in line
    assert not (tmp_path / "o" / "mlflow.db").exists()


def test_tune_storage_path_not_writable(sweep_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "a_file").write_text("")
    bad = str(tmp_path / "a_file" / "ckpts")
    spec = yaml.safe_load(sweep_file.read_text())
    spec["overrides"] = {"trainer.storage_path": bad}
    line = bism_error(capsys, ["tune", str(write_yaml(sweep_file, spec)), "--output-dir", str(tmp_path / "o")])
    assert "trainer.storage_path" in line and bad in line


def test_tune_output_dir_not_writable(sweep_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "a_file").write_text("")
    line = bism_error(capsys, ["tune", str(sweep_file), "--output-dir", str(tmp_path / "a_file" / "o")])
    assert "trainer.output_dir" in line and str(tmp_path / "a_file") in line
