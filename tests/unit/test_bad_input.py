"""Bad input through the `bism` command: exit status 2, one line on stderr naming the problem,
and no Ray started.

Every test replaces `ray.init` with a function that fails the test, so a check that moved after
(or went missing before) the cluster start shows up as a test failure, not as a Ray cluster
started on a shared machine. Tracking is off except where the tracking URI is the subject.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from distributed_bism.launch import preflight as launch
from tests.helpers.bad_input import TINY, bism_error, config_file, no_ray  # noqa: F401 (no_ray and config_file are fixtures)


def assert_nothing_trained(tmp_path: Path) -> None:
    """No checkpoint, sample or model was written under the output directory."""
    out = tmp_path / "out"
    written = [p for p in out.rglob("*") if p.is_file()] if out.exists() else []
    assert not [p for p in written if p.name in ("state.pt", "model.pt") or p.suffix == ".png"], written


def test_missing_config_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A config path that does not exist is named."""
    missing = tmp_path / "nope.yaml"
    line = bism_error(capsys, ["train", str(missing)])
    assert "config file not found" in line and str(missing) in line


def test_unknown_dataset(tmp_path: Path, config_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """data.name=nope: the key, the bad name and the available sets are named."""
    line = bism_error(capsys, ["train", str(config_file), "data.name=nope"])
    assert "data.name" in line and "'nope'" in line and "checkerboard" in line
    assert_nothing_trained(tmp_path)


def test_fashion_mnist_empty_root(tmp_path: Path, config_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """fashion_mnist with data.root at an empty directory: the directory and the missing files are named."""
    empty = tmp_path / "empty"
    empty.mkdir()
    line = bism_error(capsys, ["train", str(config_file), "data.name=fashion_mnist", f"data.root={empty}",
                               "data.n_train=null", "data.n_test=null"])
    assert "fashion_mnist" in line and str(empty) in line and "train-images-idx3-ubyte" in line
    assert_nothing_trained(tmp_path)


def test_zero_stage_3(config_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """ZeRO-3 is refused by the config, naming trainer.zero_stage."""
    line = bism_error(capsys, ["train", str(config_file), "trainer.strategy=deepspeed", "trainer.zero_stage=3"])
    assert "trainer.zero_stage" in line and "3" in line


def test_unknown_key(config_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A misspelt key is named, with the valid keys of its section."""
    line = bism_error(capsys, ["train", str(config_file), "trainer.stpes=10"])
    assert "trainer.stpes" in line and "unknown key" in line and "steps" in line


def test_wrong_type(config_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A string where an int is expected names the key and the value."""
    line = bism_error(capsys, ["train", str(config_file), "trainer.steps=many"])
    assert "trainer.steps" in line and "'many'" in line


def test_unreachable_tracking_uri(tmp_path: Path, config_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """An MLflow server that does not answer (port 9 is closed) is named by its URI."""
    uri = "http://127.0.0.1:9"
    line = bism_error(capsys, ["train", str(config_file), "tracking.enabled=true", f"tracking.tracking_uri={uri}"])
    assert "tracking.tracking_uri" in line and uri in line
    assert_nothing_trained(tmp_path)


def test_unreachable_ray_address(tmp_path: Path, config_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--address at a port where no Ray cluster answers is named, and no connection to Ray is attempted."""
    line = bism_error(capsys, ["train", str(config_file), "trainer.strategy=ddp", "tracking.enabled=true",
                               "--address", "127.0.0.1:9"])
    assert "127.0.0.1:9" in line and "address" in line
    # refused before anything was written: no MLflow store, no run record
    assert not (tmp_path / "out" / "mlflow.db").exists()
    assert not list((tmp_path / "out").rglob("bism_config.yaml"))
    assert_nothing_trained(tmp_path)


@pytest.mark.parametrize("where", ["under_a_file", "dev_null"])
def test_storage_path_not_writable(tmp_path: Path, config_file: Path, capsys: pytest.CaptureFixture[str],
                                   where: str) -> None:
    """A storage_path that cannot be created (its parent is a regular file) is named; this holds
    for root too, unlike a chmod-ed directory."""
    if where == "under_a_file":
        (tmp_path / "a_file").write_text("")
        bad = str(tmp_path / "a_file" / "ckpts")
    else:
        bad = "/dev/null/ckpts"
    line = bism_error(capsys, ["train", str(config_file), f"trainer.storage_path={bad}"])
    assert "trainer.storage_path" in line and bad in line
    assert_nothing_trained(tmp_path)


def test_more_workers_than_cpus(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, config_file: Path,
                                capsys: pytest.CaptureFixture[str]) -> None:
    """More CPU workers than this machine has CPUs, with no address and no cluster running here:
    refused before Ray would start a local cluster, naming trainer.num_workers.

    Whether a cluster runs here is stubbed to "no": other tests on this machine may have one up,
    and the product would then (rightly) join it and check its resources instead."""
    monkeypatch.setattr(launch, "_ray_running_here", lambda: False)
    n = (os.cpu_count() or 1) + 1
    line = bism_error(capsys, ["train", str(config_file), "trainer.strategy=ddp", f"trainer.num_workers={n}",
                               "trainer.use_gpu=false", "data.n_train=null"])
    assert "trainer.num_workers" in line and str(n) in line and str(os.cpu_count()) in line


def test_check_local_cpus_leaves_clusters_alone(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The CPU pre-check applies only to a new local cluster: an address, $RAY_ADDRESS or a running
    cluster (which may be bigger than this machine) is left to check_resources."""
    from distributed_bism.config import Config, from_dict

    n = (os.cpu_count() or 1) + 1
    cfg = from_dict(Config, {**TINY, "trainer": {**TINY["trainer"], "strategy": "ddp", "num_workers": n,
                                                 "use_gpu": False, "output_dir": str(tmp_path)}})
    monkeypatch.setattr(launch, "_ray_running_here", lambda: False)
    launch.check_local_cpus(cfg, "10.0.0.1:6379")  # a remote cluster: not judged by this machine
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    launch.check_local_cpus(cfg, None)
    monkeypatch.delenv("RAY_ADDRESS")
    monkeypatch.setattr(launch, "_ray_running_here", lambda: True)
    launch.check_local_cpus(cfg, None)  # joins the running cluster
    monkeypatch.setattr(launch, "_ray_running_here", lambda: False)
    with pytest.raises(launch.ConfigError, match="trainer.num_workers"):
        launch.check_local_cpus(cfg, None)


def test_bf16_without_gpus(config_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """bf16 needs GPUs: with trainer.use_gpu=false it is refused, naming trainer.precision."""
    line = bism_error(capsys, ["train", str(config_file), "trainer.strategy=deepspeed", "trainer.precision=bf16",
                               "trainer.use_gpu=false"])
    assert "trainer.precision" in line and "bf16" in line


def test_batch_larger_than_data(tmp_path: Path, config_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A per-worker batch larger than each worker's share of the data is refused before training
    (it used to be a ValueError traceback from inside the loop, or a worker failure under Ray)."""
    line = bism_error(capsys, ["train", str(config_file), "data.n_train=64", "trainer.batch_size=100"])
    assert "trainer.batch_size" in line and "100" in line and "64" in line
    assert_nothing_trained(tmp_path)


def test_config_built_in_python_is_checked_before_anything_starts(tmp_path: Path) -> None:
    """`train(Config(...))` skips from_dict's section checks: preflight runs them, so an unknown
    objective (and an objective that needs another model) fails before any directory is made."""
    from dataclasses import replace

    from distributed_bism import train
    from distributed_bism.config import Config, ConfigError, ObjectiveConfig, from_dict

    good = from_dict(Config, {**TINY, "trainer": {**TINY["trainer"], "output_dir": str(tmp_path / "out")}})
    with pytest.raises(ConfigError, match="objective.name"):
        train(replace(good, objective=ObjectiveConfig(name="no-such-method")))
    with pytest.raises(ConfigError, match="objective.name=bidvl needs model.name"):
        train(replace(good, objective=replace(good.objective, name="bidvl")))
    assert not (tmp_path / "out").exists()
