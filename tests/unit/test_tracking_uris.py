"""The tracking store is checked before anything starts: a URI MLflow has no store for, a bare
path (a file store, which MLflow 3 refuses unless MLFLOW_ALLOW_FILE_STORE=true), an sqlite file
in a directory that cannot hold files, or a database whose driver is missing is one line on
stderr and exit status 2, with no MLflow traceback, no run opened and nothing written."""

from __future__ import annotations

from pathlib import Path

import pytest

from distributed_bism.cli import main
from tests.helpers.local_runs import run_dir, scratch_cwd, tiny  # noqa: F401 (scratch_cwd: an autouse fixture)


def _config(tmp_path: Path) -> tuple[Path, Path]:
    """A tiny tracked run's YAML, and its output directory."""
    out = tmp_path / "out"
    path = tmp_path / "tiny.yaml"
    path.write_text(tiny(out, **{"tracking.enabled": True, "trainer.steps": 4}).to_yaml())
    return path, out


@pytest.mark.parametrize("uri, env, message", [
    ("garbage://xx", None, "tracking.tracking_uri: 'garbage://xx' has the scheme garbage://, for which MLflow has no"),
    ("localhost:5000", None, "scheme localhost://, for which MLflow has no tracking store"),
    ("notascheme", None, "tracking.tracking_uri: 'notascheme' is a path, i.e. an MLflow file store"),
    ("file:///{tmp}/fs", None, "is a path, i.e. an MLflow file store, which MLflow 3 refuses"),
    (None, "foo://bar", "$MLFLOW_TRACKING_URI: 'foo://bar' has the scheme foo://"),
    ("sqlite:////proc/x.db", None, "tracking.tracking_uri: sqlite:////proc/x.db: cannot write in /proc"),
    ("sqlite:///{tmp}/afile/x.db", None, "cannot write in {tmp}/afile"),
    ("sqlite:///{tmp}/notdb.db", None, "notdb.db exists and is not an SQLite database"),
    ("sqlite://", None, "is an in-memory database, which keeps nothing"),
    ("mysql://u@localhost/x", None, "the mysql driver mysqldb is not installed (no Python module MySQLdb)"),
    ("postgresql+nosuchdriver://u@localhost/x", None, "is not a valid postgresql URI"),
])
def test_bad_tracking_uri_is_one_line_and_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                 monkeypatch: pytest.MonkeyPatch, uri: str | None, env: str | None,
                                                 message: str) -> None:
    """One `bism: error:` line naming the key and the URI; no run directory, no mlflow.db, no
    ./mlruns: preflight failed before any run opened or worker started."""
    (tmp_path / "afile").write_text("a file, not a directory")
    (tmp_path / "notdb.db").write_text("not a database")
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    if env is None:
        monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    else:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", env)
    path, out = _config(tmp_path)
    over = [f"tracking.tracking_uri={uri.format(tmp=tmp_path)}"] if uri else []
    assert main(["train", str(path), *over]) == 2
    err = capsys.readouterr().err
    assert err.startswith("bism: error: ") and err.count("\n") == 1, err
    assert message.format(tmp=tmp_path) in err and "Traceback" not in err, err
    assert not (run_dir(tiny(out)) / "bism_config.yaml").exists()
    assert not (out / "mlflow.db").exists() and list(Path.cwd().iterdir()) == []  # the scratch cwd: no ./mlruns


def test_a_file_store_is_used_when_mlflow_allows_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """MLflow's own opt-in, MLFLOW_ALLOW_FILE_STORE=true, is kept: a bare path (relative to the
    working directory, as MLflow reads it) is then a file store the run is logged to."""
    from mlflow import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    path, _ = _config(tmp_path)
    cwd = Path.cwd()  # the autouse scratch_cwd fixture's
    assert main(["train", str(path), "tracking.tracking_uri=fstore"]) == 0
    assert (cwd / "fstore").is_dir()
    runs = MlflowClient(str(cwd / "fstore")).search_runs(
        [e.experiment_id for e in MlflowClient(str(cwd / "fstore")).search_experiments()])
    assert [r.info.status for r in runs] == ["FINISHED"]


@pytest.fixture(scope="module")
def tracked_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The last checkpoint of a tiny tracked run (default sqlite store)."""
    import contextlib
    import io

    from distributed_bism import train
    from tests.helpers.local_runs import checkpoint_dirs

    out = tmp_path_factory.mktemp("tracked")
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(io.StringIO()):
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        cfg = tiny(out, **{"tracking.enabled": True, "trainer.steps": 4})
        train(cfg)
    return checkpoint_dirs(cfg)[-1]


@pytest.mark.parametrize("args, env, message", [
    (["--tracking-uri", "garbage://xx"], None, "--tracking-uri: 'garbage://xx' has the scheme garbage://"),
    ([], "foo://bar", "$MLFLOW_TRACKING_URI: 'foo://bar' has the scheme foo://"),
])
def test_eval_checks_the_store_it_logs_to(tracked_checkpoint: Path, capsys: pytest.CaptureFixture[str],
                                          monkeypatch: pytest.MonkeyPatch, args: list[str], env: str | None,
                                          message: str) -> None:
    """`bism eval` of a tracked checkpoint logs to a store: a bad one is one line and exit 2,
    before any metric runs (no eval/ folder written)."""
    if env is None:
        monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    else:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", env)
    evals = tracked_checkpoint.parents[2] / "evals"
    assert main(["eval", str(tracked_checkpoint), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("bism: error: ") and err.count("\n") == 1 and message in err, err
    assert not evals.exists()
