"""Evaluation of a tiny tracked GRBM run, during training and after it: eval/* and the plots in
its MLflow run; `bism eval` logs its table into the checkpoint's own MLflow run at its step (no
second run, nothing of training's replaced); `bism sample` writes a figure naming its sampler and
never overwrites one without --force; bad references, metrics and samplers are one-line errors
with exit status 2. One training run (module fixture) serves all."""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass
from pathlib import Path

import pytest

from distributed_bism import train
from distributed_bism.cli import main
from tests.helpers.local_runs import checkpoint_dirs, scratch_cwd, snapshot, tiny  # noqa: F401 (scratch_cwd: an autouse fixture)


@dataclass
class Finished:
    uri: str
    run_id: str
    checkpoint: Path
    out: Path
    log: str


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> Finished:
    """A tracked 8-step run evaluated (test_loglik, samples, fid without weights) at 0, 4 and 8."""
    out = tmp_path_factory.mktemp("finished")
    printed = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(printed):
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        cfg = tiny(out, **{"tracking.enabled": True, "trainer.steps": 8, "eval.every": 4,
                           "eval.metrics": ["test_loglik", "samples", "fid"]})
        summary = train(cfg)
    return Finished(str(summary.tracking_uri), str(summary.run_id), checkpoint_dirs(cfg)[-1], out, printed.getvalue())


def test_training_logs_eval_metrics_and_plots(finished: Finished) -> None:
    """eval/test_loglik at 0, 4, 8 (at 8, the exact value of the final weights), a sample grid per
    evaluation whose title names the sampler, the log-likelihood curve and the samples-over-training
    strip; fid without Inception weights is skipped with one printed note, and never logged."""
    from mlflow import MlflowClient
    from PIL import Image

    from distributed_bism.commands.trained import load_trained
    from distributed_bism.data import load_dataset
    from distributed_bism.evaluation.loglik import exact_log_likelihood

    assert finished.log.count("eval: fid: skipped (standard FID needs eval.inception_weights") == 1, finished.log
    client = MlflowClient(finished.uri)
    history = client.get_metric_history(finished.run_id, "eval/test_loglik")
    assert sorted(m.step for m in history) == [0, 4, 8]
    final = load_trained(finished.checkpoint)
    _, test = load_dataset(final.cfg.data)
    assert [m.value for m in history if m.step == 8] == [pytest.approx(exact_log_likelihood(final.energy,
                                                                                            test.flatten(1)), abs=1e-5)]
    assert not any(k.startswith("eval/fid") for k in client.get_run(finished.run_id).data.metrics)
    plots = {a.path for a in client.list_artifacts(finished.run_id, "plots")}
    assert plots == {"plots/test_loglik.png", "plots/samples_over_training.png"}
    for name in ("test_loglik.png", "samples_over_training.png"):
        assert (finished.out / "plots" / "tiny" / name).stat().st_size > 0
    grids = sorted((finished.out / "samples" / "tiny").glob("step_*.png"))
    assert [g.name for g in grids] == [f"step_{s:08d}.png" for s in (0, 4, 8)]
    assert "conditional" in Image.open(grids[-1]).text["Title"]


def test_sample_grids_are_step_indexed_images(finished: Finished) -> None:
    """Each evaluation's grid is MLflow image "samples" at its step (log_image(key=, step=)), which
    the run page's step slider browses: one PNG per step 0, 4, 8, and the run tagged as holding images."""
    from mlflow import MlflowClient

    client = MlflowClient(finished.uri)
    names = [Path(a.path).name for a in client.list_artifacts(finished.run_id, "images")]
    steps = sorted(int(n.split("+")[2]) for n in names if n.startswith("samples+step+") and n.endswith(".png"))
    assert steps == [0, 4, 8], names
    assert client.get_run(finished.run_id).data.tags.get("mlflow.loggedImages") == "True"


def _runs(uri: str) -> list[str]:
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    return sorted(r.info.run_id for e in client.search_experiments() for r in client.search_runs([e.experiment_id]))


def test_eval_logs_into_the_checkpoints_run(finished: Finished, capsys: pytest.CaptureFixture[str],
                                            monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """By run id and by checkpoint directory: the printed table holds the same test log-likelihood
    training logged at step 8 (same weights); each call adds one value at step 8 to the same run
    (the run count unchanged) and its rows to the run's MLflow table eval_results.json, its grid
    goes under eval/step_00000008_<time>/, and training's artifacts are untouched."""
    import pandas as pd
    from mlflow import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    client = MlflowClient(finished.uri)
    runs_before = _runs(finished.uri)
    trained_artifacts = snapshot(finished.out / "mlartifacts")
    (logged,) = [m.value for m in client.get_metric_history(finished.run_id, "eval/test_loglik") if m.step == 8]

    assert main(["eval", finished.run_id, "--tracking-uri", finished.uri, "--metrics", "test_loglik", "samples"]) == 0
    printed = capsys.readouterr().out
    row = next(line for line in printed.splitlines() if line.startswith("eval/test_loglik"))
    assert float(row.split()[1]) == pytest.approx(logged, abs=1e-5), printed
    assert f"logged to MLflow run {finished.run_id} at step 8" in printed
    assert main(["eval", str(finished.checkpoint), "--metrics", "test_loglik"]) == 0  # the config's store
    capsys.readouterr()
    # both evaluations are rows of the run's MLflow table (metric, value, step, which evaluation)
    # (read as load_table reads it; load_table itself searches the global tracking URI, not the client's)
    table = pd.read_json(client.download_artifacts(finished.run_id, "eval_results.json", str(tmp_path)), orient="split")
    assert '"type": "table"' in client.get_run(finished.run_id).data.tags["mlflow.loggedArtifacts"]
    loglik = table[table["metric"] == "eval/test_loglik"]
    assert list(loglik["step"]) == [8, 8] and loglik["evaluation"].nunique() == 2, table
    assert list(loglik["value"]) == pytest.approx([logged, logged], abs=1e-5)
    assert "eval/samples_out_of_range" in set(table["metric"])

    assert _runs(finished.uri) == runs_before
    history = client.get_metric_history(finished.run_id, "eval/test_loglik")
    assert sorted(m.step for m in history) == [0, 4, 8, 8, 8]
    assert all(m.value == pytest.approx(logged, abs=1e-5) for m in history if m.step == 8)
    (folder,) = client.list_artifacts(finished.run_id, "eval")
    assert folder.path.startswith("eval/step_00000008_")
    assert [a.path for a in client.list_artifacts(finished.run_id, f"{folder.path}/samples")] == [
        f"{folder.path}/samples/step_00000008.png"]
    after = snapshot(finished.out / "mlartifacts")
    assert {k: v for k, v in after.items() if k in trained_artifacts} == trained_artifacts

    # another evaluation of the same step moments later gets a folder of its own beside the first
    assert main(["eval", finished.run_id, "--tracking-uri", finished.uri, "--metrics", "samples"]) == 0
    capsys.readouterr()
    folders = [a.path for a in client.list_artifacts(finished.run_id, "eval")]
    assert len(folders) == 2 and folder.path in folders, folders
    kept = {k: v for k, v in after.items() if not k.endswith("/eval_results.json")}  # the table gains rows
    assert snapshot(finished.out / "mlartifacts").items() >= kept.items()


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


@pytest.mark.parametrize("suffix", [".npz", ".pt"])
def test_sample_writes_the_samples_themselves_beside_the_figure(finished: Finished, tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str], suffix: str) -> None:
    """-o samples.npz / .pt: the samples (n, *shape), their raw values, the sampler and step, and the
    figure as samples.png; neither file is replaced without --force."""
    import numpy as np
    import torch

    out = tmp_path / f"samples{suffix}"
    assert main(["sample", str(finished.checkpoint), "-n", "12", "--sampler", "gibbs", "-o", str(out)]) == 0
    assert out.with_suffix(".png").is_file()
    if suffix == ".npz":
        saved = np.load(out)
        samples, raw, label, step = saved["samples"], saved["raw"], str(saved["sampler"]), int(saved["step"])
    else:
        d = torch.load(out, weights_only=True)
        samples, raw, label, step = d["samples"].numpy(), d["raw"].numpy(), d["sampler"], d["step"]
    assert samples.shape == raw.shape == (12, 2) and "Gibbs" in label and step == 8
    np.testing.assert_array_equal(samples, raw)  # checkerboard has no range to clip to
    before = out.read_bytes()
    out.with_suffix(".png").unlink()  # the figure alone missing still refuses: the samples file exists
    assert main(["sample", str(finished.checkpoint), "-n", "12", "--sampler", "gibbs", "-o", str(out)]) == 2
    assert "--force" in capsys.readouterr().err and out.read_bytes() == before


@pytest.mark.parametrize("args, message", [
    (["sample", "{ckpt}", "-o", "{noext}"], "the file name must end in .png, .npz, .pt"),
    (["eval", "{missing}"], "neither a checkpoint directory nor an MLflow model (models:/NAME/VERSION"),
    (["eval", "0123456789abcdef0123456789abcdef", "--tracking-uri", "{uri}"], "no such model or run in the MLflow store"),
    (["eval", "{ckpt}", "--metrics", "test_loglik", "nope"], "--metrics: unknown metric 'nope'"),
    (["sample", "{ckpt}", "--sampler", "nope", "-o", "{png}"], "--sampler: unknown sampler 'nope'"),
    (["sample", "{run_dir}/checkpoint_99999999", "-o", "{png}"], "neither a checkpoint directory"),
])
def test_bad_input_is_one_line_and_exit_2(finished: Finished, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                         args: list[str], message: str) -> None:
    """Bad references, metric names and sampler names: one line on stderr, exit 2, nothing written."""
    runs_before = _runs(finished.uri)
    values = {"missing": str(tmp_path / "nowhere"), "uri": finished.uri, "ckpt": str(finished.checkpoint),
              "png": str(tmp_path / "x.png"), "run_dir": str(finished.checkpoint.parent), "noext": str(tmp_path / "x")}
    assert main([a.format(**values) for a in args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("bism: error: ") and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "x.png").exists() and not (tmp_path / "x").exists() and _runs(finished.uri) == runs_before
