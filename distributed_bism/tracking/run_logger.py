"""RunLogger: what rank 0 (and `bism eval`, `bism diagnose`) logs to one run: metrics, images,
tables, artifacts, tags and logged models, leaving out the steps the run already holds.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from distributed_bism.tracking.locks import retry_locked
from distributed_bism.tracking.models import log_model
from distributed_bism.tracking.runs import sanitize
from distributed_bism.tracking.stores import mlflow_client

IMAGE_PREFIX = "image:"  # RunLogger.logged_through's keys of images (metric keys have no ':')


class RunLogger:
    """Metrics and artifacts to one run, from rank 0. `None`-safe: a logger with no run id logs nothing."""

    def __init__(self, uri: str | None, run_id: str | None):
        self.run_id = run_id
        self.client = mlflow_client(uri) if (uri and run_id) else None
        self.logged_through: dict[str, int] = {}  # metric key → the last step the run already holds

    def skip_logged_steps(self) -> None:
        """Read the run once: the last step of every metric it already holds (MLflow keeps each
        key's point of highest step as its latest). Steps up to it were logged by an earlier launch
        or attempt, past the checkpoint resumed from, and MLflow cannot delete points, so `metrics`
        leaves them out from now on instead of logging them twice."""
        if self.client is None:
            return
        for m in self.client.get_run(self.run_id).data.to_proto().metrics:
            self.logged_through[m.key] = max(int(m.step), self.logged_through.get(m.key, -1))
        for f in self.client.list_artifacts(self.run_id, "images"):  # images/<key, / as ~>+step+<step>+...
            key, _, rest = Path(f.path).name.partition("+step+")
            if rest.split("+", 1)[0].isdigit():
                key = IMAGE_PREFIX + key.replace("~", "/")
                self.logged_through[key] = max(int(rest.split("+", 1)[0]), self.logged_through.get(key, -1))

    def metrics(self, values: dict[str, float], step: int, *, model_id: str | None = None) -> None:
        """Log `values` at `step`, except keys the run already holds at this step or later; linked
        to LoggedModel `model_id` too when given (an evaluation of that model)."""
        values = {k: v for k, v in values.items() if step > self.logged_through.get(sanitize(k), -1)}
        if self.client is None or not values:
            return
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        points = [Metric(sanitize(k), float(v), now, step, model_id=model_id) for k, v in values.items()]
        # Every step of every trial of a sweep writes here: a sqlite store may be locked by another
        # trial for longer than MLflow waits (tracking/locks.py). The same points are retried.
        client, run_id = self.client, self.run_id
        retry_locked(lambda: client.log_batch(run_id, metrics=points), f"metrics of step {step}")

    def model(self, directory: Path, *, step: int, kind: str, params: dict[str, Any]) -> str | None:
        """Log `directory` (weights-only, see `log_model`) as a LoggedModel of this run; its id,
        or None when nothing was logged (no run, or the run already holds it)."""
        if self.client is None or self.run_id is None:
            return None
        return log_model(self.client, self.run_id, directory, step=step, kind=kind, params=params)

    def image(self, path: Path, key: str, step: int) -> None:
        """The PNG at `path` as image `key` at `step` (`log_image(key=, step=)`): the run page's
        step slider then shows e.g. the sample grids over training. Logged synchronously, so the
        image is in the store when the evaluation returns."""
        key = sanitize(key)
        if self.client is None or step <= self.logged_through.get(IMAGE_PREFIX + key, -1):
            return  # a relaunch's evaluation at a step the run has the image of already
        from PIL import Image

        with Image.open(path) as im:
            self.client.log_image(self.run_id, im.convert("RGB"), key=key, step=step, synchronous=True)

    def table(self, rows: list[dict[str, Any]], artifact_file: str) -> None:
        """`rows` (one dict per row, the same keys) as an MLflow table `artifact_file` (.json), which
        the run's Artifacts tab (and the Evaluations view) shows as a table; MLflow appends rows
        when the file exists."""
        if self.client is None or not rows:
            return
        columns = {k: [r.get(k) for r in rows] for k in rows[0]}
        self.client.log_table(self.run_id, columns, artifact_file)

    def artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        if self.client is not None:
            self.client.log_artifact(self.run_id, str(path), artifact_path)

    def text(self, text: str, artifact_file: str) -> None:
        if self.client is not None:
            self.client.log_text(self.run_id, text, artifact_file)

    def tag(self, key: str, value: str) -> None:
        if self.client is not None:
            self.client.set_tag(self.run_id, key, value)
