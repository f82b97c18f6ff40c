"""Look at a finished run in the MLflow UI as a person would: start `mlflow server` on the run's
store (a free loopback port, stopped by its PID afterwards), open the run's pages in headless
Chromium (bench/devtools.py) and save screenshots.

    python bench/ui_screenshot.py                       # trains a short demo run first (local strategy)
    python bench/ui_screenshot.py --tracking-uri sqlite:///$PWD/outputs/mlflow.db --run-id RUN_ID

Pages (distributed_bism/mlflow_ui.py: the addresses, in the training view):
- <out>/mlflow_run.png: the run's Overview (parameters, metrics, the logged model);
- <out>/mlflow_charts.png: its Model metrics tab as it opens (sections eval, train, ...);
- <out>/mlflow_loss_samples.png: the same tab with "loss" typed into its chart search, which
  keeps the loss curves and every image (the sample grids, with their step slider);
- <out>/mlflow_samples.png: the run's last sample grid, full size in the Artifacts tab.
The short demo: configs/demo.yaml with the local strategy, 300 steps, an evaluation every 100
(~2-10 min on 2 cores); --steps changes its length.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from devtools import Chromium, Page, find_chromium  # noqa: E402

from distributed_bism.mlflow_ui import run_page_url  # noqa: E402

WIDTH, HEIGHT = 1600, 1000
# A page is drawn when: (Overview) its metric table lists train/loss; (Model metrics) plotly has
# drawn charts, which happens only for those scrolled into view; then a few seconds to settle.
OVERVIEW_READY = "document.body.innerText.includes('train/loss')"
CHARTS_READY = "document.querySelectorAll('.js-plotly-plot').length >= 2"
# The image card's picture has loaded (served by the server's get-artifact).
LOADED_IMAGES = "[...document.images].filter(i => i.src.includes('artifact') && i.naturalWidth > 0).length"
IMAGE_READY = f"{LOADED_IMAGES} >= 1"
ARTIFACT_READY = "[...document.images].some(i => i.naturalWidth >= 200)"  # the preview (a blob), not an icon
CLOSE_ASSISTANT = "document.querySelector('button[aria-label=\"Close\"]')?.click()"  # its side panel opens by default
SETTLE_S = 3.0


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class MlflowServer:
    """`mlflow server` on `tracking_uri` at 127.0.0.1:<free port>, one worker, in its own session;
    a context manager that waits for /health and stops exactly that process group."""

    def __init__(self, tracking_uri: str, timeout: float = 180.0) -> None:
        self.tracking_uri, self.timeout = tracking_uri, timeout
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.workdir = tempfile.TemporaryDirectory(prefix="bism_mlflow_ui_")  # where the server may write
        self.log = Path(self.workdir.name) / "server.log"

    def __enter__(self) -> MlflowServer:
        cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", self.tracking_uri,
               "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"]  # fmt: skip
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(cmd, cwd=self.workdir.name, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)  # fmt: skip
        deadline = time.monotonic() + self.timeout
        while not self._healthy():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                tail = self.log.read_text(errors="replace")[-2000:]
                self.__exit__()
                raise RuntimeError(f"mlflow server did not answer on {self.url} within {self.timeout:.0f} s:\n{tail}")
            time.sleep(1.0)
        return self

    def _healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=5) as r:
                return bool(r.status == 200)
        except OSError:
            return False

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, 15)  # its own session: the server, uvicorn and its job runner
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, 9)
                self.proc.wait(timeout=30)
        self.workdir.cleanup()


@dataclass
class Shot:
    """One screenshot: the run page tab (or an `artifact` file it previews), what to wait for,
    and `search`, text typed into the chart search box first."""

    name: str
    tab: str
    ready: str
    search: str = ""
    artifact: str = ""


def default_shots(sample_grid: str | None) -> tuple[Shot, ...]:
    """The Overview, the chart tab as it opens and searched for "loss", and the last sample grid
    (`sample_grid`, an artifact path) full size in the Artifacts tab."""
    shots = (
        Shot("mlflow_run.png", "", OVERVIEW_READY),
        Shot("mlflow_charts.png", "model-metrics", CHARTS_READY),
        Shot("mlflow_loss_samples.png", "model-metrics", CHARTS_READY, search="loss"),
    )
    return shots + ((Shot("mlflow_samples.png", "", ARTIFACT_READY, artifact=sample_grid),) if sample_grid else ())


# The image cards list the run's parameters above the picture in a scrolled box: scroll each
# picture into view, as a user would.
REVEAL_IMAGES = "document.querySelectorAll('img.rc-image-img').forEach(i => i.scrollIntoView({block: 'nearest'}))"


def take(page: Page, url: str, shot: Shot, out: Path, timeout: float) -> tuple[Path, bool]:
    """Open `url`, wait until `shot.ready` holds (or `timeout`), search, and save the PNG;
    (path, whether the page was ready)."""
    page.open(url, WIDTH, HEIGHT)
    ready = page.wait_for(shot.ready, timeout)
    page.evaluate(CLOSE_ASSISTANT)
    if shot.search:
        page.evaluate("document.querySelector('input[placeholder*=\"Search\"]').focus()")
        page.call("Input.insertText", text=shot.search)
        ready = page.wait_for(shot.ready, timeout) and ready
        ready = page.wait_for(IMAGE_READY, timeout) and ready
        page.evaluate(REVEAL_IMAGES)
    time.sleep(SETTLE_S)
    return page.screenshot(out / shot.name), ready


def last_sample_grid(tracking_uri: str, run_id: str) -> str | None:
    """The artifact path of the run's last sample grid (samples/step_XXXXXXXX.png), or None."""
    from mlflow import MlflowClient

    grids = [a.path for a in MlflowClient(tracking_uri).list_artifacts(run_id, "samples") if a.path.endswith(".png")]
    return max(grids) if grids else None


def screenshots(tracking_uri: str, experiment_id: str, run_id: str, out: Path, timeout: float = 180.0,
                shots: tuple[Shot, ...] | None = None) -> list[tuple[Path, bool]]:  # fmt: skip
    """Serve the store, open each shot's page of the run in headless Chromium, save the PNGs
    (default_shots unless `shots` are given)."""
    if shots is None:
        shots = default_shots(last_sample_grid(tracking_uri, run_id))
    chromium = find_chromium()
    if chromium is None:
        raise RuntimeError("no chromium on PATH (Debian: apt-get install chromium)")
    saved = []
    with MlflowServer(tracking_uri, timeout) as server, Chromium(chromium, timeout) as browser:
        page = browser.page()
        try:
            for shot in shots:
                url = run_page_url(server.url, experiment_id, run_id, shot.tab, shot.artifact)
                saved.append(take(page, url, shot, out, timeout))
        finally:
            page.close()
    return saved


def demo_run(output_dir: Path, steps: int) -> tuple[str, str, str]:
    """Train the short demo into `output_dir`; (tracking URI, experiment id, run id)."""
    from mlflow import MlflowClient

    from distributed_bism import train
    from distributed_bism.cli import demo_config
    from distributed_bism.config import load_config

    uri = f"sqlite:///{output_dir / 'mlflow.db'}"
    every = max(1, steps // 3)
    cfg = load_config(demo_config(), [
        "trainer.strategy=local", "trainer.num_workers=1", f"trainer.steps={steps}", f"eval.every={every}",
        f"trainer.checkpoint_every={every}", f"trainer.output_dir={output_dir}", f"tracking.tracking_uri={uri}",
    ])  # fmt: skip
    summary = train(cfg)
    assert summary.run_id is not None
    return uri, MlflowClient(uri).get_run(summary.run_id).info.experiment_id, summary.run_id


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tracking-uri", help="the store of an existing run (with --run-id)")
    p.add_argument("--run-id", help="a finished run in --tracking-uri; default: train the short demo first")
    p.add_argument("--steps", type=int, default=300, help="length of the short demo")
    p.add_argument("--out", type=Path, default=ROOT / "docs", help="folder for the PNGs")
    p.add_argument("--timeout", type=float, default=180.0, help="seconds to wait for the server and each page")
    args = p.parse_args(argv)
    if bool(args.tracking_uri) != bool(args.run_id):
        p.error("--tracking-uri and --run-id go together")
    with tempfile.TemporaryDirectory(prefix="bism_ui_demo_") as tmp:
        if args.run_id:
            from mlflow import MlflowClient

            uri, run_id = args.tracking_uri, args.run_id
            experiment_id = MlflowClient(uri).get_run(run_id).info.experiment_id
        else:
            uri, experiment_id, run_id = demo_run(Path(tmp), args.steps)
        for path, ready in screenshots(uri, experiment_id, run_id, args.out, args.timeout):
            print(f"{path}  ({path.stat().st_size // 1024} KiB{'' if ready else ', page not ready: look at it'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
