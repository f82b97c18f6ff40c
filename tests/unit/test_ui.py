"""What a person sees of a run in the MLflow UI and on a terminal: figure titles that fit, a
sweep's results as an MLflow table, the experiment marked as classic ML (training), log_every
defaults that draw a curve, system metrics, and progress bars. (Step-indexed sample images and
`bism eval`'s table: test_cli_eval.py, on its tracked run.)"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
GRBM_BASE = str(REPO_ROOT / "configs" / "checkerboard_grbm_bidsm.yaml")
LONG = ("step 123456 — conditional samples v ~ p(v | h), h = E_q[h | v_test] of the test set, "
        "Langevin with annealing from T=10 over 500 steps and a denoising step σ0=0.1 at the end")


def _titles_fit(fig) -> None:
    """Every title of `fig`, drawn, lies inside the figure's bounding box."""
    renderer = fig.canvas.get_renderer()
    texts = [ax.title for ax in fig.axes if ax.get_title()]
    texts += [fig._suptitle] if fig._suptitle is not None else []
    assert texts
    for text in texts:
        box = text.get_window_extent(renderer)
        assert box.x0 >= 0 and box.x1 <= fig.bbox.width, (text.get_text(), box, fig.bbox)


@pytest.mark.parametrize("kind", ["grid", "scatter", "strip"])
def test_long_titles_fit_the_figure(kind: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A sampler label longer than the figure is wide is wrapped, not cut off at both edges."""
    import torch

    from distributed_bism.evaluation import figures

    closed = []
    plt = figures.pyplot()
    real_close = plt.close
    monkeypatch.setattr(plt, "close", closed.append)  # kept open to measure; closed below
    if kind == "strip":
        rows = {s: torch.rand(10, 64) for s in (0, 100, 200)}
        figures.save_sample_strip(rows, (64,), tmp_path / "s.png", title=LONG)
    else:
        shape = (64,) if kind == "grid" else (2,)
        figures.save_sample_figure(torch.rand(16, shape[0]), shape, tmp_path / "g.png", title=LONG)
    (fig,) = closed
    _titles_fit(fig)
    assert "\n" in (fig._suptitle if kind == "strip" else fig.axes[0].title).get_text()
    real_close(fig)


def test_short_titles_stay_on_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from distributed_bism.evaluation import figures

    closed = []
    plt = figures.pyplot()
    real_close = plt.close
    monkeypatch.setattr(plt, "close", closed.append)  # kept open to measure; closed below
    figures.save_sample_figure(torch.rand(16, 64), (64,), tmp_path / "g.png", title="step 4 — conditional")
    assert closed[0].axes[0].title.get_text() == "step 4 — conditional"
    real_close(closed[0])


def _fake_grid(spec_metric: str) -> list[SimpleNamespace]:
    import pandas as pd

    return [
        SimpleNamespace(
            metrics_dataframe=pd.DataFrame({spec_metric: [-3.0, -2.0 - i]}),
            metrics={"training_iteration": 2, "trial_id": f"t{i}"},
            error=None,
            path=None,
            config={"optim.lr": 10 ** -(i + 2), "objective.unroll_steps": 5 * i},
        )
        for i in range(3)
    ]


def test_sweep_results_are_an_mlflow_table(tmp_path: Path) -> None:
    """write_results logs the results table to the parent run as MLflow table sweep_results.json:
    one row per trial, best first, with the searched keys as columns."""
    import pandas as pd
    from mlflow import MlflowClient

    from distributed_bism.tune.load import load_spec
    from distributed_bism.tune.report import SWEEP_TABLE, write_results
    from distributed_bism.tune.trials import SweepContext

    spec_path = tmp_path / "study.yaml"
    spec_path.write_text(yaml.safe_dump({
        "base": GRBM_BASE, "overrides": {"eval.every": 1000, "trainer.steps": 4000},
        "search": {"optim.lr": {"loguniform": [1e-4, 1e-2]}, "objective.unroll_steps": {"choice": [0, 5, 10]}},
        "metric": "eval/test_loglik", "mode": "max"}))
    spec = load_spec(spec_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("sweeps", artifact_location=(tmp_path / "art").as_uri())
    parent = client.create_run(exp).info.run_id
    ctx = SweepContext(spec=spec, sweep="study", output_dir=str(tmp_path), parent_run_id=parent, tracking_uri=uri)
    write_results(spec, "study", tmp_path / "sweep", _fake_grid(spec.metric), ctx, parent_uri=uri)
    table = pd.read_json(client.download_artifacts(parent, SWEEP_TABLE, str(tmp_path / "dl")), orient="split")
    assert list(table["trial"]) == ["t0", "t1", "t2"]  # best (highest) eval/test_loglik first
    assert list(table["eval/test_loglik"]) == [-2.0, -3.0, -3.0]
    assert {"optim.lr", "objective.unroll_steps", "status"} <= set(table.columns)
    assert '"type": "table"' in client.get_run(parent).data.tags["mlflow.loggedArtifacts"]


def test_experiment_is_marked_as_training(tmp_path: Path) -> None:
    """open_run creates the experiment with mlflow.experimentKind = custom_model_development (the
    MLflow 3 UI then opens its runs and charts, not the GenAI view), and marks an existing unmarked
    one; a kind someone chose is kept."""
    from mlflow import MlflowClient

    from distributed_bism.config import load_config
    from distributed_bism.tracking import EXPERIMENT_KIND_TAG, TRAINING_KIND, open_run, tracking_uri

    cfg = load_config(None, [f"trainer.output_dir={tmp_path}", "trainer.name=kind"])
    open_run(cfg, "kind")
    client = MlflowClient(tracking_uri(cfg))
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    assert exp.tags[EXPERIMENT_KIND_TAG] == TRAINING_KIND == "custom_model_development"

    old = client.create_experiment("older", artifact_location=(tmp_path / "art").as_uri())  # made before we marked ours
    other = load_config(None, [f"trainer.output_dir={tmp_path}", "tracking.experiment=older"])
    open_run(other, "a")
    assert client.get_experiment(old).tags[EXPERIMENT_KIND_TAG] == TRAINING_KIND
    client.set_experiment_tag(old, EXPERIMENT_KIND_TAG, "genai_development")
    open_run(other, "b")
    assert client.get_experiment(old).tags[EXPERIMENT_KIND_TAG] == "genai_development"


@pytest.mark.parametrize("steps, expected", [(300, 3), (20_000, 200), (50, 1), (7, 1)])
def test_log_every_defaults_to_a_curve(steps: int, expected: int) -> None:
    """Unset, trainer.log_every is steps // 100 (at least 1): >= 50 points however long the run."""
    from distributed_bism.config import load_config

    t = load_config(None, [f"trainer.steps={steps}"]).trainer
    assert t.log_every is None and t.log_interval == expected
    assert min(steps, 50) <= len([s for s in range(1, steps + 1) if s % t.log_interval == 0])
    assert load_config(None, [f"trainer.steps={steps}", "trainer.log_every=7"]).trainer.log_interval == 7


MIN_POINTS = 50  # a curve, not a few dots


def points(steps: int, log_interval: int) -> int:
    """Logged train/* points of a run of `steps` steps (every log_interval-th step)."""
    return steps // log_interval


@pytest.mark.parametrize("path", sorted((REPO_ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_log_a_curve(path: Path) -> None:
    """Every config under configs/ logs train/* at least 50 times a run."""
    from distributed_bism.config import load_config

    t = load_config(path).trainer
    assert points(t.steps, t.log_interval) >= MIN_POINTS, (path.name, t.steps, t.log_every)


def _trial_configs(spec):
    """The configs a sweep's trials can get: each searched key at each value `load_spec` checks,
    the others at their first (the trials that differ most in steps and log_every)."""
    rep = spec.representative()
    yield spec.trial_config(rep)
    for key, domain in spec.search.items():
        for value in domain.candidates():
            yield spec.trial_config({**rep, key: value})


@pytest.mark.parametrize("path", sorted((REPO_ROOT / "tune_spaces").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_sweeps_log_a_curve_per_trial(path: Path) -> None:
    """Every trial of every sweep under tune_spaces/ logs train/* at least 50 times: run to the
    end, and also when ASHA stops it at its first chance (after grace_period reports)."""
    from distributed_bism.tune.load import _report_steps, load_spec

    spec = load_spec(path)
    for cfg in _trial_configs(spec):
        t = cfg.trainer
        assert points(t.steps, t.log_interval) >= MIN_POINTS, (path.name, t.steps, t.log_interval)
        if spec.scheduler.name == "asha":
            first_stop = _report_steps(cfg)[spec.scheduler.grace_period - 1]
            assert points(first_stop, t.log_interval) >= MIN_POINTS, (path.name, first_stop, t.log_interval)


def test_points_per_run_counts_the_steps_logged() -> None:
    from distributed_bism.config import load_config

    t = load_config(None, ["trainer.steps=300"]).trainer
    logged = [s for s in range(1, t.steps + 1) if s % t.log_interval == 0]
    assert points(t.steps, t.log_interval) == len(logged) == 100
    assert points(20_000, 1000) == 20 < MIN_POINTS  # the checkerboard's old log_every


@pytest.mark.parametrize("on", [True, False])
def test_system_metrics_per_node(on: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A tracked run logs MLflow system metrics under system/node_0/ (the local strategy's one
    node) by default, and none with tracking.system_metrics false."""
    import time

    from mlflow import MlflowClient

    from distributed_bism import train
    from distributed_bism.tracking import system_metrics
    from tests.helpers.local_runs import tiny

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", raising=False)
    monkeypatch.chdir(tmp_path)
    cfg = tiny(tmp_path, **{"tracking.enabled": True, "trainer.steps": 2, "eval.metrics": [],
                            "tracking.system_metrics": on, "tracking.system_metrics_interval_s": 0.05})
    real = system_metrics

    def slow(*args, **kwargs):  # the tiny run ends within a sample or two: give the monitor time
        ctx = real(*args, **kwargs)

        class Held:
            def __enter__(self):
                return ctx.__enter__()

            def __exit__(self, *exc):
                time.sleep(0.5)
                return ctx.__exit__(*exc)

        return Held()

    monkeypatch.setattr("distributed_bism.launch.local.system_metrics", slow)
    summary = train(cfg)
    keys = set(MlflowClient(str(summary.tracking_uri)).get_run(str(summary.run_id)).data.metrics)
    system = {k for k in keys if k.startswith("system/")}
    if on:
        assert "system/node_0/cpu_utilization_percentage" in system, keys
        assert "system/node_0/system_memory_usage_megabytes" in system, keys
        assert all(k.startswith("system/node_0/") for k in system)
    else:
        assert not system, system


class _Terminal:
    """A stand-in for stderr: records what is written; isatty() says whether it is a terminal."""

    def __init__(self, tty: bool) -> None:
        self.tty, self.text = tty, []

    def isatty(self) -> bool:
        return self.tty

    def write(self, s: str) -> int:
        self.text.append(s)
        return len(s)

    def flush(self) -> None:
        pass

    def getvalue(self) -> str:
        return "".join(self.text)


@pytest.mark.parametrize("tty", [True, False])
def test_progress_bars_on_a_terminal_only(tty: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """AIS, RAISE, the FID classifier's training and `bism eval`'s metrics draw a tqdm bar on a
    terminal and write nothing when stderr is not one (logs, Ray workers); the work is the same."""
    import torch

    from distributed_bism.evaluation import classifier_fid, loglik, metrics
    from tests.helpers.tiny_models import tiny_grbm

    err = _Terminal(tty)
    monkeypatch.setattr("sys.stderr", err)
    grbm, _ = tiny_grbm()
    betas = loglik.linear_betas(50)
    log_w = loglik.ais_log_weights(grbm, betas, 8, torch.Generator().manual_seed(0))
    loglik.raise_log_weights(grbm, torch.randn(4, 2), betas, 2, torch.Generator().manual_seed(0))
    net = classifier_fid.FeatureNet(1, width=4, features=8)
    classifier_fid._train(net, torch.rand(20, 1, 8, 8), torch.randint(0, 10, (20,)), 2, 10, 0)
    seen = []
    fake = metrics.Metric("fake", lambda ctx: seen.append(1) or {"eval/fake": 1.0})
    monkeypatch.setattr(metrics, "get_metric", lambda name: fake)
    monkeypatch.setattr(metrics, "check_metric_names", lambda names, key="eval.metrics": None)
    ctx = SimpleNamespace(rank=0)
    assert metrics.run_metrics(["fake", "fake"], ctx, progress=True) == {"eval/fake": 1.0} and len(seen) == 2
    out = err.getvalue()
    if tty:
        for name in ("AIS", "RAISE", "classifier training", "eval"):
            assert f"{name}:" in out, out
        assert "/49 " in out  # the AIS bar counts the 49 β steps
    else:
        assert out == ""
    monkeypatch.setattr("sys.stderr", _Terminal(not tty))  # same weights with or without the bar
    again = loglik.ais_log_weights(grbm, betas, 8, torch.Generator().manual_seed(0))
    assert torch.equal(log_w, again)


def test_relaunch_logs_no_image_twice(tmp_path: Path) -> None:
    """After skip_logged_steps (a relaunch), an image at a step the run already has for that key
    is not logged again; later steps and other keys are."""
    from mlflow import MlflowClient
    from PIL import Image

    from distributed_bism.tracking import RunLogger

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("e", artifact_location=(tmp_path / "art").as_uri())
    run_id = client.create_run(exp).info.run_id
    png = tmp_path / "g.png"
    Image.new("RGB", (8, 8), "white").save(png)
    first = RunLogger(uri, run_id)
    first.image(png, "samples", 3)
    first.image(png, "samples/langevin", 3)
    again = RunLogger(uri, run_id)
    again.skip_logged_steps()
    again.image(png, "samples", 3)  # skipped: the run has it
    again.image(png, "samples/langevin", 3)  # skipped
    again.image(png, "samples", 4)

    def steps(key: str) -> list[int]:
        names = [Path(a.path).name for a in client.list_artifacts(run_id, "images")]
        return sorted(int(n.split("+")[2]) for n in names if n.startswith(key + "+step+") and n.endswith(".png"))

    assert steps("samples") == [3, 4]
    assert steps("samples~langevin") == [3]


def test_ddp_grad_strides_warning_is_quiet(monkeypatch: pytest.MonkeyPatch) -> None:
    """The DDP reducer's grad-strides warning (harmless for our size-1 dims) no longer buries the
    progress lines; any other UserWarning still shows."""
    import warnings

    from distributed_bism.training.replica import quiet_grad_strides_warning

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_grad_strides_warning()
        warnings.warn("Grad strides do not match bucket view strides. This may indicate ...", UserWarning, stacklevel=1)
        warnings.warn("something else", UserWarning, stacklevel=1)
    assert [str(w.message) for w in caught] == ["something else"]
