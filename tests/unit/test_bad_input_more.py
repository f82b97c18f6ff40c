"""More bad input through the `bism` command (issue 15): names that become paths, counts past
what a machine can hold, non-finite numbers, unreadable or ambiguous config files, options among
the overrides, and bf16 / corrupt data files found before the MLflow run opens.

As in test_bad_input.py: exit status 2, one `bism: error:` line naming the key, `ray.init`
replaced by a function that fails the test, and nothing written (fixtures: tests/helpers/bad_input.py).
"""

from __future__ import annotations

import gzip
import math
from pathlib import Path

import pytest
import yaml

from distributed_bism.config import Config, ConfigError, OptimConfig, from_dict, load_config
from distributed_bism.launch import preflight as launch
from tests.helpers.bad_input import TINY, bism_error, config_file, no_ray  # noqa: F401 (no_ray and config_file are fixtures)

REPO = Path(__file__).resolve().parents[2]
def assert_nothing_written(tmp_path: Path) -> None:
    """No file at all under the output directory: no checkpoint, config record, MLflow store or sample."""
    out = tmp_path / "out"
    written = [p for p in out.rglob("*") if p.is_file()] if out.exists() else []
    assert not written, written


# ------------------------------------------------------------------------- 1. names that become paths
@pytest.mark.parametrize("name", ["..", ".", "-rf", ".hidden", "a/b", "..\\x", "a b", "it's", "x" * 200, "é" * 65])
def test_run_name_must_be_one_safe_path_component(tmp_path: Path, config_file: Path,
                                                 capsys: pytest.CaptureFixture[str], name: str) -> None:
    """trainer.name=.. (or .) used to put checkpoints, bism_config.yaml and model.pt straight into
    outputs/ and outputs/ray_results/: every name that is not one plain directory name is refused."""
    line = bism_error(capsys, ["train", str(config_file), f"trainer.name={name}"])
    assert "trainer.name" in line
    assert_nothing_written(tmp_path)


def test_run_names_that_are_fine(tmp_path: Path) -> None:
    """The names the project and its users use pass: letters of any script, digits, . _ - + = @."""
    for name in ("bench_bidsm", "ttfs-ddp-w2-r0", "demo-4gpu", "lr=1e-3", "run.2", "実験1", "x" * 128):
        from_dict(Config, {"trainer": {"name": name}})


def test_control_characters_in_names(tmp_path: Path) -> None:
    """A NUL or newline (which argv cannot carry, but YAML and Python can) is refused in the run
    name and in the MLflow experiment and run names."""
    for key, value in (("trainer.name", "a\x00b"), ("trainer.name", "a\nb"), ("tracking.experiment", "e\x00"),
                       ("tracking.run_name", "r\nx"), ("tracking.experiment", " ")):
        section, field = key.split(".")
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            from_dict(Config, {section: {field: value}})


@pytest.mark.parametrize("key", ["trainer.output_dir", "trainer.storage_path", "data.root", "tracking.tracking_uri",
                                 "eval.classifier_dir"])
def test_nul_in_a_path(tmp_path: Path, capsys: pytest.CaptureFixture[str], key: str) -> None:
    """A NUL in a path (a YAML "\\0") was a ValueError traceback from pathlib: one line naming the key."""
    section, field = key.split(".")
    data = {**TINY, "trainer": {**TINY["trainer"], "output_dir": str(tmp_path / "out")}}
    data[section] = {**data.get(section, {}), field: "a\x00b"}
    path = tmp_path / "nul.yaml"
    path.write_text(yaml.safe_dump(data))
    line = bism_error(capsys, ["train", str(path)])
    assert key in line and "NUL" in line
    assert_nothing_written(tmp_path)


def _spec(tmp_path: Path, config_file: Path, name: str = "sweep") -> Path:
    spec = {"base": str(config_file), "search": {"optim.lr": {"choice": [0.001, 0.002]}},
            "metric": "train/loss", "mode": "min", "scheduler": {"name": "fifo"}}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.mark.parametrize("name", ["..", "a/b", "-x", "s" * 100])
def test_sweep_name_is_checked(tmp_path: Path, config_file: Path, capsys: pytest.CaptureFixture[str],
                               name: str) -> None:
    """`bism tune SPEC --name ..` would make <output_dir>/sweeps/.. (the output directory itself) the
    sweep's directory: refused, naming --name, before Ray starts. 100 bytes is too long: every
    trial's run name is <sweep>-<trial id>, which must fit trainer.name's 128 bytes."""
    line = bism_error(capsys, ["tune", str(_spec(tmp_path, config_file)), f"--name={name}",
                               "--output-dir", str(tmp_path / "out")])
    assert "--name" in line
    assert_nothing_written(tmp_path)


def test_sweep_name_from_the_file_name_is_checked(tmp_path: Path, config_file: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """Without --name the sweep is named by the spec file's stem; one with a space is refused, saying so."""
    line = bism_error(capsys, ["tune", str(_spec(tmp_path, config_file, "my sweep")), "--output-dir",
                               str(tmp_path / "out")])
    assert "sweep name" in line and "--name" in line
    assert_nothing_written(tmp_path)


# ------------------------------------------------------------------------- 2. counts and memory
@pytest.mark.parametrize("override, key", [
    ("objective.unroll_steps=1000000000", "objective.unroll_steps"),
    ("objective.warmup_steps=1000000000", "objective.warmup_steps"),
    ("trainer.steps=1000000000000", "trainer.steps"),
    ("trainer.batch_size=1000000000000", "trainer.batch_size"),
    ("data.n_train=1000000000000", "data.n_train"),
    ("eval.num_samples=1000000000", "eval.num_samples"),
    ("eval.fid_samples=1000000000", "eval.fid_samples"),
    ("eval.ais_chains=1000000000", "eval.ais_chains"),
    ("eval.langevin_steps=[0,1000000000,0]", "eval.langevin_steps[1]"),
])
def test_counts_past_any_machine_are_refused(tmp_path: Path, config_file: Path, capsys: pytest.CaptureFixture[str],
                                             override: str, key: str) -> None:
    """objective.unroll_steps=1e9 hung with no step in 240 s (the run left RUNNING): a count no
    machine can do is refused when the config loads, naming the key and the cap."""
    line = bism_error(capsys, ["train", str(config_file), override])
    assert key in line and "allowed" in line
    assert_nothing_written(tmp_path)


@pytest.mark.parametrize("argv", [
    ["sample", "CKPT", "-n", "1000000000", "-o", "x.png"],
    ["diagnose", "CKPT", "--k", "0,1000000000"],
    ["diagnose", "CKPT", "--reference-steps", "1000000000"],
    ["diagnose", "CKPT", "--batches", "1000000000"],
])
def test_counts_of_commands(tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str]) -> None:
    """The same caps for counts given as options, checked before the checkpoint is even read."""
    argv = [str(tmp_path / "nope") if a == "CKPT" else a for a in argv]
    line = bism_error(capsys, argv)
    assert "1000000000" in line and "allowed" in line


def test_memory_floor_past_this_machine(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, config_file: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    """Within the caps but past this machine's memory (here stubbed to 1 MiB): K=10000 unrolled
    steps of a batch of 8 need at least 1.2 MiB for the unroll's graph; refused naming K, with the
    estimate, before anything is written."""
    monkeypatch.setattr(launch, "machine_memory", lambda: 2**20)
    line = bism_error(capsys, ["train", str(config_file), "objective.unroll_steps=10000"])
    assert "objective.unroll_steps" in line and "GiB" in line and "K=10000" in line
    assert_nothing_written(tmp_path)
    line = bism_error(capsys, ["train", str(config_file), "data.n_train=1000000"])
    assert "data.n_train" in line
    assert_nothing_written(tmp_path)


def test_machine_memory_reads_this_machine() -> None:
    have = launch.machine_memory()
    assert have is None or have > 2**20


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.stem)
def test_shipped_configs_fit_a_16_gib_machine(monkeypatch: pytest.MonkeyPatch, path: Path) -> None:
    """The bounds keep every shipped config (CIFAR-10's 300k steps included) loading and within
    the memory floor of a 16 GiB machine, as a new local cluster would run them."""
    monkeypatch.setattr(launch, "machine_memory", lambda: 16 * 2**30)
    monkeypatch.setattr(launch, "_ray_running_here", lambda: False)
    cfg = load_config(path)
    launch.check_memory(cfg, None)


# ------------------------------------------------------------------------- 3. non-finite numbers
@pytest.mark.parametrize("override, key", [
    ("optim.lr=inf", "optim.lr"), ("optim.lr=.inf", "optim.lr"), ("optim.lr=.nan", "optim.lr"),
    ("optim.lr=-1", "optim.lr"), ("optim.lr=0", "optim.lr"), ("optim.lr=1e400", "optim.lr"),
    ("optim.posterior_lr=inf", "optim.posterior_lr"), ("optim.min_lr=-1e-6", "optim.min_lr"),
    ("optim.betas=[0.9,.nan]", "optim.betas"), ("optim.betas=[0.9,1.0]", "optim.betas"),
    ("objective.sigma=inf", "objective.sigma"), ("objective.sigma_end=.nan", "objective.sigma_end"),
    ("objective.unroll_lr=inf", "objective.unroll_lr"), ("posterior.temperature=inf", "posterior.temperature"),
    ("trainer.ema_decay=.nan", "trainer.ema_decay"), ("trainer.cpus_per_worker=inf", "trainer.cpus_per_worker"),
    ("eval.langevin_step_size=inf", "eval.langevin_step_size"), ("eval.langevin_step_size=0", "eval.langevin_step_size"),
    ("eval.langevin_t_max=.nan", "eval.langevin_t_max"),
])
def test_non_finite_and_non_positive_numbers(config_file: Path, capsys: pytest.CaptureFixture[str],
                                             override: str, key: str) -> None:
    """optim.lr=inf passed the `> 0` check and trained on NaNs; every float must be finite, and
    learning rates, noise levels and step sizes > 0, betas in [0, 1)."""
    line = bism_error(capsys, ["train", str(config_file), override])
    assert key in line


def test_non_finite_in_python_built_config() -> None:
    """A section built in Python (no YAML, no coerce) is checked by its own __post_init__."""
    with pytest.raises(ConfigError, match="optim.lr: must be a finite number"):
        OptimConfig(lr=math.inf)
    with pytest.raises(ConfigError, match=r"optim.posterior_betas\[1\]"):
        OptimConfig(posterior_betas=[0.9, math.nan])


# ------------------------------------------------------------------------- 4. config files
def test_config_not_utf8(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A Latin-1 file was a UnicodeDecodeError traceback: now one line naming the file and the byte."""
    path = tmp_path / "latin1.yaml"
    path.write_bytes("trainer: {name: caf\xe9}\n".encode("latin-1"))
    line = bism_error(capsys, ["train", str(path)])
    assert str(path) in line and "UTF-8" in line and "0xe9" in line


def test_override_not_yaml(config_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`trainer.steps=[1` was a YAML traceback: now one line naming the override."""
    line = bism_error(capsys, ["train", str(config_file), "trainer.steps=[1"])
    assert "trainer.steps=[1" in line and "not valid YAML" in line


@pytest.mark.parametrize("text, key, lines", [
    ("trainer: {steps: 1}\ntrainer: {steps: 2}\n", "'trainer'", "lines 1 and 2"),
    ("trainer:\n  steps: 1\n  batch_size: 8\n  steps: 2\n", "'steps'", "lines 2 and 4"),
])
def test_duplicate_key_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, key: str,
                                  lines: str) -> None:
    """PyYAML keeps the last of two equal keys silently (a second trainer: section dropped the
    first): refused, naming the key and both lines."""
    path = tmp_path / "dup.yaml"
    path.write_text(text)
    line = bism_error(capsys, ["train", str(path)])
    assert key in line and lines in line and str(path) in line


def test_yaml_that_stays_valid(tmp_path: Path) -> None:
    """The strict reading keeps what YAML allows: merge keys that override a merged key, a
    byte-order mark, and `{}` for all defaults."""
    path = tmp_path / "merge.yaml"
    path.write_bytes("\ufefftrainer: &t {steps: 3, batch_size: 8}\neval:\n  <<: {every: 5, num_samples: 4}\n"
                     "  every: 7\n".encode())
    cfg = load_config(path)
    assert (cfg.trainer.steps, cfg.eval.every, cfg.eval.num_samples) == (3, 7, 4)
    path.write_text("{}\n")
    assert load_config(path) == Config()


@pytest.mark.parametrize("text", ["", "# nothing but a comment\n", "---\n"])
def test_empty_config_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str) -> None:
    """An empty file trained a full default run (2000 steps, DDP): refused, saying so; `{}` still
    means the defaults on purpose."""
    path = tmp_path / "empty.yaml"
    path.write_text(text)
    line = bism_error(capsys, ["train", str(path)])
    assert str(path) in line and "empty" in line
    assert not (tmp_path / "outputs").exists()


def test_unreadable_run_record(tmp_path: Path, config_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """An earlier launch's bism_config.yaml that was cut off (not YAML) or emptied was a traceback
    (or, empty, compared as "all None"): one line naming the file and the run."""
    record = tmp_path / "out" / "ray_results" / "bad-input" / "bism_config.yaml"
    record.parent.mkdir(parents=True)
    for text in ("data: {name: checker", ""):
        record.write_text(text)
        line = bism_error(capsys, ["train", str(config_file)])
        assert str(record) in line and "'bad-input'" in line
    assert not (tmp_path / "out" / "ray_results" / "bad-input" / "checkpoint_00000002").exists()


def test_config_path_is_a_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A directory was reported as "not found"."""
    line = bism_error(capsys, ["train", str(tmp_path)])
    assert "is a directory" in line and "not found" not in line


def test_spec_duplicate_key_and_bad_override(tmp_path: Path, config_file: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    """The same reading for sweep specs: a duplicate key, and an override that is not YAML."""
    spec = _spec(tmp_path, config_file)
    line = bism_error(capsys, ["tune", str(spec), "num_samples=[1"])
    assert "num_samples=[1" in line and "not valid YAML" in line
    spec.write_text(spec.read_text() + "mode: max\n")
    line = bism_error(capsys, ["tune", str(spec)])
    assert "'mode'" in line and "twice" in line


# ------------------------------------------------------------------------- 5. options among overrides
def test_options_between_overrides(tmp_path: Path, config_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`bism train CONFIG --address X k=v` failed with "unrecognized arguments: k=v": the override
    after the option is read now (here a misspelt key after it is the error reported)."""
    line = bism_error(capsys, ["train", str(config_file), "trainer.strategy=ddp", "--address", "127.0.0.1:9",
                               "trainer.stpes=1"])
    assert "trainer.stpes" in line and "unknown key" in line
    line = bism_error(capsys, ["train", str(config_file), "--address", "127.0.0.1:9", "trainer.strategy=ddp"])
    assert "127.0.0.1:9" in line
    assert_nothing_written(tmp_path)


def test_options_between_tune_overrides(tmp_path: Path, config_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The same for `bism tune SPEC --name N k=v`."""
    line = bism_error(capsys, ["tune", str(_spec(tmp_path, config_file)), "--name", "..", "num_samples=2",
                               "--output-dir", str(tmp_path / "out"), "mode=max"])
    assert "--name" in line


# ------------------------------------------------------------------------- 6. before the MLflow run
@pytest.mark.parametrize("override", ["trainer.precision=bf16", "trainer.precision=fp16", "trainer.use_gpu=true"])
def test_gpu_settings_on_a_machine_without_gpus(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, config_file: Path,
                                                capsys: pytest.CaptureFixture[str], override: str) -> None:
    """bf16 with no GPU was reported by the workers after the MLflow run was opened (a FAILED run
    and a run directory left behind): a new local cluster on a machine without GPUs is refused
    first. Whether a cluster runs here, and the GPU count, are stubbed: this test is about the
    order, on any machine."""
    import torch

    monkeypatch.setattr(launch, "_ray_running_here", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    key = override.split("=")[0]
    line = bism_error(capsys, ["train", str(config_file), "trainer.strategy=deepspeed", override,
                               "tracking.enabled=true"])
    assert key in line and "no GPUs" in line
    assert_nothing_written(tmp_path)


def test_gpu_check_leaves_other_clusters_alone(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A cluster given by address (or running here) is judged once connected, not by this machine."""
    import torch

    cfg = from_dict(Config, {**TINY, "trainer": {**TINY["trainer"], "strategy": "deepspeed", "precision": "bf16"}})
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    monkeypatch.setattr(launch, "_ray_running_here", lambda: True)
    launch.check_local_gpus(cfg, None)
    monkeypatch.setattr(launch, "_ray_running_here", lambda: False)
    launch.check_local_gpus(cfg, "10.0.0.1:6379")
    with pytest.raises(ConfigError, match="trainer.precision"):
        launch.check_local_gpus(cfg, "local")


def _idx(n: int) -> bytes:
    """An idx3-ubyte file of n black 28×28 images."""
    return b"\x00\x00\x08\x03" + n.to_bytes(4, "big") + (28).to_bytes(4, "big") * 2 + bytes(n * 28 * 28)


@pytest.mark.parametrize("damage", ["truncated", "garbage", "truncated_gz", "garbage_gz", "wrong_size_images"])
def test_corrupt_fashion_mnist_before_the_run_opens(tmp_path: Path, config_file: Path,
                                                    capsys: pytest.CaptureFixture[str], damage: str) -> None:
    """A cut-off or foreign idx file was found by the training loop, after the MLflow run opened:
    the pre-flight reads each file's header and size (not its images) and names the file."""
    root = tmp_path / "fm"
    root.mkdir()
    (root / "train-images-idx3-ubyte").write_bytes(_idx(40))
    bad, data = root / "t10k-images-idx3-ubyte", _idx(20)
    if damage == "truncated":
        bad.write_bytes(data[:-100])
    elif damage == "garbage":
        bad.write_bytes(b"<html>not found</html>" * 10)
    elif damage == "truncated_gz":
        bad = root / "t10k-images-idx3-ubyte.gz"
        bad.write_bytes(gzip.compress(data)[:-8])
    elif damage == "garbage_gz":
        bad = root / "t10k-images-idx3-ubyte.gz"
        bad.write_bytes(b"garbage" * 10)
    else:
        bad.write_bytes(b"\x00\x00\x08\x03" + (20).to_bytes(4, "big") + (32).to_bytes(4, "big") * 2 + bytes(20 * 1024))
    line = bism_error(capsys, ["train", str(config_file), "data.name=fashion_mnist", f"data.root={root}",
                               "data.n_train=16", "data.n_test=8", "tracking.enabled=true"])
    assert "fashion_mnist" in line and str(bad) in line
    assert_nothing_written(tmp_path)


def test_good_fashion_mnist_files_pass(tmp_path: Path) -> None:
    """The header check accepts intact files, raw and gzip-compressed."""
    from distributed_bism.config import DataConfig
    from distributed_bism.data import check_dataset

    for gz in (False, True):
        root = tmp_path / f"fm{gz}"
        root.mkdir()
        for stem, n in (("train-images-idx3-ubyte", 40), ("t10k-images-idx3-ubyte", 20)):
            (root / (stem + ".gz" if gz else stem)).write_bytes(gzip.compress(_idx(n)) if gz else _idx(n))
        check_dataset(DataConfig(name="fashion_mnist", root=str(root)))
