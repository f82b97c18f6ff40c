"""The `test_loglik` metric: mean log p(v) of the test set for Gaussian RBMs (loglik.py holds the maths).

    H <= 20:  exact, enumerating h (rank 0 only)
    H > 20:   forward AIS with eval.ais_chains chains over eval.ais_betas linear β, every rank
              running its share of the chains (a collective: it is registered for all ranks);
              logs log Ẑ, its standard error and the chains' effective sample size
    eval.raise_chains > 0: also RAISE, the conservative estimate from the other side
"""

from __future__ import annotations

from distributed_bism.evaluation.metrics import EvalContext, register_metric
from distributed_bism.evaluation.loglik import ais_log_likelihood, exact_log_likelihood, raise_log_likelihood
from distributed_bism.models.grbm import MAX_ENUMERABLE_H, GaussianRBM


@register_metric("test_loglik", all_ranks=True)
def test_loglik(ctx: EvalContext) -> dict[str, float]:
    """eval/test_loglik (nats per example), plus eval/log_z* for AIS and eval/test_loglik_raise.
    Every rank takes the same branch: they depend on the model and config only."""
    grbm, data, e = ctx.energy, ctx.test_data, ctx.cfg.eval
    if not isinstance(grbm, GaussianRBM) or data is None:
        if ctx.rank == 0:
            ctx.notes.append("test_loglik: skipped (defined for Gaussian RBMs with test data)")
        return {}
    out: dict[str, float] = {}
    seed = ctx.cfg.trainer.seed + ctx.step  # fresh chains at every evaluation, reproducible
    if grbm.h_dim <= MAX_ENUMERABLE_H:
        if ctx.rank == 0:
            out["eval/test_loglik"] = exact_log_likelihood(grbm, data)
    else:
        est = ais_log_likelihood(grbm, data, num_chains=e.ais_chains, num_betas=e.ais_betas, seed=seed)
        out.update({"eval/test_loglik": est.loglik, "eval/test_loglik_std_err": est.std_err,
                    "eval/log_z": est.log_z.log_z, "eval/log_z_std_err": est.log_z.std_err,
                    "eval/ais_ess": est.log_z.ess})
    if e.raise_chains > 0:
        low = raise_log_likelihood(grbm, data, num_chains=e.raise_chains, num_betas=e.ais_betas, seed=seed)
        out.update({"eval/test_loglik_raise": low.loglik, "eval/test_loglik_raise_std_err": low.std_err})
    return out
