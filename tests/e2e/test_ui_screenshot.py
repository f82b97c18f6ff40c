"""bench/ui_screenshot.py against a small store: `mlflow server` on a free loopback port answers
for the run and is stopped by its PID; with chromium installed, the run's chart page in the
training view is photographed and the PNG is not blank (skipped where there is no chromium, as
on CI). The address and section order themselves: tests/unit/test_mlflow_ui.py."""

from __future__ import annotations

import json
import sys
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "bench"))

from devtools import find_chromium  # noqa: E402
from ui_screenshot import CHARTS_READY, MlflowServer, Shot, screenshots  # noqa: E402


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str, str]:
    """A finished run with a 60-point train/loss curve, eval/* points and a sample image per
    evaluation: (tracking URI, experiment id, run id)."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric
    from PIL import Image

    tmp = tmp_path_factory.mktemp("ui")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("ui", artifact_location=(tmp / "art").as_uri())
    run = client.create_run(exp, run_name="ui").info.run_id
    metrics = [Metric("train/loss", 100.0 / (s + 1), 0, s) for s in range(1, 61)]
    metrics += [Metric("eval/denoise_gain", s / 60, 0, s) for s in (20, 40, 60)]
    client.log_batch(run, metrics=metrics)
    for s in (20, 40, 60):
        client.log_image(run, Image.new("RGB", (64, 64), (4 * s, 0, 255 - 4 * s)), key="samples", step=s)
    client.set_terminated(run)
    return uri, exp, run


def test_server_answers_for_the_run_and_is_stopped(store: tuple[str, str, str]) -> None:
    uri, _, run = store
    with MlflowServer(uri) as server:
        with urllib.request.urlopen(f"{server.url}/ajax-api/2.0/mlflow/runs/get?run_id={run}", timeout=30) as r:
            got = json.load(r)["run"]
        assert {m["key"] for m in got["data"]["metrics"]} == {"train/loss", "eval/denoise_gain"}
        with urllib.request.urlopen(server.url + "/", timeout=30) as r:
            assert b'<div id="root"' in r.read()  # the UI's single page
        proc = server.proc
    assert proc is not None and proc.poll() is not None  # stopped by its PID on leaving


@pytest.mark.skipif(find_chromium() is None, reason="no chromium on PATH (Debian: apt-get install chromium)")
def test_chart_page_screenshot_is_a_picture(store: tuple[str, str, str], tmp_path: Path) -> None:
    """The chart tab, opened by its training-view address, is drawn (plotly charts present) and
    photographed: a 1600x1000 PNG with many colours, not a blank or skeleton page."""
    from PIL import Image

    uri, exp, run = store
    ((path, ready),) = screenshots(uri, exp, run, tmp_path, shots=(Shot("charts.png", "model-metrics", CHARTS_READY),))
    assert ready, "the chart page never drew its charts"
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size == (1600, 1000)
        colours = im.convert("RGB").getcolors(maxcolors=1 << 20)
    assert colours is not None and len(colours) > 100, f"{path}: {len(colours or [])} colours, a blank page"
