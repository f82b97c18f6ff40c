"""The `fisher` metric: D_F = ½ E_test ‖∇log p_data − ∇log p_θ‖² on the test set, for data sets
whose score is known in closed form (8gaussians, rings, 2spirals; fisher.py holds the maths).

    eval/fisher        exact model score (Gaussian RBMs)
    eval/fisher_vaes   VaES estimate of the model score from the posterior (deep EBLVMs), debiased
                       with two particle sets; an estimate of D_F only as far as q matches p(h|v)
Other data sets or models: skipped with a note. Rank 0 only.
"""

from __future__ import annotations

from distributed_bism.data.synthetic import MIXTURES
from distributed_bism.evaluation.metrics import EvalContext, register_metric
from distributed_bism.evaluation.fisher import exact_fisher_divergence, synthetic_score_fn, vaes_fisher_divergence
from distributed_bism.models import GaussianRBM

VAES_PARTICLES = 100


@register_metric("fisher")
def fisher_metric(ctx: EvalContext) -> dict[str, float]:
    name, data = ctx.cfg.data.name, ctx.test_data
    if name not in MIXTURES or data is None:
        ctx.notes.append(f"fisher: skipped (needs a data set with a closed-form score: {', '.join(MIXTURES)}; "
                         f"got {name})")
        return {}
    data_score = synthetic_score_fn(name)
    if isinstance(ctx.energy, GaussianRBM):
        return {"eval/fisher": exact_fisher_divergence(ctx.energy, data, data_score)}
    if ctx.posterior is None:
        ctx.notes.append("fisher: skipped (a deep EBLVM needs its posterior for the VaES score)")
        return {}
    return {"eval/fisher_vaes": vaes_fisher_divergence(ctx.energy, ctx.posterior, data, data_score,
                                                       num_particles=VAES_PARTICLES, seed=ctx.cfg.trainer.seed + ctx.step)}
