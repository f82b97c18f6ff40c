"""Bad configuration values are rejected with a message that names the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from distributed_bism.cli import main
from distributed_bism.config import Config, ConfigError, ObjectiveConfig, from_dict, load_config


@pytest.mark.parametrize("override,message", [
    ("objective.unroll_steps=-1", "objective.unroll_steps: K must be >= 0, got -1"),
    ("objective.warmup_steps=-2", "objective.warmup_steps: N must be >= 0, got -2"),
    ("objective.sigma=0", "objective.sigma: must be > 0, got 0.0"),
    ("objective.sigma_begin=-0.1", "objective.sigma_begin: must be > 0"),
    ("objective.name=bism", "objective.name: unknown objective 'bism'"),
    ("objective.lower_level=elbo", "objective.lower_level: expected kl or fisher"),
    ("objective.unroll_steps=2.5", "objective.unroll_steps: expected int, got float 2.5"),
    ("objective.unrol_steps=3", "objective.unrol_steps: unknown key"),
    ("model.h_dim=0", "model.h_dim: must be > 0"),
    ("optim.betas=[0.9]", "optim.betas: need two values"),
    ("trainer.batch_size=abc", "trainer.batch_size: expected int, got str 'abc'"),
    ("nosuch.key=1", "nosuch: unknown key"),
    ("model.name=conv", "objective.name: dsm needs the exact free energy of model.name=grbm"),
])
def test_bad_values_name_the_key(override, message):
    base = ["objective.name=dsm"] if override.startswith("model.name") else []
    with pytest.raises(ConfigError) as err:
        load_config(None, base + [override])
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_yaml_round_trip_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(Config(objective=ObjectiveConfig(name="bissm", unroll_steps=3)).to_yaml())
    cfg = load_config(path, ["objective.unroll_steps=5", "optim.lr=1e-4"])
    assert cfg.objective.name == "bissm" and cfg.objective.unroll_steps == 5 and cfg.optim.lr == 1e-4


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_cli_reports_bad_config_in_one_line(capsys, tmp_path):
    assert main(["train", str(tmp_path / "missing.yaml")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("bism: error: config file not found") and "\n" not in err
    assert main(["demo", "objective.unroll_steps=-1"]) == 2
    assert "objective.unroll_steps" in capsys.readouterr().err


def test_unknown_dataset_is_a_clear_error():
    from distributed_bism.data import load_dataset
    cfg = from_dict(Config, {"data": {"name": "mnist9"}})
    with pytest.raises(ValueError, match="unknown dataset 'mnist9'"):
        load_dataset(cfg.data)


@pytest.mark.parametrize("path", sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml")),
                         ids=lambda p: p.name)
def test_every_shipped_config_loads(path: Path) -> None:
    """Each experiment config in configs/ is valid as shipped (its keys, values and combinations)."""
    cfg = load_config(path)
    assert cfg.trainer.steps > 0
