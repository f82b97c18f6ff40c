"""Evaluation: the metric registry, test_loglik's AIS branch, the Fisher divergence,
classifier-FID/KID (maths and the ordering held-out << blurred, noise), standard FID only with an
Inception file, and the log-likelihood-against-K plot of GRBM sweeps. test_loglik's collectives on
2 ranks: tests/distributed/test_evaluation_ranks.py. Metrics during a tracked training run:
test_cli_eval.py (which shares that run with `bism eval`)."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from distributed_bism.config import Config, ConfigError
from distributed_bism.evaluation import loglik
from distributed_bism.evaluation.classifier_fid import (
    classifier_fid,
    classifier_kid,
    feature_classifier,
    frechet_distance,
    labelled_splits,
    polynomial_mmd2,
)
from distributed_bism.evaluation.metrics import EvalContext, register_metric, run_metrics
from distributed_bism.models import BernoulliPosterior, GaussianRBM
from distributed_bism.registry.metrics import METRICS
from tests.helpers.local_runs import scratch_cwd, tiny  # noqa: F401 (scratch_cwd: an autouse fixture)


def context(cfg: Config, energy: torch.nn.Module, posterior: torch.nn.Module | None, test: torch.Tensor,
            out: Path, *, image_shape: tuple[int, ...], train_data: torch.Tensor | None = None, rank: int = 0,
            world_size: int = 1) -> EvalContext:
    return EvalContext(cfg=cfg, energy=energy, posterior=posterior, train_data=train_data, test_data=test,
                       image_shape=image_shape, step=0, device=torch.device("cpu"), rank=rank,
                       world_size=world_size, output_dir=out)


# --------------------------------------------------------------------------- the registry
CALLS: list[tuple[str, int]] = []


@register_metric("probe_rank0")
def probe_rank0(ctx: EvalContext) -> dict[str, float]:
    CALLS.append(("rank0", ctx.rank))
    return {"eval/probe_rank0": 1.0}


@register_metric("probe_all", all_ranks=True)
def probe_all(ctx: EvalContext) -> dict[str, float]:
    CALLS.append(("all", ctx.rank))
    return {"eval/probe_all": float(ctx.rank)}


def test_registry_validates_config_and_runs_metrics_per_rank(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """eval.metrics accepts exactly the names of the registry's table (a new line there becomes
    legal); a rank-0 metric runs on rank 0 only, an all-ranks metric on every rank, values kept on
    rank 0; a line must point at the metric of its own name."""
    with pytest.raises(ConfigError, match=r"^eval\.metrics: unknown metric 'nope'"):
        tiny(tmp_path, **{"eval.metrics": ["test_loglik", "nope"]})
    CALLS.clear()
    with monkeypatch.context() as m:
        m.setitem(METRICS, "probe_rank0", f"{__name__}:probe_rank0")
        m.setitem(METRICS, "probe_all", f"{__name__}:probe_all")
        cfg = tiny(tmp_path, **{"eval.metrics": ["probe_rank0", "probe_all"]})
        grbm = GaussianRBM(2, 3)
        names = cfg.eval.metrics
        assert run_metrics(names, context(cfg, grbm, None, torch.zeros(4, 2), tmp_path, image_shape=(2,))) == {
            "eval/probe_rank0": 1.0, "eval/probe_all": 0.0}
        assert run_metrics(names, context(cfg, grbm, None, torch.zeros(4, 2), tmp_path, image_shape=(2,),
                                          rank=1, world_size=2)) == {}
        assert CALLS == [("rank0", 0), ("all", 0), ("all", 1)]
        m.setitem(METRICS, "probe_all", f"{__name__}:probe_rank0")
        with pytest.raises(TypeError, match="not the metric 'probe_all'"):
            run_metrics(["probe_all"], context(cfg, grbm, None, torch.zeros(4, 2), tmp_path, image_shape=(2,)))
    with pytest.raises(ConfigError, match="probe_rank0"):
        tiny(tmp_path, **{"eval.metrics": ["probe_rank0"]})


# --------------------------------------------------------------------------- test_loglik
def test_test_loglik_uses_ais_beyond_the_enumeration_limit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With the enumeration limit lowered below H, test_loglik switches to AIS and logs log Ẑ with
    its standard error (and RAISE with eval.raise_chains); on a 2-d GRBM with H=4 the estimates
    are within 0.05 (AIS) and 0.1 (RAISE) nats of the exact value."""
    torch.manual_seed(0)
    grbm = GaussianRBM(2, 4, init_std=0.5)
    test = torch.randn(64, 2)
    cfg = tiny(tmp_path, **{"eval.ais_chains": 400, "eval.ais_betas": 200})
    exact = run_metrics(["test_loglik"], context(cfg, grbm, None, test, tmp_path, image_shape=(2,)))
    assert set(exact) == {"eval/test_loglik"}
    monkeypatch.setattr(loglik, "MAX_ENUMERABLE_H", 3)
    cfg = replace(cfg, eval=replace(cfg.eval, raise_chains=10))
    ais = run_metrics(["test_loglik"], context(cfg, grbm, None, test, tmp_path, image_shape=(2,)))
    assert set(ais) == {"eval/test_loglik", "eval/test_loglik_std_err", "eval/log_z", "eval/log_z_std_err",
                        "eval/ais_ess", "eval/test_loglik_raise", "eval/test_loglik_raise_std_err"}
    assert abs(ais["eval/test_loglik"] - exact["eval/test_loglik"]) < 0.05
    assert 0 < ais["eval/log_z_std_err"] < 0.05
    assert abs(ais["eval/test_loglik_raise"] - exact["eval/test_loglik"]) < 0.1


def test_fisher_metric_on_a_closed_form_data_score(tmp_path: Path) -> None:
    """On 8gaussians a GRBM's eval/fisher is ½ mean ‖∇log p_data − ∇(−F)‖² with the model score
    taken by autograd of its free energy; on the checkerboard (no smooth score) it is skipped with a note."""
    from distributed_bism.data import load_dataset, score

    cfg = tiny(tmp_path, **{"data.name": "8gaussians", "data.n_test": 200})
    _, test = load_dataset(cfg.data)
    torch.manual_seed(0)
    grbm = GaussianRBM(2, 3, init_std=0.5)
    v = test.clone().requires_grad_(True)
    (model_score,) = torch.autograd.grad(-grbm.free_energy(v).sum(), v)
    expected = 0.5 * (score("8gaussians", test) - model_score).pow(2).sum(1).mean().item()
    values = run_metrics(["fisher"], context(cfg, grbm, None, test, tmp_path, image_shape=(2,)))
    assert values == {"eval/fisher": pytest.approx(expected, rel=1e-5)}
    ctx = context(tiny(tmp_path), grbm, None, test, tmp_path, image_shape=(2,))
    assert run_metrics(["fisher"], ctx) == {} and ctx.notes[0].startswith("fisher: skipped")


# --------------------------------------------------------------------------- classifier-FID
def test_frechet_distance_and_mmd_formulas() -> None:
    """Fréchet distance against the closed form with scipy's sqrtm; unbiased MMD² against its
    definition summed term by term; both near 0 for two draws of one distribution."""
    from scipy import linalg

    g = torch.Generator().manual_seed(0)
    a = torch.randn(300, 5, generator=g, dtype=torch.float64) @ torch.randn(5, 5, generator=g, dtype=torch.float64)
    b = torch.randn(200, 5, generator=g, dtype=torch.float64) * 2 + 1
    ca, cb = torch.cov(a.T).numpy(), torch.cov(b.T).numpy()
    closed = ((a.mean(0) - b.mean(0)) ** 2).sum().item() + (ca + cb - 2 * linalg.sqrtm(ca @ cb).real).trace()
    assert frechet_distance(a, b) == pytest.approx(closed, rel=1e-6)
    x, y = a[:7], b[:6]

    def k(u: torch.Tensor, v: torch.Tensor) -> float:
        return ((u @ v) / 5 + 1).item() ** 3

    within = sum(k(x[i], x[j]) for i in range(7) for j in range(7) if i != j) / 42
    within += sum(k(y[i], y[j]) for i in range(6) for j in range(6) if i != j) / 30
    assert polynomial_mmd2(x, y) == pytest.approx(within - 2 * sum(k(u, v) for u in x for v in y) / 42, rel=1e-9)
    assert frechet_distance(a[:150], a[150:]) < 0.1 * frechet_distance(a, b)
    # samples of a diverged model give non-finite features: NaN, not a linear-algebra error
    broken = b.clone()
    broken[0, 0] = float("inf")
    assert math.isnan(frechet_distance(a, broken)) and math.isnan(polynomial_mmd2(a, broken))
    assert abs(polynomial_mmd2(a[:150], a[150:])) < 0.1 * polynomial_mmd2(a, b)


@dataclass
class Digits:
    clf: Any
    cache: Path
    train: torch.Tensor
    test: torch.Tensor


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> Digits:
    """The digits classifier, trained once into a temporary cache."""
    cache = tmp_path_factory.mktemp("classifiers")
    train_x, _, test_x, _ = labelled_splits("digits", None, 0)
    return Digits(feature_classifier("digits", cache_dir=cache), cache, train_x, test_x)


def blurred(images: torch.Tensor, passes: int) -> torch.Tensor:
    for _ in range(passes):
        images = F.avg_pool2d(F.pad(images, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    return images


def test_classifier_fid_orders_held_out_blurred_and_noise(digits: Digits) -> None:
    """The classifier is cached with its test accuracy (a second call loads it); classifier-FID
    and -KID of the held-out digits against the training digits are far below those of blurred
    digits and of uniform noise."""
    assert digits.clf.accuracy > 0.9
    (cached,) = digits.cache.glob("digits-*.pt")
    again = feature_classifier("digits", cache_dir=digits.cache, log=lambda s: pytest.fail(f"retrained: {s}"))
    assert again.accuracy == digits.clf.accuracy
    assert torch.equal(again.features(digits.test[:5]), digits.clf.features(digits.test[:5]))
    noise = torch.rand(digits.test.shape, generator=torch.Generator().manual_seed(0))
    train = digits.clf.features(digits.train)
    others = {name: digits.clf.features(x) for name, x in
              (("held-out", digits.test), ("blurred", blurred(digits.test, 2)), ("noise", noise))}
    fid = {name: frechet_distance(train, f) for name, f in others.items()}
    kid = {name: polynomial_mmd2(train, f) for name, f in others.items()}
    assert fid["held-out"] < 0.1 * min(fid["blurred"], fid["noise"]), fid
    assert kid["held-out"] < 0.1 * min(kid["blurred"], kid["noise"]), kid
    # the public functions, on a GRBM's flat view of the same images
    flat_train, flat_test = digits.train.flatten(1), digits.test.flatten(1)
    assert classifier_fid(flat_train, flat_test, digits.clf) == pytest.approx(fid["held-out"])
    assert classifier_kid(flat_train, flat_test, digits.clf) == pytest.approx(kid["held-out"])


class _FakeInception(torch.nn.Module):
    """Stands in for the FID Inception TorchScript: NCHW in [0, 255] → 8 pooled features."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 5, stride=4)

    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        f = self.conv(x / 255.0).relu().mean((2, 3))
        return f if return_features else f.sum(1, keepdim=True)


def test_image_metrics_of_a_digits_grbm(digits: Digits, tmp_path: Path) -> None:
    """classifier_fid, classifier_kid and fid on a GRBM over flat 64-d digits: classifier metrics
    with the classifier's accuracy; standard FID only with eval.inception_weights (skipped with a
    note otherwise, never reported under another name)."""
    weights = tmp_path / "inception.pt"
    torch.jit.script(_FakeInception()).save(str(weights))
    over = {"data": {"name": "digits"}, "model": {"name": "grbm", "h_dim": 6}, "trainer": {"output_dir": str(tmp_path)},
            "eval": {"metrics": ["classifier_fid", "classifier_kid", "fid"], "fid_samples": 200,
                     "classifier_dir": str(digits.cache), "compare_samplers": ["gibbs"]}}
    from distributed_bism.config import from_dict

    cfg = from_dict(Config, over)
    torch.manual_seed(0)
    grbm, q = GaussianRBM(64, 6, init_std=0.1), BernoulliPosterior(64, 6)
    with torch.no_grad():
        grbm.b.copy_(digits.train.flatten(1).mean(0))
    ctx = context(cfg, grbm, q, digits.test.flatten(1), tmp_path, image_shape=(1, 8, 8),
                  train_data=digits.train.flatten(1))
    values = run_metrics(cfg.eval.metrics, ctx)
    both = {f"eval/{m}{s}" for m in ("classifier_fid", "classifier_kid") for s in ("", "_gibbs", "_held_out", "_noise")}
    assert set(values) == both | {"eval/classifier_accuracy"}
    assert values["eval/classifier_accuracy"] == digits.clf.accuracy
    assert values["eval/classifier_fid"] > classifier_fid(digits.train, digits.test, digits.clf)
    # conditional samples (eval.sampler) and Gibbs samples (compare_samplers) are measured apart
    assert values["eval/classifier_fid_gibbs"] != values["eval/classifier_fid"]
    # the references: held-out test digits against 200 training digits, and uniform noise
    assert values["eval/classifier_fid_held_out"] == pytest.approx(
        classifier_fid(digits.train[:200], digits.test[:200], digits.clf))
    assert values["eval/classifier_fid_held_out"] < 0.3 * min(values["eval/classifier_fid"],
                                                              values["eval/classifier_fid_noise"])
    assert [n for n in ctx.notes if n.startswith("fid: skipped")]
    cfg = replace(cfg, eval=replace(cfg.eval, inception_weights=str(weights)))
    ctx = context(cfg, grbm, q, digits.test.flatten(1), tmp_path, image_shape=(1, 8, 8),
                  train_data=digits.train.flatten(1))
    fid = run_metrics(["fid"], ctx)
    assert set(fid) == {"eval/fid"} and math.isfinite(fid["eval/fid"]) and fid["eval/fid"] > 0 and not ctx.notes
    with pytest.raises(ConfigError, match=r"^eval\.inception_weights: no such file"):
        from_dict(Config, {**over, "eval": {"inception_weights": str(tmp_path / "missing.pt")}})


# --------------------------------------------------------------------------- sweeps
def test_sweep_plot_of_loglik_against_k(tmp_path: Path) -> None:
    """A sweep searching objective.unroll_steps gets test_loglik_vs_K.png from its trials' last
    eval/test_loglik; a sweep that does not search K gets none."""
    import pandas as pd

    from distributed_bism.tune.report import loglik_vs_unroll

    @dataclass
    class Result:
        config: dict[str, Any]
        metrics_dataframe: Any

    @dataclass
    class Spec:
        name: str
        search: dict[str, Any]

    grid = [Result({"objective.unroll_steps": k, "optim.lr": lr},
                   pd.DataFrame({"eval/test_loglik": [-2.0, -1.0 - 0.1 * k + lr]}))
            for k in (0, 1, 5) for lr in (0.0, 0.01)]
    grid.append(Result({"objective.unroll_steps": 10}, None))  # a trial that reported nothing
    path = loglik_vs_unroll(Spec("s", {"objective.unroll_steps": None}), grid, tmp_path / "k.png")
    assert path == tmp_path / "k.png" and path.stat().st_size > 0
    assert loglik_vs_unroll(Spec("s", {"optim.lr": None}), grid, tmp_path / "none.png") is None
    assert not (tmp_path / "none.png").exists()
