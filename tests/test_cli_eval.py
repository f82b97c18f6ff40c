"""`bism eval` and `bism sample` on a finished local run (a tiny tracked GRBM): the table is logged
into the checkpoint's own MLflow run at its step (no second run, nothing of training's replaced),
a sample figure names its sampler and is never overwritten without --force, and bad references,
metrics and samplers are one-line errors with exit status 2."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from distributed_bism import train
from distributed_bism.cli import main
from local_runs import checkpoint_dirs, scratch_cwd, snapshot, tiny  # noqa: F401 (scratch_cwd: an autouse fixture)


@dataclass
class Finished:
    uri: str
    run_id: str
    checkpoint: Path
    out: Path


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> Finished:
    """A tracked 4-step run evaluated (test_loglik, samples) at steps 0 and 4."""
    out = tmp_path_factory.mktemp("finished")
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        cfg = tiny(out, **{"tracking.enabled": True, "trainer.steps": 4, "eval.every": 4,
                           "eval.metrics": ["test_loglik", "samples"]})
        summary = train(cfg)
    return Finished(str(summary.tracking_uri), str(summary.run_id), checkpoint_dirs(cfg)[-1], out)


def _runs(uri: str) -> list[str]:
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    return sorted(r.info.run_id for e in client.search_experiments() for r in client.search_runs([e.experiment_id]))


def test_eval_logs_into_the_checkpoints_run(finished: Finished, capsys: pytest.CaptureFixture[str],
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """By run id and by checkpoint directory: the printed table holds the same test log-likelihood
    training logged at step 4 (same weights); each call adds one value at step 4 to the same run
    (the run count unchanged), its grid goes under eval/step_00000004_<time>/, and training's
    artifacts are untouched."""
    from mlflow import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    client = MlflowClient(finished.uri)
    runs_before = _runs(finished.uri)
    trained_artifacts = snapshot(finished.out / "mlartifacts")
    (logged,) = [m.value for m in client.get_metric_history(finished.run_id, "eval/test_loglik") if m.step == 4]

    assert main(["eval", finished.run_id, "--tracking-uri", finished.uri, "--metrics", "test_loglik", "samples"]) == 0
    printed = capsys.readouterr().out
    row = next(line for line in printed.splitlines() if line.startswith("eval/test_loglik"))
    assert float(row.split()[1]) == pytest.approx(logged, abs=1e-5), printed
    assert f"logged to MLflow run {finished.run_id} at step 4" in printed
    assert main(["eval", str(finished.checkpoint), "--metrics", "test_loglik"]) == 0  # the config's store
    capsys.readouterr()

    assert _runs(finished.uri) == runs_before
    history = client.get_metric_history(finished.run_id, "eval/test_loglik")
    assert sorted(m.step for m in history) == [0, 4, 4, 4]
    assert all(m.value == pytest.approx(logged, abs=1e-5) for m in history if m.step == 4)
    (folder,) = client.list_artifacts(finished.run_id, "eval")
    assert folder.path.startswith("eval/step_00000004_")
    assert [a.path for a in client.list_artifacts(finished.run_id, f"{folder.path}/samples")] == [
        f"{folder.path}/samples/step_00000004.png"]
    after = snapshot(finished.out / "mlartifacts")
    assert {k: v for k, v in after.items() if k in trained_artifacts} == trained_artifacts


def test_sample_writes_a_labelled_figure_and_refuses_to_overwrite(finished: Finished, tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """The figure's title names the sampler (conditional, gibbs); an existing file is kept,
    byte for byte, unless --force."""
    from PIL import Image

    grid = tmp_path / "grid.png"
    ckpt = str(finished.checkpoint)
    assert main(["sample", ckpt, "-n", "16", "-o", str(grid)]) == 0
    assert "conditional" in Image.open(grid).text["Title"]
    before = grid.read_bytes()
    capsys.readouterr()
    assert main(["sample", ckpt, "-n", "16", "--sampler", "gibbs", "-o", str(grid)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("bism: error: ") and "--force" in err and err.count("\n") == 1, err
    assert grid.read_bytes() == before
    assert main(["sample", ckpt, "-n", "16", "--sampler", "gibbs", "-o", str(grid), "--force"]) == 0
    assert "gibbs" in Image.open(grid).text["Title"]


@pytest.mark.parametrize("args, message", [
    (["eval", "{missing}"], "neither a checkpoint directory nor an MLflow run id"),
    (["eval", "0123456789abcdef0123456789abcdef", "--tracking-uri", "{uri}"], "nor an MLflow run in"),
    (["eval", "{ckpt}", "--metrics", "test_loglik", "nope"], "--metrics: unknown metric 'nope'"),
    (["sample", "{ckpt}", "--sampler", "nope", "-o", "{png}"], "--sampler: unknown sampler 'nope'"),
    (["sample", "{run_dir}/checkpoint_99999999", "-o", "{png}"], "neither a checkpoint directory"),
])
def test_bad_input_is_one_line_and_exit_2(finished: Finished, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                         args: list[str], message: str) -> None:
    """Bad references, metric names and sampler names: one line on stderr, exit 2, nothing written."""
    runs_before = _runs(finished.uri)
    values = {"missing": str(tmp_path / "nowhere"), "uri": finished.uri, "ckpt": str(finished.checkpoint),
              "png": str(tmp_path / "x.png"), "run_dir": str(finished.checkpoint.parent)}
    assert main([a.format(**values) for a in args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("bism: error: ") and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "x.png").exists() and _runs(finished.uri) == runs_before
