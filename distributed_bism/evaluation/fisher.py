"""Fisher divergence between a data distribution and a model:

    D_F(p_data ‖ p_θ) = ½ E_{v ~ p_data} ‖∇_v log p_data(v) − ∇_v log p_θ(v)‖²

estimated by the mean over data samples v_1..v_N (N, D). The data score must be known in closed
form (the 2-D sets in data/synthetic.py: `synthetic_score_fn`). The model score is
- exact for a Gaussian RBM (`exact_fisher_divergence`): −(v − b)/σ² + W sigmoid(c + Wᵀv);
- the VaES estimate for a deep EBLVM (`vaes_fisher_divergence`): ŝ(v) = (1/L) Σ_l −∇_v E(v, h_l),
  h_l ~ q(h|v). ‖s_d − ŝ‖² is biased upwards by the particle noise E‖ŝ − E ŝ‖²; with `debias` two
  independent particle sets give (s_d − ŝ₁)ᵀ(s_d − ŝ₂), whose expectation is exactly
  ‖s_d − E_q ŝ‖² (it can be negative for one v, not on average). If q is the exact posterior,
  E_q ŝ is the exact score and the estimate is unbiased for D_F.

The `fisher` metric (eval.metrics), at the end of this file, on the test set of a set with a
closed-form score (8gaussians, rings, 2spirals); rank 0 only:
    eval/fisher        exact model score (Gaussian RBMs)
    eval/fisher_vaes   VaES estimate of the model score from the posterior (deep EBLVMs), debiased
                       with two particle sets; an estimate of D_F only as far as q matches p(h|v)
Other data sets or models: skipped with a note.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from distributed_bism.data import synthetic
from distributed_bism.evaluation.metrics import EvalContext, register_metric
from distributed_bism.models import GaussianRBM, unwrap
from distributed_bism.models.posterior import PosteriorView
from distributed_bism.objectives.vages import vaes_score_fn

ScoreFn = Callable[[Tensor], Tensor]


def synthetic_score_fn(name: str) -> ScoreFn:
    """The exact data score of a 2-D synthetic set with a smooth density (8gaussians, rings, 2spirals)."""
    if name not in synthetic.MIXTURES:
        raise ValueError(f"no closed-form score for data set {name!r}; expected one of {', '.join(synthetic.MIXTURES)}")
    return lambda x: synthetic.score(name, x)


def exact_model_score_fn(energy: nn.Module) -> ScoreFn:
    """The exact marginal score of a Gaussian RBM (the only model here whose score is exact)."""
    core = unwrap(energy)
    if not isinstance(core, GaussianRBM):
        raise ValueError(
            f"the exact model score needs a Gaussian RBM, got {type(core).__name__} (use vaes_fisher_divergence)"
        )
    return core.score


def fisher_divergence(
    data: Tensor, data_score_fn: ScoreFn, model_score_fns: tuple[ScoreFn, ScoreFn] | ScoreFn, *, batch_size: int = 4096
) -> float:
    """½ mean_n (s_d(v_n) − s₁(v_n))ᵀ (s_d(v_n) − s₂(v_n)) over data (N, ...); one model score fn
    gives ½ mean ‖s_d − s‖², two independent noisy ones the debiased form."""
    s1, s2 = model_score_fns if isinstance(model_score_fns, tuple) else (model_score_fns, model_score_fns)
    total = 0.0
    for v in data.split(batch_size):
        sd = data_score_fn(v).detach()
        r1 = (sd - s1(v).detach()).flatten(1)
        r2 = r1 if s2 is s1 else (sd - s2(v).detach()).flatten(1)
        total += 0.5 * (r1 * r2).sum().item()
    return total / len(data)


def exact_fisher_divergence(
    energy: nn.Module, data: Tensor, data_score_fn: ScoreFn, *, batch_size: int = 4096
) -> float:
    """D_F between data (N, D) with exact score `data_score_fn` and a Gaussian RBM (exact score)."""
    with torch.no_grad():
        return fisher_divergence(data, data_score_fn, exact_model_score_fn(energy), batch_size=batch_size)


def vaes_fisher_divergence(
    energy: nn.Module,
    posterior: nn.Module,
    data: Tensor,
    data_score_fn: ScoreFn,
    *,
    num_particles: int = 100,
    debias: bool = True,
    batch_size: int = 1024,
    seed: int | None = 0,
) -> float:
    """D_F between data (N, ...) and an EBLVM whose score is the VaES estimate with `num_particles`
    particles of q(h|v); `debias` uses two independent particle sets (module docstring). The
    estimate is of D_F to the model only as far as q matches p(h|v). `seed` fixes q's draws (they
    use the global RNG, which is restored afterwards); None leaves the RNG alone."""
    core = unwrap(energy)
    q = PosteriorView(unwrap(posterior))  # type: ignore[arg-type]
    score = vaes_score_fn(core, q, num_particles=num_particles, create_graph=False)
    fns = (score, lambda v: score(v)) if debias else score  # two calls: independent particles
    with torch.random.fork_rng(devices=[], enabled=seed is not None):
        if seed is not None:
            torch.manual_seed(seed)
        return fisher_divergence(data, data_score_fn, fns, batch_size=batch_size)


VAES_PARTICLES = 100  # particles of q per test point in the metric's VaES score


@register_metric("fisher")
def fisher_metric(ctx: EvalContext) -> dict[str, float]:
    """eval/fisher (GRBMs) or eval/fisher_vaes (deep EBLVMs) on the test set; see the module docstring."""
    name, data = ctx.cfg.data.name, ctx.test_data
    if name not in synthetic.MIXTURES or data is None:
        ctx.notes.append(
            f"fisher: skipped (needs a data set with a closed-form score: {', '.join(synthetic.MIXTURES)}; got {name})"
        )
        return {}
    data_score = synthetic_score_fn(name)
    if isinstance(ctx.energy, GaussianRBM):
        return {"eval/fisher": exact_fisher_divergence(ctx.energy, data, data_score)}
    if ctx.posterior is None:
        ctx.notes.append("fisher: skipped (a deep EBLVM needs its posterior for the VaES score)")
        return {}
    return {
        "eval/fisher_vaes": vaes_fisher_divergence(
            ctx.energy,
            ctx.posterior,
            data,
            data_score,
            num_particles=VAES_PARTICLES,
            seed=ctx.cfg.trainer.seed + ctx.step,
        )
    }
