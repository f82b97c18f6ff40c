"""The training driver with strategy `local` (one process, no Ray): resume, relaunch, checkpoints,
non-finite steps and MLflow tracking.

All runs are a GRBM (h_dim 4) with BiDSM on 512 checkerboard points, batch 32, a few dozen
steps; every file goes under tmp_path (trainer.output_dir), and tracking is off unless a test is
about it.
"""

from __future__ import annotations

import copy
import math
import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from distributed_bism import train
from distributed_bism.checkpoint import STATE_FILE, CheckpointError, load_state, save_state
from distributed_bism.config import Config, ConfigError, from_dict
from distributed_bism.run import TrainSummary
from distributed_bism.trainer import TrainLoop

BASE: dict[str, Any] = {
    "data": {"name": "checkerboard", "n_train": 512, "n_test": 128},
    "model": {"name": "grbm", "h_dim": 4, "init_std": 0.1},
    "posterior": {"name": "bernoulli", "temperature": 0.5},
    "objective": {"name": "bidsm", "sigma": 0.1, "warmup_steps": 1, "unroll_steps": 0},
    "optim": {"lr": 1e-2, "posterior_lr": 1e-2},
    "trainer": {"name": "tiny", "strategy": "local", "num_workers": 1, "steps": 12, "batch_size": 32,
                "log_every": 4, "checkpoint_every": 4, "num_to_keep": 2, "ema_decay": 0.9},
    "tracking": {"enabled": False, "experiment": "bism-tests"},
    "eval": {"every": 1000, "metrics": ["test_loglik"], "num_samples": 16, "langevin_steps": [2, 2, 2]},
}


@pytest.fixture(autouse=True)
def scratch_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Run each test from its own empty directory, so nothing relative (./mlruns, ./outputs) can
    land in the checkout, and the tests can check that nothing did."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    return cwd


def tiny(out: Path, **overrides: Any) -> Config:
    """BASE with trainer.output_dir=out and {"section.key": value} overrides."""
    d = copy.deepcopy(BASE)
    d["trainer"]["output_dir"] = str(out)
    for key, value in overrides.items():
        section, name = key.split(".")
        d[section][name] = value
    return from_dict(Config, d)


def run_dir(cfg: Config) -> Path:
    """Where the local strategy keeps the run's checkpoints (default storage_path)."""
    return Path(cfg.trainer.output_dir).resolve() / "ray_results" / str(cfg.trainer.name)


def checkpoint_dirs(cfg: Config) -> list[Path]:
    return sorted(p for p in run_dir(cfg).glob("checkpoint_*") if p.is_dir())


def assert_same(a: Any, b: Any, where: str = "") -> None:
    """Bit-for-bit equality of nested dicts/lists of tensors and plain values."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a, b), f"{where}: differs (max |Δ| {(a.double() - b.double()).abs().max().item():.3g})"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"{where}: keys {sorted(a)} != {sorted(b)}"
        for k in a:
            assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def snapshot(root: Path) -> dict[str, tuple[int, bytes]]:
    """{relative path: (mtime_ns, content)} of every file under root."""
    return {str(p.relative_to(root)): (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(root.rglob("*"))
            if p.is_file()}


# --------------------------------------------------------------------------- resume and relaunch
def test_resume_is_exact(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """24 steps straight == 12 steps, then a relaunch of the same name with steps=24, bit for bit:
    θ, φ, EMA, both Adam states, the RNG and the final model. K=1 so the unrolled Adam state
    matters; sample figures on, so an evaluation that consumed the training RNG would show. The
    relaunch must really resume (a fresh 24-step run would also match), so its log is checked."""
    over = {"objective.unroll_steps": 1, "eval.metrics": ["test_loglik", "samples"]}
    straight = tiny(tmp_path / "straight", **{**over, "trainer.steps": 24})
    train(straight)
    split = tiny(tmp_path / "split", **{**over, "trainer.steps": 12})
    train(split)
    capsys.readouterr()
    train(tiny(tmp_path / "split", **{**over, "trainer.steps": 24}))
    log = capsys.readouterr().out
    assert f"resumed from {run_dir(split) / 'checkpoint_00000012'} at step 12" in log, log
    assert "steps 12 → 24" in log and "step 4/24" not in log  # no step before 12 was retrained

    a = load_state(checkpoint_dirs(straight)[-1])
    b = load_state(checkpoint_dirs(split)[-1])
    assert a["step"] == b["step"] == 24
    assert a.pop("config").replace("/straight", "/split") == b.pop("config")  # they differ in output_dir only
    assert_same(a, b, "state")
    model = Path("models") / "tiny" / "model.pt"
    final_a = torch.load(tmp_path / "straight" / model, weights_only=True)
    final_b = torch.load(tmp_path / "split" / model, weights_only=True)
    assert final_a.pop("config").replace("/straight", "/split") == final_b.pop("config")
    assert_same(final_a, final_b, "model.pt")
    init = TrainLoop.from_config(straight).replica.energy.state_dict()
    assert not torch.equal(init["W"], final_a["energy"]["W"])  # it trained at all


def test_finished_run_relaunch_changes_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Relaunching a finished run reports its last checkpoint, trains nothing, and leaves every
    checkpoint (files, contents, mtimes), sample and the final model as they were."""
    cfg = tiny(tmp_path, **{"eval.metrics": ["test_loglik", "samples"]})
    first = train(cfg)
    before = snapshot(run_dir(cfg))
    samples_before = snapshot(tmp_path / "samples")
    model = tmp_path / "models" / "tiny" / "model.pt"
    model_before, model_mtime = model.read_bytes(), model.stat().st_mtime_ns
    capsys.readouterr()

    again = train(cfg)
    log = capsys.readouterr().out
    assert again.step == first.step == 12
    assert "already complete at step 12" in log  # reported from the checkpoint, nothing started
    assert "step 12/12" not in log  # no training step ran
    assert snapshot(run_dir(cfg)) == before
    assert snapshot(tmp_path / "samples") == samples_before
    assert model.read_bytes() == model_before and model.stat().st_mtime_ns == model_mtime  # not rewritten
    assert "already complete" in log
    assert again.checkpoint == first.checkpoint == str(run_dir(cfg) / "checkpoint_00000012")


def test_same_name_other_setup_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The same trainer.name with a different objective.unroll_steps is a ConfigError naming the
    key, raised before anything runs (nothing printed, nothing written)."""
    cfg = tiny(tmp_path, **{"trainer.steps": 2, "trainer.checkpoint_every": 1})
    train(cfg)
    before = snapshot(tmp_path)
    capsys.readouterr()
    with pytest.raises(ConfigError, match=r"objective\.unroll_steps.*0.*1"):
        train(tiny(tmp_path, **{"trainer.steps": 4, "objective.unroll_steps": 1}))
    assert capsys.readouterr().out == ""
    assert snapshot(tmp_path) == before
    # What may change between launches does not count as a different set-up.
    train(tiny(tmp_path, **{"trainer.steps": 3, "trainer.checkpoint_every": 1, "trainer.log_every": 1}))


def test_damaged_latest_checkpoint_is_kept_aside(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A latest checkpoint cut short (as by a crash mid-copy) is named in the log, renamed
    *.unreadable with its bytes intact, and the run resumes from the one before it; the
    retrained step writes a fresh checkpoint beside it instead of over it."""
    cfg = tiny(tmp_path, **{"trainer.steps": 4, "trainer.checkpoint_every": 2})
    train(cfg)
    damaged_dir = checkpoint_dirs(cfg)[-1]
    bad = damaged_dir / STATE_FILE
    truncated = bad.read_bytes()[:200]
    bad.write_bytes(truncated)
    capsys.readouterr()
    summary = train(tiny(tmp_path, **{"trainer.steps": 6, "trainer.checkpoint_every": 2}))
    log = capsys.readouterr().out
    assert str(bad) in log and "unreadable" in log
    assert "at step 2" in log  # resumed from the checkpoint before the damaged one
    aside = damaged_dir.with_name(damaged_dir.name + ".unreadable")
    assert (aside / STATE_FILE).read_bytes() == truncated
    assert summary.step == 6 and load_state(damaged_dir)["step"] == 4  # step 4 retrained and saved anew


# --------------------------------------------------------------------------- checkpoints
def test_checkpoints_kept_and_complete(tmp_path: Path) -> None:
    """checkpoint_every=2 over 12 steps keeps only the newest num_to_keep=2 directories, and
    state.pt (loaded with weights_only=True) holds everything a resume needs."""
    cfg = tiny(tmp_path, **{"trainer.checkpoint_every": 2, "trainer.num_to_keep": 2, "objective.unroll_steps": 1})
    summary = train(cfg)
    dirs = checkpoint_dirs(cfg)
    assert [d.name for d in dirs] == ["checkpoint_00000010", "checkpoint_00000012"]
    assert summary.checkpoint == str(dirs[-1])

    state = torch.load(dirs[-1] / STATE_FILE, weights_only=True)
    for key in ("energy", "posterior", "energy_optimizer", "posterior_optimizer", "schedules", "ema", "step",
                "rng", "objective", "config", "mlflow_run_id", "world_size", "bad_steps"):
        assert key in state, f"state.pt lacks {key!r}"
    assert state["step"] == 12 and state["world_size"] == 1 and state["bad_steps"] == 0
    assert set(state["energy"]) == {"W", "b", "c", "log_sigma"}, sorted(state["energy"])
    assert state["posterior"] and set(state["ema"]) == set(state["energy"])
    assert not torch.equal(state["ema"]["W"], state["energy"]["W"])  # a real average, not a copy
    for opt in ("energy_optimizer", "posterior_optimizer"):  # Adam has moments and a step count
        assert state[opt]["state"] and all(int(s["step"]) > 0 for s in state[opt]["state"].values()), opt
    assert state["schedules"] == {"energy": 1e-2, "posterior": 1e-2}
    assert len(state["rng"]) == 1 and state["rng"][0].dtype == torch.uint8  # one per rank
    saved = from_dict(Config, yaml.safe_load(state["config"]))  # the resolved config, as YAML
    assert (saved.data, saved.model, saved.posterior, saved.objective, saved.optim) == (
        cfg.data, cfg.model, cfg.posterior, cfg.objective, cfg.optim)
    assert saved.trainer.name == "tiny" and saved.trainer.steps == 12
    assert state["mlflow_run_id"] is None  # tracking off here; see test_mlflow_run


def test_load_state_names_a_corrupt_file(tmp_path: Path) -> None:
    """A missing, empty, garbage, truncated, foreign or unsafe (a pickled object weights_only
    refuses) state.pt is a CheckpointError naming the file, in one line."""
    good = tmp_path / "good"
    save_state(good, {"step": 1, "energy": {"W": torch.ones(2, 2)}, "posterior": None, "ema": {}})
    assert load_state(good)["step"] == 1

    def damaged(name: str, content: bytes | None) -> Path:
        d = tmp_path / name
        d.mkdir()
        if content is not None:
            (d / STATE_FILE).write_bytes(content)
        return d

    full = (good / STATE_FILE).read_bytes()
    other = tmp_path / "other.pt"
    torch.save({"W": torch.zeros(1)}, other)
    for d in (damaged("missing", None), damaged("empty", b""), damaged("garbage", b"not a checkpoint\n" * 8),
              damaged("truncated", full[: len(full) // 2]), damaged("foreign", other.read_bytes()),
              damaged("unsafe", pickle.dumps(CheckpointError("a class weights_only refuses"), protocol=2))):
        with pytest.raises(CheckpointError) as err:
            load_state(d)
        assert str(d / STATE_FILE) in str(err.value), err.value
        assert "\n" not in str(err.value)


# --------------------------------------------------------------------------- non-finite steps
@pytest.fixture
def loop(tmp_path: Path) -> TrainLoop:
    """A local TrainLoop (no sink, no tracking), max_bad_steps=2."""
    return TrainLoop.from_config(tiny(tmp_path, **{"trainer.max_bad_steps": 2}), log=lambda s: None)


def weights(loop: TrainLoop) -> dict[str, Any]:
    r = loop.replica
    return copy.deepcopy({"energy": r.energy.state_dict(), "posterior": r.posterior.state_dict(),
                          "ema": loop.ema.state_dict(), "energy_optimizer": r.energy_updater.state_dict()})


def test_nan_batch_is_skipped(loop: TrainLoop) -> None:
    """A NaN batch leaves θ, φ, the EMA and Adam's state untouched and counts one bad step; a
    good batch afterwards trains normally."""
    good = loop.batches(0)
    loop.run_step(good)
    before = weights(loop)
    loop.run_step(torch.full_like(good, float("nan")))
    assert loop.bad_steps == 1 and loop.step == 2
    assert_same(weights(loop), before, "after NaN batch")
    loop.run_step(loop.batches(2))
    assert loop.bad_steps == 1
    assert not torch.equal(loop.replica.energy.W, before["energy"]["W"])
    assert all(torch.isfinite(p).all() for p in loop.replica.energy.parameters())


def test_too_many_bad_steps_raise(loop: TrainLoop) -> None:
    """max_bad_steps=2: two NaN batches are skipped, the third raises FloatingPointError saying why."""
    nan = torch.full_like(loop.batches(0), float("nan"))
    loop.run_step(nan)
    loop.run_step(nan)
    with pytest.raises(FloatingPointError, match=r"3 non-finite steps.*max_bad_steps=2.*optim\.lr"):
        loop.run_step(nan)


@pytest.mark.parametrize("which", ["energy", "posterior", "ema"])
def test_save_refuses_non_finite_weights(loop: TrainLoop, tmp_path: Path, which: str) -> None:
    """save() raises on a NaN in θ, φ or the EMA and writes no state.pt; with finite weights it writes one."""
    target = tmp_path / "ckpt"
    target.mkdir()
    loop.save(target)
    assert (target / STATE_FILE).is_file()
    (target / STATE_FILE).unlink()
    with torch.no_grad():
        if which == "ema":
            next(iter(loop.ema.shadow.values())).fill_(float("nan"))
        else:
            next(getattr(loop.replica, which).parameters()).fill_(float("inf"))
    with pytest.raises(FloatingPointError, match="non-finite"):
        loop.save(target)
    assert list(target.iterdir()) == []


# --------------------------------------------------------------------------- MLflow
@dataclass
class TrackedRun:
    cfg: Config
    uri: str
    first: TrainSummary
    second: TrainSummary
    status_after_first: str
    cwd: Path


@pytest.fixture(scope="module")
def tracked(tmp_path_factory: pytest.TempPathFactory) -> TrackedRun:
    """One tracked run: 8 steps, then relaunched to 12, from a scratch working directory (to see
    that nothing lands in ./mlruns), with $MLFLOW_TRACKING_URI unset."""
    from mlflow import MlflowClient

    root = tmp_path_factory.mktemp("tracked")
    cwd = root / "cwd"
    cwd.mkdir()
    over = {"tracking.enabled": True, "objective.unroll_steps": 1, "eval.every": 4,
            "eval.metrics": ["test_loglik", "samples"]}
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        mp.chdir(cwd)
        cfg = tiny(root / "out", **{**over, "trainer.steps": 8})
        first = train(cfg)
        status = MlflowClient(str(first.tracking_uri)).get_run(str(first.run_id)).info.status
        second = train(tiny(root / "out", **{**over, "trainer.steps": 12}))
    return TrackedRun(cfg, str(first.tracking_uri), first, second, status, cwd)


def test_mlflow_run_status_and_relaunch(tracked: TrackedRun) -> None:
    """The run ends FINISHED; a relaunch with the same name continues the same run id (one run for
    the name) and ends FINISHED again, tagged with its last checkpoint, whose state names the run."""
    from mlflow import MlflowClient

    from distributed_bism.tracking import RUN_TAG

    assert tracked.uri == f"sqlite:///{Path(tracked.cfg.trainer.output_dir).resolve() / 'mlflow.db'}"
    client = MlflowClient(tracked.uri)
    assert tracked.status_after_first == "FINISHED"
    assert tracked.second.run_id == tracked.first.run_id
    run = client.get_run(str(tracked.first.run_id))
    assert run.info.status == "FINISHED" and run.info.end_time is not None
    runs = client.search_runs([run.info.experiment_id], filter_string=f"tags.`{RUN_TAG}` = 'tiny'")
    assert [r.info.run_id for r in runs] == [tracked.first.run_id]
    ckpt = Path(run.data.tags["checkpoint_path"])
    assert ckpt == checkpoint_dirs(tracked.cfg)[-1] and ckpt.name == "checkpoint_00000012"
    assert load_state(ckpt)["mlflow_run_id"] == tracked.first.run_id


def test_mlflow_params(tracked: TrackedRun) -> None:
    """The flattened config is logged as params, e.g. objective.unroll_steps=1."""
    from mlflow import MlflowClient

    params = MlflowClient(tracked.uri).get_run(str(tracked.first.run_id)).data.params
    assert params["objective.unroll_steps"] == "1"
    assert params["trainer.batch_size"] == "32" and params["model.name"] == "grbm"
    assert set(tracked.cfg.flat()) <= set(params)


def test_mlflow_metrics_by_step(tracked: TrackedRun) -> None:
    """Training and perf metrics at every log step (4, 8 and, after the relaunch, 12); the test
    log-likelihood at every evaluation (0, 4, 8, 12), each step once (the relaunch repeats none)."""
    from mlflow import MlflowClient

    client = MlflowClient(tracked.uri)
    run_id = str(tracked.first.run_id)
    logged = {"train/loss", "train/inner_loss", "train/grad_norm_theta", "train/grad_norm_phi", "train/lr",
              "train/posterior_lr", "perf/samples_per_s", "perf/s_per_step"}
    for key in logged:
        history = client.get_metric_history(run_id, key)
        assert sorted(m.step for m in history) == [4, 8, 12], (key, [(m.step, m.value) for m in history])
        assert all(math.isfinite(m.value) for m in history), key
    assert all(m.value == 1e-2 for m in client.get_metric_history(run_id, "train/lr"))
    assert all(m.value > 0 for m in client.get_metric_history(run_id, "perf/samples_per_s"))
    loglik = client.get_metric_history(run_id, "eval/test_loglik")
    assert sorted(m.step for m in loglik) == [0, 4, 8, 12]
    assert all(math.isfinite(m.value) and m.value < 0 for m in loglik)


def test_mlflow_artifacts_under_output_dir(tracked: TrackedRun) -> None:
    """config.yaml, a sample figure per evaluation and model/model.pt are artifacts; the
    experiment's artifact location is under trainer.output_dir, and no ./mlruns appears."""
    from mlflow import MlflowClient

    client = MlflowClient(tracked.uri)
    run_id = str(tracked.first.run_id)
    top = {a.path for a in client.list_artifacts(run_id)}
    assert {"config.yaml", "samples", "model"} <= top, top
    samples = sorted(a.path for a in client.list_artifacts(run_id, "samples"))
    assert samples == [f"samples/step_{s:08d}.png" for s in (0, 4, 8, 12)]
    assert [a.path for a in client.list_artifacts(run_id, "model")] == ["model/model.pt"]

    out = Path(tracked.cfg.trainer.output_dir).resolve()
    location = client.get_experiment(client.get_run(run_id).info.experiment_id).artifact_location
    assert location.startswith(out.as_uri() + "/"), location
    logged_config = next(out.rglob("artifacts/config.yaml"))
    assert yaml.safe_load(logged_config.read_text())["objective"]["unroll_steps"] == 1
    assert not (tracked.cwd / "mlruns").exists()


def test_failed_run_ends_failed(tmp_path: Path) -> None:
    """A run whose training raises (lr=1e30 diverges at step 2, max_bad_steps=0) ends FAILED,
    never RUNNING, and the error reaches the caller."""
    from mlflow import MlflowClient

    cfg = tiny(tmp_path, **{"tracking.enabled": True, "optim.lr": 1e30, "trainer.max_bad_steps": 0,
                            "trainer.name": "diverges"})
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        with pytest.raises(FloatingPointError, match="max_bad_steps=0"):
            train(cfg)
    assert not Path("mlruns").exists()
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (exp,) = [e for e in client.search_experiments() if e.name == "bism-tests"]
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.status == "FAILED" and run.info.end_time is not None
    assert "checkpoint_path" not in run.data.tags


def test_mlflow_tracking_uri_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With tracking.tracking_uri unset, $MLFLOW_TRACKING_URI names the store used."""
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'elsewhere' / 'store.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    out = tmp_path / "out"
    summary = train(tiny(out, **{"tracking.enabled": True, "trainer.steps": 2, "trainer.name": "env"}))
    assert summary.tracking_uri == uri
    run = MlflowClient(uri).get_run(str(summary.run_id))
    assert run.info.status == "FINISHED" and run.data.tags["bism.run"] == "env"
    assert not (out / "mlflow.db").exists() and not Path("mlruns").exists()
    assert os.path.getsize(tmp_path / "elsewhere" / "store.db") > 0


def test_train_takes_a_config_a_dict_or_a_yaml_path(tmp_path: Path) -> None:
    """distributed_bism.train accepts the three forms of a config, and they train the same model."""
    cfg = tiny(tmp_path)
    finals = []
    for name, form in [("as-config", None), ("as-dict", "dict"), ("as-path", "path")]:
        data = cfg.to_dict()
        data["trainer"]["name"] = name
        if form == "dict":
            arg: Any = data
        elif form == "path":
            arg = tmp_path / f"{name}.yaml"
            arg.write_text(yaml.safe_dump(data))
        else:
            arg = from_dict(Config, data)
        summary = train(arg)
        assert summary.name == name and summary.step == cfg.trainer.steps
        finals.append(torch.load(tmp_path / "models" / name / "model.pt", weights_only=True)["energy"])
    assert_same(finals[0], finals[1], "dict")
    assert_same(finals[0], finals[2], "path")
