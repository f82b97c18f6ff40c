"""The gradient-bias diagnostic (diagnostics.py) and `bism diagnose` (diagnose.py, cli.py).

Exactness tests run in float64 on the tiny models of conftest.py. What K = 0 gives at the exact
posterior is a property of the estimator, not of the diagnostic: with φ detached the gradient
misses p_θ(h|v)'s dependence on W and c (c gets none), while b and log σ, which p(h|v) does not
involve, get their exact gradients. The thresholds of the bias tests come from measurements with
these seeds (noted at each test), with wide margins.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from distributed_bism.config import ObjectiveConfig
from distributed_bism.core.diagnostics import exact_reference_gradient, gradient_bias
from distributed_bism.objectives import get_objective
from distributed_bism.objectives.score_matching import free_energy_score_fn, get_sm_loss_fn
from tests.helpers.local_runs import scratch_cwd, tiny  # noqa: F401  (scratch_cwd: autouse, keeps the checkout clean)
from tests.helpers.tiny_models import tiny_conv, tiny_grbm


def _exact_posterior_weights(grbm, q, perturb: float = 0.0, seed: int = 3) -> None:
    """Set the linear Bernoulli posterior to p(h|v) (logits c + Wᵀv), plus N(0, perturb²) noise."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p, exact in ((q.net[0].weight, grbm.W.T), (q.net[0].bias, grbm.c)):
            p.copy_(exact + perturb * torch.randn(exact.shape, generator=g, dtype=exact.dtype))


def _batches(n: int, size: int, dim: int = 2, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(size, dim, generator=g, dtype=torch.float64) for _ in range(n)]


@pytest.mark.parametrize("name", ["bidsm", "bimdsm", "bissm"])
def test_exact_reference_is_score_matching_on_the_free_energy(float64, name):
    """g_ref (the BiSM loss with q = p_θ(h|v) tied to θ) equals the gradient of the same SM loss on
    the exact score −∇F, on the same noisy batch."""
    grbm, q = tiny_grbm(2, 3)
    cfg = ObjectiveConfig(name=name, sigma=0.3, sigma_begin=0.1, sigma_end=0.5)
    objective = get_objective(cfg)
    torch.manual_seed(0)
    batch = objective.perturbation(torch.randn(64, 2))
    ref = exact_reference_gradient(objective, grbm, q, batch)
    sm = get_sm_loss_fn({"bidsm": "dsm", "bimdsm": "mdsm", "bissm": "ssm"}[name], sigma0=cfg.sigma0)
    names = [n for n, _ in grbm.named_parameters()]
    direct = torch.autograd.grad(sm(free_energy_score_fn(grbm), batch).mean(), list(grbm.parameters()))
    for n, d in zip(names, direct):
        assert torch.allclose(ref[n], d, rtol=1e-10, atol=1e-12), n
    assert all(p.grad is None for p in grbm.parameters())  # the diagnostic leaves no .grad behind


def test_exact_posterior_at_k0_is_exact_where_the_posterior_does_not_depend_on_theta(float64):
    grbm, q = tiny_grbm(2, 3)
    _exact_posterior_weights(grbm, q)
    before = {n: p.detach().clone() for n, p in [*grbm.named_parameters(), *q.named_parameters()]}
    torch.manual_seed(0)
    rep = gradient_bias(grbm, q, ObjectiveConfig(name="bidsm", sigma=0.3), _batches(2, 64), [0], posterior_lr=1e-3)
    per = rep.per_parameter_rel_error[0]
    assert per["b"] < 1e-6 and per["log_sigma"] < 1e-6  # cos-sim 1 on these blocks
    assert per["c"] == pytest.approx(1.0, abs=1e-12)  # no gradient for c at K = 0
    assert rep.cos_sim[0][0] < 1 - 1e-3  # so the whole-θ gradient is biased (measured: 0.98)
    after = {n: p.detach() for n, p in [*grbm.named_parameters(), *q.named_parameters()]}
    assert all(torch.equal(before[n], after[n]) for n in before)  # θ and φ untouched


def test_perturbed_posterior_is_more_biased(float64):
    """Measured (seeds below): pooled cos-sim 0.99 at the exact posterior, 0.95 perturbed."""
    grbm, q = tiny_grbm(2, 3)
    cos = {}
    for perturb in (0.0, 0.5):
        _exact_posterior_weights(grbm, q, perturb)
        torch.manual_seed(2)
        rep = gradient_bias(grbm, q, ObjectiveConfig(name="bidsm", sigma=0.3), _batches(3, 100), [0], posterior_lr=1e-3)
        cos[perturb] = rep.pooled_cos_sim[0]
    assert cos[0.5] < cos[0.0] - 0.01


def test_more_unroll_steps_reduce_the_bias_on_a_grbm(float64):
    """Perturbed posterior, SGD unroll at lr 0.5. Measured: cos-sim 0.95 at K=0, 0.99 at K=20;
    relative error 0.36 → 0.17 (K=1 is slightly worse than K=0, so only K=0 vs K=20 is asserted)."""
    grbm, q = tiny_grbm(2, 3)
    _exact_posterior_weights(grbm, q, 0.5)
    torch.manual_seed(2)
    rep = gradient_bias(grbm, q, ObjectiveConfig(name="bidsm", sigma=0.3, unroll_optimizer="sgd"), _batches(3, 100),
                        [0, 20], posterior_lr=0.5)
    assert rep.pooled_cos_sim[20] > rep.pooled_cos_sim[0] + 0.01
    assert rep.pooled_rel_error[20] < 0.8 * rep.pooled_rel_error[0]


def test_unroll_reference_on_a_conv_eblvm(float64):
    """With a vanishing unroll lr φ_K = φ for every K, so on shared noise every g_K equals the
    unroll reference; with a real lr they differ, and the table reports it."""
    energy, q = tiny_conv()
    v = [torch.rand(4, 1, 8, 8, dtype=torch.float64) for _ in range(2)]
    cfg = ObjectiveConfig(name="bimdsm", lower_level="fisher", sigma_begin=0.1, sigma_end=0.5, unroll_optimizer="sgd")
    torch.manual_seed(0)
    still = gradient_bias(energy, q, cfg, v, [0, 2], posterior_lr=1e-12, reference="unroll", reference_steps=4)
    for k in (0, 2):
        assert min(still.cos_sim[k]) > 1 - 1e-9 and max(still.rel_error[k]) < 1e-6
    # lr 0.01: at 0.05 the reference conv model's wider coupling head makes 4 SGD steps on φ diverge
    moving = gradient_bias(energy, q, cfg, v, [0], posterior_lr=0.01, reference="unroll", reference_steps=4)
    assert max(moving.rel_error[0]) > 1e-4
    assert moving.reference_change is not None and math.isfinite(moving.reference_change)
    assert "unroll(K=4)" in moving.table()
    # a reference that still moves is flagged; a still one is not
    assert moving.reference_change > 0.1 and "warning: the reference has not converged" in moving.table()  # 0.57
    assert still.reference_change is not None and still.reference_change < 1e-6
    assert "warning" not in still.table()


def test_bad_arguments(float64):
    grbm, q = tiny_grbm(2, 3)
    energy, qc = tiny_conv()
    v = _batches(1, 4)
    with pytest.raises(ValueError, match="exact reference needs a Gaussian RBM"):
        gradient_bias(energy, qc, ObjectiveConfig(name="bimdsm"), [torch.rand(2, 1, 8, 8)], [0], posterior_lr=1e-3)
    with pytest.raises(ValueError, match="not bi-level"):
        gradient_bias(grbm, q, ObjectiveConfig(name="dsm"), v, [0], posterior_lr=1e-3)
    with pytest.raises(ValueError, match="K >= 0"):
        gradient_bias(grbm, q, ObjectiveConfig(name="bidsm"), v, [-1], posterior_lr=1e-3)


# ----------------------------------------------------------------------------------------- CLI
@pytest.fixture
def trained_run(tmp_path: Path):
    """A 4-step local BiDSM GRBM run with an MLflow run in tmp_path: (checkpoint dir, uri, run id)."""
    from distributed_bism.api import train

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = tiny(tmp_path / "out", **{"tracking.enabled": True, "tracking.tracking_uri": uri, "trainer.steps": 4,
                                    "eval.metrics": []})
    summary = train(cfg)
    return Path(summary.checkpoint), uri, summary.run_id


def test_cli_prints_the_table_and_logs_to_the_checkpoints_run(trained_run, capsys, tmp_path):
    import json

    from mlflow import MlflowClient

    from distributed_bism.cli import main

    checkpoint, uri, run_id = trained_run
    client = MlflowClient(uri)
    runs_before = len(client.search_runs([client.get_run(run_id).info.experiment_id]))
    capsys.readouterr()
    assert main(["diagnose", str(checkpoint), "--k", "0,2", "--batches", "2"]) == 0
    out = capsys.readouterr().out
    assert "reference: exact posterior p(h|v); 2 batches" in out and f"logged to MLflow run {run_id}" in out
    lines = out.splitlines()
    head = next(i for i, ln in enumerate(lines) if "cos-sim (mean ± sd)" in ln)
    assert [ln.split()[0] for ln in lines[head + 1:head + 3]] == ["0", "2"]
    assert "rel. error per parameter" in lines[head + 3] and "log_sigma" in lines[head + 4]
    run = client.get_run(run_id)
    for k in (0, 2):
        assert -1 <= run.data.metrics[f"unroll_bias/cos_sim_k{k}"] <= 1
        assert run.data.metrics[f"unroll_bias/rel_error_k{k}"] >= 0
    files = [f.path for f in client.list_artifacts(run_id, "diagnose")]
    assert any(f.endswith(".png") for f in files) and any(f.endswith(".json") for f in files)
    assert main(["diagnose", str(checkpoint), "--k", "0", "--batches", "1"]) == 0  # a second diagnosis adds files
    assert len(client.list_artifacts(run_id, "diagnose")) == len(files) + 2
    assert len(client.search_runs([run.info.experiment_id])) == runs_before  # no new run
    # both diagnoses as rows of the run's MLflow table, one per K (3 rows: K 0 and 2, then K 0)
    table = json.loads(Path(client.download_artifacts(run_id, "diagnose_gradient_bias.json", str(tmp_path))).read_text())
    rows = [dict(zip(table["columns"], r)) for r in table["data"]]
    assert [r["k"] for r in rows] == [0, 2, 0] and len({r["diagnosis"] for r in rows}) == 2


def test_cli_bad_checkpoint_is_one_line(tmp_path, capsys):
    from distributed_bism.cli import main

    assert main(["diagnose", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("bism: error:") and "missing" in err and "\n" not in err
    assert main(["diagnose", str(tmp_path), "--k", "0,x"]) == 2
    assert "\n" not in capsys.readouterr().err.strip()
