"""The training driver with strategy `local` (one process, no Ray): resume, relaunch,
checkpoints and non-finite steps. MLflow tracking is in test_tracking.py.

All runs are a GRBM (h_dim 4) with BiDSM on 512 checkerboard points, batch 32, a few dozen
steps; every file goes under tmp_path (trainer.output_dir), and tracking is off.
"""

from __future__ import annotations

import copy
import pickle
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from distributed_bism import train
from distributed_bism.config import Config, ConfigError, from_dict
from distributed_bism.training.checkpointing import STATE_FILE, CheckpointError, load_state, save_state
from distributed_bism.training.loop import TrainLoop
from tests.helpers.local_runs import assert_same, checkpoint_dirs, run_dir, scratch_cwd, snapshot, tiny  # noqa: F401 (scratch_cwd: an autouse fixture)


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
    for key in ("energy", "posterior", "energy_optimizer", "posterior_optimizer", "ema", "step",
                "rng", "objective", "config", "mlflow_run_id", "world_size", "bad_steps"):
        assert key in state, f"state.pt lacks {key!r}"
    assert state["step"] == 12 and state["world_size"] == 1 and state["bad_steps"] == 0
    assert set(state["energy"]) == {"W", "b", "c", "log_sigma"}, sorted(state["energy"])
    assert state["posterior"] and set(state["ema"]) == set(state["energy"])
    assert not torch.equal(state["ema"]["W"], state["energy"]["W"])  # a real average, not a copy
    for opt in ("energy_optimizer", "posterior_optimizer"):  # Adam has moments and a step count
        assert state[opt]["state"] and all(int(s["step"]) > 0 for s in state[opt]["state"].values()), opt
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


@pytest.mark.parametrize("cpus", [1, 2])
def test_local_strategy_trains_with_cpus_per_worker_threads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                            cpus: int) -> None:
    """strategy=local sets torch's threads to trainer.cpus_per_worker while it trains, as a Ray worker
    does, and gives the caller its own setting back."""
    seen: list[int] = []
    real_fit = TrainLoop.fit

    def spy(loop: TrainLoop) -> dict[str, Any]:
        seen.append(torch.get_num_threads())
        return real_fit(loop)

    monkeypatch.setattr(TrainLoop, "fit", spy)
    before = torch.get_num_threads()
    other = 3 if cpus != 3 else 4
    torch.set_num_threads(other)
    try:
        train(tiny(tmp_path, **{"trainer.cpus_per_worker": cpus}))
        assert seen == [cpus]
        assert torch.get_num_threads() == other
    finally:
        torch.set_num_threads(before)


def test_summary_ends_with_the_last_evaluation_judged(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A local run's summary carries its last evaluation, and the final lines print it beside what
    judges it (for classifier-FID, held-out data and noise)."""
    from distributed_bism.api import judged

    cfg = tiny(tmp_path, **{"eval.metrics": ["energy_gap"], "eval.final_metrics": ["denoise"], "eval.every": 6})
    loop = TrainLoop.from_config(cfg, log=lambda s: None)
    assert set(loop.evaluate()) == {"eval/energy_gap", "eval/energy_data", "eval/energy_noise"}
    assert "eval/denoise_gain" in loop.evaluate(final=True)  # final_metrics: at the last step only
    summary = train(cfg)
    assert {"eval/denoise_gain", "eval/energy_gap"} <= set(summary.metrics)
    out = capsys.readouterr().out
    assert f"result: denoise gain {summary.metrics['eval/denoise_gain']:.3f}" in out
    assert f"result: energy gap {summary.metrics['eval/energy_gap']:.1f}" in out
    lines = judged({"eval/classifier_fid": 21.04, "eval/classifier_fid_marginal_langevin": 25.0,
                    "eval/classifier_fid_held_out": 12.3, "eval/classifier_fid_noise": 208.0})
    assert lines == ["classifier-FID 21.0, 25.0 for marginal_langevin samples  (lower is better; held-out data 12.3, "
                     "uniform noise 208.0)"]
    assert judged({"eval/test_loglik": -1.0}) == []


def test_an_optimiser_step_reads_the_device_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """The skip decision of one step (loss and every gradient finite?) reaches the host in one
    read, not one per check: on a GPU each read waits for the device. Counted on the CPU through
    the tensor-to-host conversions the decision could use; an infinite loss with finite
    gradients is still skipped."""
    from distributed_bism.training.updaters import TorchUpdater

    reads = []
    for name in ("__bool__", "item", "tolist"):
        original = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda t, *a, _o=original, _n=name: (reads.append(_n), _o(t, *a))[1])
    model = torch.nn.Linear(3, 2)
    updater = TorchUpdater(torch.optim.SGD(model.parameters(), lr=0.1))
    updater.backward(model(torch.ones(4, 3)).sum())
    reads.clear()
    assert updater.step()
    assert len(reads) == 1, reads
    updater.zero_grad()
    updater.backward(model(torch.ones(4, 3)).sum() * 0.0 + float("inf"))  # gradient finite, loss not
    before = [p.detach().clone() for p in model.parameters()]
    assert not updater.step()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
