"""What the MLflow UI shows first (distributed_bism/mlflow_ui.py): the run page's address in the
training view, and the order of the chart sections, checked against the keys a tracked run logs.
(The browser itself: tests/e2e/test_ui_screenshot.py.)"""

from __future__ import annotations

from pathlib import Path

import pytest

from distributed_bism.mlflow_ui import UNPREFIXED_SECTION, chart_section, chart_sections, run_page_url
from tests.helpers.local_runs import scratch_cwd, tiny  # noqa: F401 (scratch_cwd: autouse)


def test_run_page_url_opens_the_training_view() -> None:
    base = "http://127.0.0.1:5000/"
    assert run_page_url(base, "1", "abc") == "http://127.0.0.1:5000/#/experiments/1/runs/abc?workflowType=machine_learning"
    assert (run_page_url(base, "7", "r1", "model-metrics")
            == "http://127.0.0.1:5000/#/experiments/7/runs/r1/model-metrics?workflowType=machine_learning")
    assert (run_page_url(base, "1", "r", artifact="samples/step_00000300.png")
            == "http://127.0.0.1:5000/#/experiments/1/runs/r/artifactPath/samples/step_00000300.png?workflowType=machine_learning")
    with pytest.raises(ValueError, match="tab"):
        run_page_url(base, "1", "abc", "metrics")


def test_sections_follow_mlflows_rule() -> None:
    """The part before the last "/"; keys without one go to "Model metrics", last; JavaScript's
    sort puts capitals before lower case; system/* are on their own tab."""
    assert chart_section("train/perf/s_per_step") == "train/perf"
    assert chart_section("samples") == UNPREFIXED_SECTION
    keys = ["train/loss", "eval/fid", "train/perf/s", "diagnose/x", "Zeta/y", "loss", "system/node_0/cpu"]
    assert chart_sections(keys, ["samples"]) == ["Zeta", "diagnose", "eval", "train", "train/perf", UNPREFIXED_SECTION]


def test_a_runs_charts_open_on_eval_and_train(tmp_path: Path) -> None:
    """A tracked run's metrics and sample images put eval/* and train/* first on the Model metrics
    tab (the rest after them), and `bism train`'s closing lines give the run page's address in the
    training view."""
    from mlflow import MlflowClient

    from distributed_bism import train
    from distributed_bism.api import describe

    cfg = tiny(tmp_path, **{"tracking.enabled": True, "tracking.tracking_uri": f"sqlite:///{tmp_path / 'm.db'}",
                            "trainer.steps": 8, "eval.every": 4, "eval.metrics": ["test_loglik", "samples"]})
    summary = train(cfg)
    client = MlflowClient(str(summary.tracking_uri))
    run = client.get_run(str(summary.run_id))
    images = {Path(a.path).name.split("+step+")[0].replace("~", "/") for a in client.list_artifacts(run.info.run_id, "images")}
    assert "samples" in images, images
    sections = chart_sections(run.data.metrics, images)
    assert sections[:2] == ["eval", "train"], sections
    assert UNPREFIXED_SECTION in sections  # the sample grids, below the curves
    url = run_page_url("http://127.0.0.1:5000", run.info.experiment_id, run.info.run_id, "model-metrics")
    assert f"then:  {url}" in describe(summary)
