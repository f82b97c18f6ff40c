"""Discoverable configuration: `bism config show`, `bism config keys`, `bism --version`, and the
samplers `bism sample --help` lists. All in this process, through distributed_bism.cli.main."""

from __future__ import annotations

import dataclasses
import importlib.metadata
import re
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from distributed_bism.cli import main
from distributed_bism.config import Config, load_config
from distributed_bism.config.keys import config_keys, field_help
from distributed_bism.registry.samplers import SAMPLERS

REPO = Path(__file__).resolve().parents[2]
DEMO = str(REPO / "configs" / "demo.yaml")


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of `bism argv...`; argparse's own exits (--help, --version,
    usage errors) included."""
    try:
        rc = main(list(argv))
    except SystemExit as e:
        rc = int(e.code or 0)
    out = capsys.readouterr()
    return rc, out.out, out.err


# --------------------------------------------------------------------------- bism config show
def test_show_prints_the_resolved_config(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """The YAML is the file plus the overrides plus every default, and loads back to the same Config."""
    rc, out, err = run(capsys, "config", "show", DEMO, "trainer.steps=7", "objective.unroll_steps=3")
    assert rc == 0 and err == ""
    shown = yaml.safe_load(out)
    expected = load_config(DEMO, ["trainer.steps=7", "objective.unroll_steps=3"])
    assert shown == expected.to_dict()
    assert shown["trainer"]["steps"] == 7 and shown["objective"]["unroll_steps"] == 3
    assert shown["model"]["name"] == "conv" and shown["eval"]["raise_chains"] == 0  # the file's; a default
    saved = tmp_path / "resolved.yaml"
    saved.write_text(out)
    assert load_config(saved) == expected


@pytest.mark.parametrize("bad, words", [
    (["trainer.stepz=5"], "trainer.stepz: unknown key"),
    (["trainer.steps=-1"], "trainer.steps: must be > 0"),
    (["objective.name=nope"], "objective.name: unknown objective 'nope'"),
    (["trainer.steps"], "expected key=value"),
    (["model.h_dim=[1"], "not valid YAML"),
])
def test_show_errors_are_train_errors(capsys: pytest.CaptureFixture[str], bad: list[str], words: str) -> None:
    """A bad key or value: exit 2 and the very line `bism train` prints for it."""
    rc, out, err = run(capsys, "config", "show", DEMO, *bad)
    assert (rc, out) == (2, "") and err.startswith("bism: error: ") and words in err and err.count("\n") == 1
    assert run(capsys, "train", DEMO, *bad) == (2, "", err)


def test_show_of_a_missing_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    missing = str(tmp_path / "nope.yaml")
    rc, out, err = run(capsys, "config", "show", missing)
    assert (rc, out) == (2, "") and err == f"bism: error: config file not found: {missing}\n"
    assert run(capsys, "train", missing) == (2, "", err)


# --------------------------------------------------------------------------- bism config keys
def test_keys_lists_every_key_with_type_default_and_meaning(capsys: pytest.CaptureFixture[str]) -> None:
    """One row per key of a default Config (no more, no fewer), with its default as YAML and a
    meaning; spot checks against the schema's own text."""
    rc, out, err = run(capsys, "config", "keys")
    assert rc == 0 and err == ""
    header, *rows = out.splitlines()
    assert header.split() == ["KEY", "TYPE", "DEFAULT", "MEANING"]
    defaults = Config().flat()
    assert [r.split()[0] for r in rows] == list(defaults)
    start = header.index("DEFAULT"), header.index("MEANING")
    for row in rows:
        key = row.split()[0]
        assert yaml.safe_load(row[start[0]:start[1]]) == defaults[key], row
        assert row[start[1]:].strip(), f"{key} has no meaning"
    by_key = {r.split()[0]: r for r in rows}
    assert by_key["objective.unroll_steps"].split()[1:3] == ["int", "0"]
    assert "K: differentiable lower-level steps per iteration" in by_key["objective.unroll_steps"]
    assert by_key["trainer.use_gpu"].split()[1:5] == ["bool", "|", "None", "null"]
    assert by_key["model.hidden"].split()[1:4] == ["list[int]", "[256,", "256]"]
    # a comment block above a field (no trailing comment), joined into one line
    assert by_key["data.pad"].endswith("image sets: zero pixels added on every side before training sees them, "
                                       "so the noise and the loss cover them too (the reference pads MNIST-size "
                                       "28×28 to 32×32: pad 2)")


def test_every_config_field_has_a_help_line() -> None:
    """A field added to config/schema.py or run_schema.py without a comment fails here."""
    keys = config_keys()
    assert len(keys) == len(Config().flat())
    missing = [k.key for k in keys if not k.help.strip()]
    assert not missing, f"give these fields a `# meaning` comment in distributed_bism/config/: {missing}"


@dataclass
class _Commented:
    """A dataclass whose fields carry help in each way the schema writes it."""

    plain: int = 1  # a trailing comment
    # a block above,
    # two lines long
    above: str = "x"
    # a block above a field that has a trailing comment too (a group's heading)
    trailing_wins: float = 0.5  # the trailing one
    wrapped: str | None = (
        None  # a comment inside the statement
    )
    bare: list[int] = field(default_factory=list)

    def method(self) -> int:  # not a field
        return self.plain


def test_field_help_reads_each_comment_form() -> None:
    assert field_help(_Commented) == {
        "plain": "a trailing comment",
        "above": "a block above, two lines long",
        "trailing_wins": "the trailing one",
        "wrapped": "a comment inside the statement",
        "bare": "",
    }
    assert list(field_help(_Commented)) == [f.name for f in dataclasses.fields(_Commented)]


def test_keys_filter(capsys: pytest.CaptureFixture[str]) -> None:
    """A section name lists that section's keys; part of a name lists the keys holding it, in any
    case; no match is one line and exit 2."""
    rc, out, _ = run(capsys, "config", "keys", "objective")
    listed = [r.split()[0] for r in out.splitlines()[1:]]
    assert rc == 0 and listed == [k for k in Config().flat() if k.startswith("objective.")]
    rc, out, _ = run(capsys, "config", "keys", "SIGMA_")
    assert rc == 0 and [r.split()[0] for r in out.splitlines()[1:]] == [
        "objective.sigma_begin", "objective.sigma_end", "objective.sigma_schedule"]
    rc, out, err = run(capsys, "config", "keys", "nothing_like_this")
    assert (rc, out) == (2, "") and err.count("\n") == 1
    assert err.startswith("bism: error: config keys: no key contains 'nothing_like_this' (sections: data, model,")


def test_config_needs_an_action(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = run(capsys, "config")
    assert rc == 2 and out == "" and "show" in err and "keys" in err
    rc, _, err = run(capsys, "config", "show")
    assert rc == 2 and "config" in err


# --------------------------------------------------------------------------- --version, sample --help
def test_version(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """The installed distribution's version, read from its metadata; a checkout run without
    installing says so."""
    rc, out, _ = run(capsys, "--version")
    assert rc == 0 and out == f"bism {importlib.metadata.version('distributed-bism')}\n"
    versions = {"distributed-bism": "9.8.7"}
    monkeypatch.setattr(importlib.metadata, "version", lambda name: versions[name])
    assert run(capsys, "--version") == (0, "bism 9.8.7\n", "")

    def not_installed(name: str) -> str:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", not_installed)
    assert run(capsys, "--version") == (0, "bism unknown (not installed)\n", "")


def _sampler_help(capsys: pytest.CaptureFixture[str]) -> list[str]:
    rc, out, _ = run(capsys, "sample", "--help")
    assert rc == 0
    text = " ".join(out.split())
    found = re.search(r"--sampler SAMPLER one of (.*?) \(default: conditional\)", text)
    assert found, text
    return found.group(1).split(", ")


def test_sample_help_lists_the_sampler_registry(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
                                               ) -> None:
    """Every sampler of distributed_bism/registry/samplers.py, read from it: one registered later
    shows up too."""
    assert _sampler_help(capsys) == list(SAMPLERS)
    monkeypatch.setitem(SAMPLERS, "a_new_sampler", "somewhere:NewSampler")
    assert _sampler_help(capsys) == list(SAMPLERS) and "a_new_sampler" in SAMPLERS
