"""Names that resume: every shipped config names its run (trainer.name), so rerunning the command
the README shows continues that run (its checkpoints and MLflow run) instead of starting a new,
timestamped one."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from distributed_bism.cli import main
from distributed_bism.config import load_config
from tests.helpers.local_runs import scratch_cwd  # noqa: F401 (an autouse fixture)

REPO = Path(__file__).resolve().parents[2]
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))


def test_every_shipped_config_names_its_run() -> None:
    """Each YAML under configs/ sets trainer.name (a config added without one fails here), and no
    two share a name (they would share one run directory, and the second would be refused)."""
    assert CONFIGS, "no configs found"
    names = {path.name: load_config(path).trainer.name for path in CONFIGS}
    unnamed = sorted(file for file, name in names.items() if not name)
    assert not unnamed, f"set trainer.name in {', '.join(unnamed)}: without it each launch is a new timestamped run"
    shared = sorted(name for name in names.values() if list(names.values()).count(name) > 1)
    assert not shared, f"configs share the run name(s) {sorted(set(shared))}"


def readme_train_commands() -> list[tuple[str, list[str]]]:
    """(config path, overrides) of every `bism train configs/...` and `bism demo ...` line of
    README.md's code blocks, options (--address HOST:PORT) and comments left out."""
    text = (REPO / "README.md").read_text()
    found = []
    for line in re.findall(r"^bism (?:train configs/|demo\b).*$", text, flags=re.M):
        command, *words = shlex.split(line, comments=True)[1:]
        config = "configs/demo.yaml" if command == "demo" else words.pop(0)
        overrides, option = [], False
        for word in words:
            if not option and not word.startswith("--"):
                overrides.append(word)
            option = word.startswith("--")  # --address HOST:PORT: the option and its value
        found.append((config, overrides))
    return found


def test_readme_train_commands_resume_and_do_not_collide(tmp_path: Path) -> None:
    """Each `bism train` command the README shows has a fixed run name (so rerunning it resumes),
    and commands that share a name run the same set-up, so running one after another continues
    the run instead of being refused (preflight.check_resume, the check a relaunch meets)."""
    from distributed_bism.launch.preflight import RUN_CONFIG_FILE, check_resume

    commands = readme_train_commands()
    assert len(commands) >= 5 and any(c == "configs/checkerboard_grbm_bidsm.yaml" for c, _ in commands), commands
    first: dict[str, Path] = {}
    for config, overrides in commands:
        cfg = load_config(REPO / config, overrides)
        assert cfg.trainer.name, f"`bism train {config} {' '.join(overrides)}` in README.md starts a new run each time"
        run_dir = first.setdefault(str(cfg.trainer.name), tmp_path / str(cfg.trainer.name))
        if not run_dir.exists():
            run_dir.mkdir()
            (run_dir / RUN_CONFIG_FILE).write_text(cfg.to_yaml())
        assert check_resume(cfg, run_dir)


def test_rerunning_a_config_continues_its_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`bism train configs/checkerboard_grbm_bidsm.yaml ...` twice, as the README shows it (local,
    tiny, untracked to stay fast; trainer.name not given): the second launch continues from the
    first's last checkpoint, in the same run directory, instead of starting a new run at step 0.
    (That the same name also continues the same MLflow run is test_tracking.py's.)"""
    path = REPO / "configs" / "checkerboard_grbm_bidsm.yaml"
    name = load_config(path).trainer.name
    out = tmp_path / "out"
    tiny = ["trainer.strategy=local", f"trainer.output_dir={out}", "trainer.checkpoint_every=2", "tracking.enabled=false",
            "data.n_train=256", "data.n_test=64", "eval.every=1000", "eval.metrics=[test_loglik]"]

    assert main(["train", str(path), *tiny, "trainer.steps=4"]) == 0
    first = capsys.readouterr().out
    assert main(["train", str(path), *tiny, "trainer.steps=8"]) == 0
    second = capsys.readouterr().out
    assert f"run {name!r}: new run" in first and "steps 0 → 4" in first
    run_dir = out / "ray_results" / str(name)
    assert f"run {name!r}: continuing from its latest checkpoint" in second
    assert f"resumed from {run_dir / 'checkpoint_00000004'} at step 4" in second and "steps 4 → 8" in second
    assert [p.name for p in (out / "ray_results").iterdir()] == [name], "the relaunch started a second run"
    assert sorted(p.name for p in run_dir.glob("checkpoint_*")) == ["checkpoint_00000006", "checkpoint_00000008"]
