"""Models in MLflow (strategy `local`, an sqlite store): the final model of a run is an MLflow 3
LoggedModel with the config as params, its step, and the metrics of that step; each checkpoint's
weights too with tracking.log_checkpoint_models; tracking.registered_model_name registers it. `bism
eval`, `bism sample` and `bism diagnose` load it by models:/NAME/VERSION, models:/NAME@alias, a
logged-model id or a run id, from an artifact root that is a file:// URI away from the run's
checkpoints (which are deleted first); loading reads weights only. One training run (module
fixture) serves the loading tests."""

from __future__ import annotations

import contextlib
import io
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from distributed_bism import train
from distributed_bism.cli import main
from distributed_bism.config import Config, ConfigError, from_dict
from distributed_bism.training.checkpointing import CheckpointError, load_state
from tests.helpers.local_runs import BASE, assert_same, checkpoint_dirs, scratch_cwd, tiny  # noqa: F401 (scratch_cwd: an autouse fixture)

NAME = "tiny-grbm"


@dataclass
class Registered:
    cfg: Config
    uri: str
    run_id: str
    registered: str | None
    final_state: dict  # the final checkpoint's state.pt, read before the run directory was deleted
    artifact_root: Path


@pytest.fixture(scope="module")
def registered(tmp_path_factory: pytest.TempPathFactory) -> Registered:
    """A tracked 8-step run (checkpoints at 4 and 8, evaluations at 0, 4, 8) registered as NAME, its
    experiment's artifacts under a file:// root of their own; then its checkpoints and local model
    file are deleted, so only MLflow can give the model back."""
    from mlflow import MlflowClient

    root = tmp_path_factory.mktemp("registered")
    uri = f"sqlite:///{root / 'store' / 'mlflow.db'}"
    (root / "store").mkdir()
    artifact_root = root / "object-store"
    MlflowClient(uri).create_experiment("bism-tests", artifact_location=artifact_root.as_uri())
    cfg = tiny(root / "out", **{"tracking.enabled": True, "tracking.tracking_uri": uri, "trainer.steps": 8,
                                "eval.every": 4, "tracking.registered_model_name": NAME,
                                "tracking.log_checkpoint_models": True})
    with contextlib.redirect_stdout(io.StringIO()):
        summary = train(cfg)
    final_state = load_state(checkpoint_dirs(cfg)[-1])
    shutil.rmtree(Path(cfg.trainer.output_dir) / "ray_results")
    shutil.rmtree(Path(cfg.trainer.output_dir) / "models")
    return Registered(cfg, uri, str(summary.run_id), summary.registered, final_state, artifact_root)


def _models(reg: Registered) -> dict[int | str, object]:
    """The run's LoggedModels: "final" → the final model, step → the checkpoint model."""
    from mlflow import MlflowClient

    client = MlflowClient(reg.uri)
    found: dict[int | str, object] = {}
    for out in client.get_run(reg.run_id).outputs.model_outputs:
        model = client.get_logged_model(out.model_id)
        assert int(model.tags["bism.step"]) == out.step
        found["final" if model.tags["bism.kind"] == "final" else out.step] = model
    return found


def test_final_model_is_a_logged_model_with_config_step_and_metrics(registered: Registered) -> None:
    """The final model: named "model", READY, of type distributed_bism, at step 8, under the file://
    artifact root; its params are the flattened config, its metrics the run's values at step 8
    (eval/test_loglik among them), which the run's own history holds once, not twice; its files
    are state.pt and MLmodel, no pickled module."""
    from mlflow import MlflowClient
    from mlflow.entities import LoggedModelStatus

    from distributed_bism.tracking import sanitize

    client = MlflowClient(registered.uri)
    model = _models(registered)["final"]
    assert model.name == "model" and model.status == LoggedModelStatus.READY  # type: ignore[attr-defined]
    assert model.model_type == "distributed_bism" and model.source_run_id == registered.run_id  # type: ignore[attr-defined]
    assert model.artifact_location.startswith(registered.artifact_root.as_uri() + "/")  # type: ignore[attr-defined]
    assert model.params == {sanitize(k): str(v) for k, v in registered.cfg.flat().items()}  # type: ignore[attr-defined]
    metrics = {m.key: m for m in model.metrics}  # type: ignore[attr-defined]
    run_metrics = client.get_run(registered.run_id).data.metrics
    assert {"eval/test_loglik", "train/loss"} <= set(metrics)
    assert all(m.step == 8 and m.value == pytest.approx(run_metrics[k]) for k, m in metrics.items())
    history = client.get_metric_history(registered.run_id, "eval/test_loglik")
    assert sorted(m.step for m in history) == [0, 4, 8]
    files = sorted(a.path for a in client.list_logged_model_artifacts(model.model_id))  # type: ignore[attr-defined]
    assert files == ["MLmodel", "state.pt"]


def test_checkpoint_models_and_registration(registered: Registered) -> None:
    """tracking.log_checkpoint_models: a model per checkpoint (steps 4 and 8); the final model is
    registered as version 1 of NAME, whose version names it, and which names the version."""
    from mlflow import MlflowClient

    client = MlflowClient(registered.uri)
    models = _models(registered)
    assert set(models) == {"final", 4, 8}
    assert models[4].name == "checkpoint-00000004"  # type: ignore[attr-defined]
    assert registered.registered == f"models:/{NAME}/1"
    version = client.get_model_version(NAME, "1")
    final = models["final"]
    assert version.tags["bism.model_id"] == final.model_id and version.run_id == registered.run_id  # type: ignore[attr-defined]
    assert '"version": "1"' in client.get_logged_model(final.model_id).tags["mlflow.modelVersions"]  # type: ignore[attr-defined]


def test_load_by_every_reference(registered: Registered, monkeypatch: pytest.MonkeyPatch) -> None:
    """models:/NAME/1, models:/NAME@alias, models:/m-..., m-... and the run id all give the final
    weights (bit for bit those of the final checkpoint), with the step and the run; the checkpoint
    model of step 4 gives step 4. Nothing of the deleted run directory is needed."""
    from mlflow import MlflowClient

    from distributed_bism.commands.trained import load_trained

    monkeypatch.setenv("MLFLOW_TRACKING_URI", registered.uri)  # the default store of the commands
    MlflowClient(registered.uri).set_registered_model_alias(NAME, "best", "1")
    final_id = _models(registered)["final"].model_id  # type: ignore[attr-defined]
    for ref in (f"models:/{NAME}/1", f"models:/{NAME}@best", f"models:/{final_id}", final_id, registered.run_id):
        trained = load_trained(ref)
        assert trained.step == 8 and trained.run_id == registered.run_id and trained.checkpoint is None, ref
        assert trained.model_id == final_id, ref
        assert_same(trained.energy.state_dict(), registered.final_state["energy"], ref)
        assert trained.posterior is not None
        assert_same(trained.posterior.state_dict(), registered.final_state["posterior"], ref)
        assert_same(trained.posterior_optimizer, registered.final_state["posterior_optimizer"], ref)
    early = load_trained(_models(registered)[4].model_id)  # type: ignore[attr-defined]
    assert early.step == 4


def test_commands_take_model_uris(registered: Registered, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`bism eval models:/NAME/1` logs into the model's run at its step and links the values to the
    model; `bism sample` and `bism diagnose` take the same URI."""
    from mlflow import MlflowClient

    uri = ["--tracking-uri", registered.uri]
    assert main(["eval", f"models:/{NAME}/1", *uri, "--metrics", "test_loglik"]) == 0
    out = capsys.readouterr().out
    assert f"model models:/{NAME}/1 (model m-" in out and f"logged to MLflow run {registered.run_id} at step 8" in out
    client = MlflowClient(registered.uri)
    final = client.get_logged_model(_models(registered)["final"].model_id)  # type: ignore[attr-defined]
    assert sorted(m.step for m in final.metrics if m.key == "eval/test_loglik") == [8, 8]
    assert main(["sample", f"models:/{NAME}/1", *uri, "-n", "4", "-o", str(tmp_path / "grid.png")]) == 0
    assert (tmp_path / "grid.png").stat().st_size > 0
    assert main(["diagnose", f"models:/{NAME}/1", *uri, "--k", "0", "--batches", "1", "--no-log"]) == 0
    assert "cos-sim" in capsys.readouterr().out


@pytest.mark.parametrize("ref", [f"models:/{NAME}/99", "models:/no-such-model/1", f"models:/{NAME}@nope",
                                 "m-0123456789abcdef0123456789abcdef", "0123456789abcdef0123456789abcdef",
                                 f"models:/{NAME}"])
def test_unknown_model_is_one_line_exit_2(registered: Registered, ref: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["eval", ref, "--tracking-uri", registered.uri]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("bism: error: ") and ref in err and "\n" not in err, err


RAN: list[str] = []  # what Payload's code did when unpickled


def _run_on_unpickling(what: str) -> str:
    RAN.append(what)
    return what


class Payload:
    """Runs code when unpickled (a module function, pickled by reference): what a pickled model
    could do on opening."""

    def __reduce__(self):  # type: ignore[override]
        return (_run_on_unpickling, ("unpickled",))


def test_loading_reads_weights_only(registered: Registered, tmp_path: Path) -> None:
    """A logged model whose state.pt holds a pickled object is refused with one line, and the
    object's code never runs: loading is torch.load(weights_only=True), never a pickled module."""
    from mlflow import MlflowClient

    from distributed_bism.commands.trained import load_trained

    client = MlflowClient(registered.uri)
    exp = client.get_run(registered.run_id).info.experiment_id
    model = client.create_logged_model(exp, name="evil", source_run_id=registered.run_id)
    files = tmp_path / "evil"
    files.mkdir()
    state = {**registered.final_state, "format": 1, "energy": Payload()}
    torch.save(state, files / "state.pt")
    client.log_model_artifacts(model.model_id, str(files))
    client.finalize_logged_model(model.model_id, "READY")
    RAN.clear()
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        load_trained(model.model_id, tracking_uri=registered.uri)
    assert RAN == []


@pytest.mark.parametrize("name, why", [("a/b", "'/'"), ("a:b", "':'"), ("a@b", "'@'"), ("", "must not be empty"),
                                       (" a", "space"), ("..", "not a model name")])
def test_bad_registered_model_name_is_a_config_error(name: str, why: str) -> None:
    data = {**BASE, "tracking": {"enabled": True, "registered_model_name": name}}
    with pytest.raises(ConfigError, match="^tracking.registered_model_name: ") as e:
        from_dict(Config, data)
    assert why in str(e.value) and "\n" not in str(e.value)


def test_registered_model_name_needs_tracking() -> None:
    with pytest.raises(ConfigError, match="tracking.registered_model_name: .*tracking.enabled is false"):
        from_dict(Config, {**BASE, "tracking": {"enabled": False, "registered_model_name": "ok"}})
