"""What `bism sample` and `bism eval` read and write, and what they refuse.

`bism sample -o`: a name without a known suffix, an existing file (without --force), a directory,
a place where no file can be created, or a checkpoint directory is refused in one line before
any work; what is printed is exactly the files written. `bism eval` / `bism sample` of a
state.pt that is not a checkpoint say so, and never suggest torch.load(weights_only=False)."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import pytest
import torch

from distributed_bism import train
from distributed_bism.cli import main
from tests.helpers.local_runs import checkpoint_dirs, scratch_cwd, snapshot, tiny  # noqa: F401 (scratch_cwd: an autouse fixture)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The last checkpoint of a tiny 4-step run (no tracking)."""
    out = tmp_path_factory.mktemp("trained")
    with contextlib.redirect_stdout(io.StringIO()):
        cfg = tiny(out, **{"trainer.steps": 4})
        train(cfg)
    return checkpoint_dirs(cfg)[-1]


def _error(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    """`bism ARGV` must fail as bad input: exit 2, one `bism: error:` line on stderr; that line."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("bism: error: ") and err.count("\n") == 1, err
    return err


@pytest.mark.parametrize("name, message", [
    ("noext", "the file name must end in .png, .npz, .pt"),
    ("grid.jpg", "the file name must end in .png, .npz, .pt"),
    ("adir", "the file name must end in .png, .npz, .pt"),
    ("adir.png", "is a directory; -o names a file"),
    ("afile/grid.png", "cannot write in"),
])
def test_sample_refuses_an_output_it_cannot_write_as_named(checkpoint: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str], name: str,
                                                          message: str) -> None:
    """Even with --force: nothing is written, not `noext.png` for `-o noext`, nor `adir.png` for
    `-o adir` (an existing directory)."""
    where = tmp_path / "o"
    where.mkdir()
    (where / "adir").mkdir()
    (where / "adir.png").mkdir()
    (where / "afile").write_text("a file")
    before = snapshot(where)
    err = _error(capsys, ["sample", str(checkpoint), "-n", "4", "-o", str(where / name), "--force"])
    assert message in err and str(where / name) in err, err
    assert snapshot(where) == before and sorted(p.name for p in where.iterdir()) == ["adir", "adir.png", "afile"]


def test_sample_creates_no_directory_for_refused_arguments(checkpoint: Path, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    """`-o new/dir/grid.png` with a bad --sampler: refused, and new/ not created."""
    out = tmp_path / "new" / "dir" / "g.png"
    err = _error(capsys, ["sample", str(checkpoint), "--sampler", "nope", "-o", str(out)])
    assert "--sampler: unknown sampler 'nope'" in err and not (tmp_path / "new").exists()


def test_sample_never_writes_into_a_checkpoint(checkpoint: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`-o <checkpoint>/state.pt --force` would replace the model with samples: refused, the
    checkpoint kept byte for byte."""
    before = snapshot(checkpoint)
    err = _error(capsys, ["sample", str(checkpoint), "-n", "4", "-o", str(checkpoint / "state.pt"), "--force"])
    assert "is a checkpoint directory" in err
    assert snapshot(checkpoint) == before


@pytest.mark.parametrize("name, written", [
    ("grid.png", ["grid.png"]),
    ("s.npz", ["s.npz", "s.png"]),
    ("s.pt", ["s.pt", "s.png"]),
    ("new/dir/grid.png", ["new/dir/grid.png"]),
])
def test_sample_prints_exactly_the_files_it_writes_and_keeps_them(checkpoint: Path, tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str], name: str,
                                                                  written: list[str]) -> None:
    """The `wrote` line names the files that appeared, no more, no fewer; a second run without
    --force refuses and leaves them byte for byte; with --force it replaces them."""
    out = tmp_path / "outputs"
    out.mkdir()
    assert main(["sample", str(checkpoint), "-n", "4", "-o", str(out / name)]) == 0
    printed = capsys.readouterr().out.strip().splitlines()[-1]
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert files == sorted(written)
    assert printed == "wrote " + " and ".join(str(out / w) for w in written)
    before = snapshot(out)
    err = _error(capsys, ["sample", str(checkpoint), "-n", "4", "--seed", "1", "-o", str(out / name)])
    assert "exists; choose another -o or pass --force" in err
    assert snapshot(out) == before
    assert main(["sample", str(checkpoint), "-n", "4", "--seed", "1", "-o", str(out / name), "--force"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == printed
    after = snapshot(out)
    assert set(after) == set(before) and all(after[f] != before[f] for f in after)


def _not_a_checkpoint(kind: str, directory: Path) -> None:
    directory.mkdir()
    state = directory / "state.pt"
    if kind == "random bytes":
        state.write_bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0),
                                        dtype=torch.uint8).numpy().tobytes())
    elif kind == "empty":
        state.write_bytes(b"")
    else:  # a pickle of something a checkpoint never holds: torch's weights-only unpickler refuses it
        torch.save({"format": 1, "thing": Path("/x")}, state)


@pytest.mark.parametrize("command", ["eval", "sample"])
@pytest.mark.parametrize("kind", ["random bytes", "empty", "foreign pickle"])
def test_a_state_that_is_not_a_checkpoint_is_named_without_unsafe_advice(tmp_path: Path,
                                                                          capsys: pytest.CaptureFixture[str],
                                                                          command: str, kind: str) -> None:
    """One line naming the file and saying it is corrupt or not a checkpoint; never torch's advice
    to load it with weights_only=False (which would let the file run code)."""
    _not_a_checkpoint(kind, tmp_path / "ckpt")
    extra = ["-o", str(tmp_path / "x.png")] if command == "sample" else ["--no-log"]
    argv = [command, str(tmp_path / "ckpt"), *extra]
    err = _error(capsys, argv)
    assert f"{tmp_path / 'ckpt' / 'state.pt'}" in err and "corrupt or not a checkpoint" in err, err
    assert "weights_only" not in err and "False" not in err, err
    assert not (tmp_path / "x.png").exists()
