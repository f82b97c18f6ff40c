"""What the MLflow UI (3.17) shows of a run, and where: its page addresses, and the order of the
chart sections on the run's Model metrics tab. Pure functions; no MLflow import.

Facts from MLflow 3.17.2's UI bundle (mlflow/server/js/build/static/js):

- GenAI or Model training is one switch for the whole UI, read from the address's query
  `workflowType=genai|machine_learning`, else from the browser's localStorage (`mlflow.workflowType`,
  set by the sidebar switch), else GenAI. The experiment tag `mlflow.experimentKind` is not read
  for it in 3.17 (its feature flag returns true, so the kind follows the switch); a run page opened
  without the query shows the GenAI sidebar with the run under "Evaluation runs". `run_page_url`
  adds `workflowType=machine_learning`, so the link opens the training view.
- The Model metrics tab groups charts into sections by the part of the key before its last `/`
  ("" for keys without one: the section "Model metrics"; images likewise, by their key). Sections
  are ordered by JavaScript's default sort (UTF-16 code units: "Z" < "a"), with "Model metrics"
  last; charts within a section are sorted by key, images after metrics. Every section starts
  open, but only what is scrolled into view is drawn, so the first sections are what a user sees.
  `chart_sections` reproduces that order, so a test can check that train/* and eval/* lead.
"""

from __future__ import annotations

from collections.abc import Iterable
from urllib.parse import quote

TRAINING_VIEW = "workflowType=machine_learning"
UNPREFIXED_SECTION = "Model metrics"  # MLflow's section for keys without a "/"
RUN_TABS = ("", "model-metrics", "system-metrics", "artifacts")  # "": the run's Overview


def run_page_url(base_url: str, experiment_id: str, run_id: str, tab: str = "", artifact: str = "") -> str:
    """The address of a run's page (tab "" is its Overview; `artifact`, a path in the run's
    artifacts, opens the Artifacts tab on that file) in the training view, e.g.
    http://127.0.0.1:5000/#/experiments/1/runs/abc/model-metrics?workflowType=machine_learning."""
    if tab not in RUN_TABS:
        raise ValueError(f"unknown run page tab {tab!r}; expected one of {RUN_TABS}")
    path = f"/experiments/{quote(experiment_id, safe='')}/runs/{quote(run_id, safe='')}"
    if artifact:
        path += f"/artifactPath/{quote(artifact)}"
    elif tab:
        path += f"/{tab}"
    return f"{base_url.rstrip('/')}/#{path}?{TRAINING_VIEW}"


def chart_section(key: str) -> str:
    """The Model metrics section of a metric or image key: the part before its last "/", or
    "Model metrics" for a key without one."""
    return key.rsplit("/", 1)[0] if "/" in key else UNPREFIXED_SECTION


def _utf16(s: str) -> list[int]:
    """`s` as UTF-16 code units, the order of JavaScript's default sort."""
    data = s.encode("utf-16-be")
    return [int.from_bytes(data[i : i + 2], "big") for i in range(0, len(data), 2)]


def chart_sections(metric_keys: Iterable[str], image_keys: Iterable[str] = ()) -> list[str]:
    """The sections of the run page's Model metrics tab, top to bottom, for a run that logged
    `metric_keys` (system/* are on the System metrics tab and left out) and `image_keys`."""
    keys = [k for k in metric_keys if not k.startswith("system/")] + list(image_keys)
    named = {chart_section(k) for k in keys} - {UNPREFIXED_SECTION}
    last = [UNPREFIXED_SECTION] if any(chart_section(k) == UNPREFIXED_SECTION for k in keys) else []
    return sorted(named, key=_utf16) + last
