"""Sweep specs (tune_spaces/*.yaml): loading, Ray param spaces, trial configs and the checks that
reject a bad spec before anything starts. No Ray cluster: only ray.tune's domain objects."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import yaml

from distributed_bism.config import Config, ConfigError
from distributed_bism.tune.load import load_spec

REPO_ROOT = Path(__file__).resolve().parents[2]
SPECS = sorted((REPO_ROOT / "tune_spaces").glob("*.yaml"))
EXPECTED_KEYS = {
    "grbm_checkerboard_unroll": {"objective.unroll_steps", "objective.warmup_steps", "optim.lr", "optim.posterior_lr"},
    "digits_bimdsm": {"objective.unroll_steps", "objective.warmup_steps", "optim.lr", "optim.posterior_lr",
                      "objective.sigma_begin", "objective.sigma_end"},
    "cifar10_bimdsm": {"objective.unroll_steps", "objective.warmup_steps", "optim.lr", "optim.posterior_lr"},
    "grbm_checkerboard_vages": {"objective.num_particles", "objective.warmup_steps", "optim.lr", "optim.posterior_lr"},
    "digits_bidvl": {"objective.unroll_steps", "objective.warmup_steps", "optim.lr", "optim.posterior_lr",
                     "objective.bidvl_lambda"},
}
GRBM_BASE = str(REPO_ROOT / "configs" / "checkerboard_grbm_bidsm.yaml")


def sample(space: dict, seed: int) -> dict:
    """One draw of a flat param_space, as Ray's variant generator would give it."""
    out = {}
    for i, (key, dom) in enumerate(space.items()):
        if isinstance(dom, dict):  # {"grid_search": [...]}
            out[key] = dom["grid_search"][seed % len(dom["grid_search"])]
        else:
            out[key] = dom.sample(random_state=1000 * seed + i)
    return out


def write_spec(tmp_path: Path, spec: dict, name: str = "study") -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def minimal() -> dict:
    return {"base": GRBM_BASE, "overrides": {"eval.every": 1000, "trainer.steps": 4000},
            "search": {"optim.lr": {"loguniform": [1e-4, 1e-2]}, "objective.unroll_steps": {"choice": [0, 5]}},
            "metric": "eval/test_loglik", "mode": "max"}


def test_every_shipped_spec_is_checked():
    assert {p.stem for p in SPECS} == set(EXPECTED_KEYS)


@pytest.mark.parametrize("path", SPECS, ids=lambda p: p.stem)
def test_shipped_spec_loads_and_builds_trials(path):
    spec = load_spec(path)
    space = spec.param_space()
    assert set(space) == EXPECTED_KEYS[spec.name] == set(spec.search)
    assert spec.scheduler.name == "asha" and spec.scheduler.max_t >= spec.scheduler.grace_period
    for seed in range(20):
        params = sample(space, seed)
        cfg = spec.trial_config(params)
        assert isinstance(cfg, Config)
        flat = cfg.flat()
        for key, value in params.items():
            assert flat[key] == pytest.approx(value)
        assert type(flat["objective.unroll_steps"]) is int and type(flat["objective.warmup_steps"]) is int
        assert cfg.trainer.num_workers == spec.resources.workers_per_trial and cfg.trainer.name is None
    assert load_spec(path).to_dict() == spec.to_dict()  # loading twice gives the same spec


def test_defaults_and_resolved_max_t(tmp_path):
    spec = load_spec(write_spec(tmp_path, minimal()))
    assert spec.name == "study" and spec.num_samples == 1 and spec.max_concurrent_trials == 1
    assert (spec.scheduler.name, spec.searcher.name) == ("asha", "random")
    assert spec.scheduler.max_t == 4  # evaluations = checkpoints at 1000..4000
    assert spec.representative() == {"optim.lr": 1e-4, "objective.unroll_steps": 0}


def test_quniform_on_an_int_key_gives_ints(tmp_path):
    raw = minimal()
    raw["search"] = {"objective.warmup_steps": {"quniform": [2, 8, 2]}, "optim.lr": {"quniform": [1e-4, 1e-3, 1e-4]}}
    spec = load_spec(write_spec(tmp_path, raw))
    for seed in range(20):
        params = sample(spec.param_space(), seed)
        cfg = spec.trial_config(params)
        assert type(cfg.objective.warmup_steps) is int and cfg.objective.warmup_steps in (2, 4, 6, 8)
        assert isinstance(cfg.optim.lr, float) and 1e-4 - 1e-12 <= cfg.optim.lr <= 1e-3 + 1e-12


def test_grid_domain_is_rays_grid_search(tmp_path):
    raw = minimal()
    raw["search"]["objective.unroll_steps"] = {"grid": [0, 1, 5]}
    spec = load_spec(write_spec(tmp_path, raw))
    assert spec.param_space()["objective.unroll_steps"] == {"grid_search": [0, 1, 5]}


def test_trial_config_rejects_unknown_and_missing_params(tmp_path):
    spec = load_spec(write_spec(tmp_path, minimal()))
    with pytest.raises(ConfigError, match="optim.posterior_lr: not searched"):
        spec.trial_config({**spec.representative(), "optim.posterior_lr": 1e-3})
    with pytest.raises(ConfigError, match="optim.lr: no value given"):
        spec.trial_config({"objective.unroll_steps": 1})
    with pytest.raises(ConfigError, match="objective.unroll_steps: K must be >= 0"):
        spec.trial_config({"optim.lr": 1e-3, "objective.unroll_steps": -1})


def test_to_yaml_round_trips(tmp_path):
    spec = load_spec(REPO_ROOT / "tune_spaces" / "digits_bimdsm.yaml")
    path = tmp_path / "digits_bimdsm.yaml"
    path.write_text(spec.to_yaml())
    assert load_spec(path).to_dict() == spec.to_dict()


def test_cli_overrides(tmp_path):
    path = write_spec(tmp_path, minimal())
    spec = load_spec(path, ["num_samples=4", "scheduler.grace_period=2", "search.optim.lr.loguniform=[1e-4,1e-3]",
                            "search.optim.posterior_lr={uniform: [1.0e-4, 1.0e-3]}",
                            "search.objective.unroll_steps=null",
                            "overrides.trainer.seed=3", "searcher.seed=7", "resources.cpus_per_worker=0.5"])
    assert spec.num_samples == 4 and spec.scheduler.grace_period == 2 and spec.searcher.seed == 7
    assert spec.search["optim.lr"].args == [1e-4, 1e-3] and spec.search["optim.posterior_lr"].kind == "uniform"
    assert "objective.unroll_steps" not in spec.search
    assert spec.trial_config(spec.representative()).trainer.seed == 3
    assert load_spec(path, ["scheduler={name: fifo}"]).scheduler.name == "fifo"
    assert load_spec(path, ["metric=train/loss", "mode=min"]).metric == "train/loss"
    bare = dict(minimal(), overrides=None, scheduler=None)  # sections left empty in the file
    spec = load_spec(write_spec(tmp_path, bare), ["overrides.eval.every=1000", "scheduler.grace_period=2"])
    assert spec.overrides == {"eval.every": 1000} and spec.scheduler.grace_period == 2


@pytest.mark.parametrize("override,message", [
    ("num_samples", "override 'num_samples': expected KEY=VALUE"),
    ("search.optim=1", "override 'search.optim=1'"),
    ("scheduler.asha.grace_period=1", "override 'scheduler.asha.grace_period=1'"),
    ("num_samples=0", "num_samples: must be >= 1, got 0"),
    ("search.optim.lr.normal=[0, 1]", "search.optim.lr: unknown domain kind 'normal'"),
    ("scheduler.grace_period=x", "scheduler.grace_period: expected int"),
])
def test_bad_cli_overrides(tmp_path, override, message):
    with pytest.raises(ConfigError) as err:
        load_spec(write_spec(tmp_path, minimal()), [override])
    assert message in str(err.value) and "\n" not in str(err.value)


def _set(raw: dict, path: str, value) -> dict:
    """Set raw[a][b] for path 'a|b' (search keys contain dots); value None deletes."""
    *parents, last = path.split("|")
    node = raw
    for p in parents:
        node = node.setdefault(p, {})
    if value is None:
        node.pop(last, None)
    else:
        node[last] = value
    return raw


@pytest.mark.parametrize("path,value,message", [
    ("schedular", {"name": "fifo"}, "schedular: unknown spec key"),
    ("metric", None, "metric: missing"),
    ("base", "configs/nope.yaml", "base: file not found"),
    ("search", {}, "search: expected a non-empty mapping"),
    ("search|optim.lr", {"normal": [0, 1]}, "search.optim.lr: unknown domain kind 'normal'"),
    ("search|optim.lr", 0.1, "search.optim.lr: expected {KIND: ARGS}"),
    ("search|optim.lrr", {"choice": [1e-3]}, "search.optim.lrr: not a key of the training config"),
    ("search|optim", {"choice": [1e-3]}, "search.optim: not a key of the training config"),
    ("search|nosuch.lr", {"choice": [1e-3]}, "search.nosuch.lr: not a key of the training config"),
    ("search|trainer.name", {"choice": ["a"]}, "search.trainer.name: set by the sweep"),
    ("search|trainer.output_dir", {"choice": ["x"]}, "search.trainer.output_dir: set by the sweep"),
    ("search|tracking.experiment", {"choice": ["x"]}, "search.tracking.experiment: set by the sweep"),
    ("search|trainer.num_workers", {"choice": [1, 2]}, "search.trainer.num_workers: set by the sweep (use resources"),
    ("overrides|trainer.stepz", 5, "overrides.trainer.stepz: not a key of the training config"),
    ("overrides|tracking.enabled", False, "overrides.tracking.enabled: set by the sweep"),
    ("overrides|trainer.steps", 0, "overrides/resources make an invalid config: trainer.steps: must be > 0, got 0"),
    ("overrides|optim.lr", 1e-3, "search.optim.lr: also fixed in overrides"),
    ("search|optim.lr", {"uniform": [1e-2, 1e-4]}, "search.optim.lr.uniform: empty range"),
    ("search|optim.lr", {"loguniform": [1e-3, 1e-3]}, "search.optim.lr.loguniform: empty range"),
    ("search|objective.unroll_steps", {"randint": [3, 3]}, "search.objective.unroll_steps.randint: empty range"),
    ("search|objective.unroll_steps", {"choice": []}, "search.objective.unroll_steps.choice: needs a non-empty list"),
    ("search|objective.unroll_steps", {"grid": []}, "search.objective.unroll_steps.grid: needs a non-empty list"),
    ("search|optim.lr", {"quniform": [1e-4, 1e-3, 0]}, "search.optim.lr.quniform: needs q > 0"),
    ("search|optim.lr", {"quniform": [1e-4, 1.5e-3, 1e-3]},
     "search.optim.lr.quniform: low 0.0001 and high 0.0015 must be multiples of q=0.001"),
    ("search|objective.warmup_steps", {"quniform": [0, 4, 0.5]},
     "search.objective.warmup_steps.quniform: q=0.5 gives non-integers"),
    ("search|optim.lr", {"uniform": [1e-4]}, "search.optim.lr.uniform: expected [low, high]"),
    ("search|optim.lr", {"quniform": [1e-4, 1e-3]}, "search.optim.lr.quniform: expected [low, high, q]"),
    ("search|optim.lr", {"uniform": "1e-4, 1e-3"}, "search.optim.lr.uniform: expected [low, high]"),
    ("search|optim.lr", {"uniform": ["a", 1e-3]}, "search.optim.lr.uniform: expected a finite number, got 'a'"),
    ("search|optim.lr", {"uniform": [True, 2]}, "search.optim.lr.uniform: expected a finite number"),
    ("search|optim.lr", {"uniform": [0.1, float("inf")]}, "search.optim.lr.uniform: expected a finite number"),
    ("search|objective.unroll_steps", {"randint": [0.5, 3]},
     "search.objective.unroll_steps.randint: needs integer bounds"),
    ("search|optim.lr", {"loguniform": [0, 1e-2]}, "search.optim.lr.loguniform: needs low > 0"),
    ("search|objective.unroll_steps", {"uniform": [0, 5]},
     "search.objective.unroll_steps: uniform value 0.0 makes an invalid config (objective.unroll_steps: expected int"),
    ("search|objective.unroll_steps", {"randint": [-2, 3]},
     "search.objective.unroll_steps: randint value -2 makes an invalid config (objective.unroll_steps: K must be >= 0"),
    ("search|optim.lr", {"uniform": [-1e-3, 1e-3]}, "search.optim.lr: uniform value -0.001 makes an invalid config"),
    ("search|objective.lower_level", {"choice": ["kl", "elbo"]}, "search.objective.lower_level: choice value 'elbo'"),
    ("search|objective.unroll_steps", {"choice": [1, 2.5]},
     "search.objective.unroll_steps.choice: expected int, got float 2.5"),
    ("search|trainer.checkpoint_every", {"choice": [1000, 500]},
     "search.trainer.checkpoint_every: choice value 500 makes an invalid config (metric: checkpoints"),
    ("mode", "maximum", "mode: expected max or min, got 'maximum'"),
    ("metric", "eval/fid", "metric: unknown metric 'eval/fid'"),
    ("metric", "eval/ood_auroc", "metric: eval/ood_auroc is reported with ood_auroc in eval.metrics only"),
    ("metric", "eval/denoise_gain", "metric: eval/denoise_gain is reported with denoise in eval.metrics only"),
    ("overrides|eval.every", 2000,
     "metric: checkpoints (trainer.checkpoint_every=1000) report without eval/test_loglik"),
    ("overrides|model.h_dim", 0, "overrides/resources make an invalid config: model.h_dim: must be > 0"),
    ("scheduler", {"name": "pbt"}, "scheduler.name: unknown scheduler 'pbt'"),
    ("scheduler", {"name": "fifo", "grace_period": 2}, "scheduler.grace_period: only the asha scheduler takes it"),
    ("scheduler", {"grace_period": 10}, "scheduler.grace_period: 10 exceeds max_t 4"),
    ("scheduler", {"reduction_factor": 1}, "scheduler.reduction_factor: must be > 1"),
    ("scheduler", {"max_t": 0}, "scheduler.max_t: must be >= 1"),
    ("searcher", {"name": "hyperopt"}, "searcher.name: unknown searcher 'hyperopt'"),
    ("searcher", {"name": "random", "seed": "a"}, "searcher.seed: expected int"),
    ("num_samples", 0, "num_samples: must be >= 1, got 0"),
    ("num_samples", 2.5, "num_samples: expected int, got float 2.5"),
    ("max_concurrent_trials", 0, "max_concurrent_trials: must be >= 1, got 0"),
    ("resources", {"workers_per_trial": 0}, "resources.workers_per_trial: must be >= 1"),
    ("resources", {"gpus_per_worker": -1}, "resources.gpus_per_worker: must be >= 0"),
    ("resources", {"cpus_per_worker": 0}, "resources.cpus_per_worker: must be > 0"),
    ("resources", {"cpus_per_worker": 1, "gpu": 1}, "resources.gpu: unknown key"),
])
def test_bad_spec_names_the_key(tmp_path, path, value, message):
    with pytest.raises(ConfigError) as err:
        load_spec(write_spec(tmp_path, _set(minimal(), path, value)))
    assert str(err.value).startswith(message)  # the offending key comes first
    assert "\n" not in str(err.value)


def test_resources_must_fit_the_config(tmp_path):
    raw = _set(minimal(), "overrides|trainer.strategy", "local")
    raw["resources"] = {"workers_per_trial": 2}
    with pytest.raises(ConfigError, match="trainer.num_workers: strategy local runs one process"):
        load_spec(write_spec(tmp_path, raw))


def test_grid_is_refused_with_optuna(tmp_path):
    raw = minimal()
    raw["search"]["objective.unroll_steps"] = {"grid": [0, 5]}
    raw["searcher"] = {"name": "optuna", "seed": 0}
    with pytest.raises(ConfigError, match=r"^search.objective.unroll_steps: grid domains need searcher random"):
        load_spec(write_spec(tmp_path, raw))


def test_bad_yaml_and_missing_spec(tmp_path):
    with pytest.raises(ConfigError, match="spec: file not found"):
        load_spec(tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("search: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_spec(tmp_path / "bad.yaml")


def test_random_searcher_keeps_the_concurrency_limit(tmp_path):
    from ray.tune.search import BasicVariantGenerator

    spec = load_spec(write_spec(tmp_path, minimal()), ["max_concurrent_trials=3"])
    searcher = spec.build_searcher()
    assert isinstance(searcher, BasicVariantGenerator) and searcher.max_concurrent == 3
    fifo = load_spec(write_spec(tmp_path, minimal()), ["scheduler={name: fifo}"])
    assert fifo.scheduler.name == "fifo" and fifo.scheduler.max_t is None


def test_max_t_is_the_most_reports_a_trial_makes(tmp_path):
    raw = minimal()
    del raw["overrides"]["trainer.steps"]
    raw["search"]["trainer.steps"] = {"choice": [3000, 6500]}  # reports at 1000..6000 and 6500
    assert load_spec(write_spec(tmp_path, raw)).scheduler.max_t == 7


def test_optuna_missing_is_a_clear_error_when_the_searcher_is_built(monkeypatch):
    """optuna is a dependency, so its absence is simulated: validating needs no optuna, building
    the searcher names the fix."""
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "optuna" else real(name, *a))
    spec = load_spec(REPO_ROOT / "tune_spaces" / "cifar10_bimdsm.yaml")
    assert spec.searcher.name == "optuna" and spec.searcher.seed == 0
    with pytest.raises(ConfigError, match=r"searcher.name: optuna is not installed; run `pip install optuna`"):
        spec.build_searcher()


def test_optuna_searcher_is_built_when_installed():
    from ray.tune.search.optuna import OptunaSearch

    spec = load_spec(REPO_ROOT / "tune_spaces" / "cifar10_bimdsm.yaml")
    assert isinstance(spec.build_searcher(), OptunaSearch)


def test_relative_base_resolves_beside_tune_spaces_wherever_the_package_and_cwd_are(tmp_path, monkeypatch):
    """An installed (not editable) package run elsewhere: `base: configs/x.yaml` is found from the
    spec's place in its project, not from the package's or the working directory."""
    project = tmp_path / "project"
    (project / "tune_spaces").mkdir(parents=True)
    (project / "configs").mkdir()
    (project / "configs" / "demo.yaml").write_text((REPO_ROOT / "configs" / "demo.yaml").read_text())
    spec = project / "tune_spaces" / "s.yaml"
    spec.write_text((REPO_ROOT / "tune_spaces" / "digits_bimdsm.yaml").read_text())
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert load_spec(spec).base_data["trainer"]["name"] == "demo"
    (project / "configs" / "demo.yaml").unlink()
    with pytest.raises(ConfigError, match="base"):
        load_spec(spec)


def test_bism_demo_finds_its_config_in_the_working_directory_or_says_where_it_looked(tmp_path, monkeypatch, capsys):
    import distributed_bism.cli as cli

    monkeypatch.setattr(cli, "__file__", str(tmp_path / "site-packages" / "distributed_bism" / "cli.py"))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="configs/demo.yaml is in neither"):
        cli.demo_config()
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "demo.yaml").write_text("x: 1\n")
    assert cli.demo_config() == tmp_path / "configs" / "demo.yaml"
    (tmp_path / "configs" / "demo.yaml").unlink()
    assert cli.main(["demo"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("bism: error: bism demo: configs/demo.yaml is in neither") and err.count("\n") == 1
