"""Gradient-bias diagnostic: how far the K-step BiSM hypergradient is from the true gradient.

At fixed weights θ and posterior φ, for each unroll depth K and each batch v (B, ...):

    g_K   = d/dθ J(θ, φ_K(θ))      `BilevelStep.hypergradient` with K unrolled lower-level steps
                                   (the trained model's objective and unroll optimiser, its lr)
    g_ref = the reference gradient on the same noisy batch (v, ε / u):
        "exact"  (GRBM):  d/dθ J(θ, p_θ(h|v)), the BiSM loss with q replaced by the exact
                          posterior, whose logits c + Wᵀv are tied to θ. Since
                          −E(v,h) − log p(h|v) = −F(v) for every h, this is the gradient of the
                          same score-matching loss on the exact score −∇F.
        "unroll" (any):   g_{K_ref} with a long unroll (K_ref = 50 by default).

    cos(g_K, g_ref) = ⟨g_K, g_ref⟩ / (‖g_K‖ ‖g_ref‖),   rel(g_K, g_ref) = ‖g_K − g_ref‖ / ‖g_ref‖

over all of θ's entries, and per parameter tensor. On each batch, every g_K and g_ref share the
noise of J: the same (ε / u) and the same draw of h's reparameterisation noise (common random
numbers), so the numbers measure the effect of K rather than sampling noise; only the lower
level's own draws (the noisy inputs of the unrolled steps and their h) differ. Reported per batch (mean ± sd over batches)
and "pooled": g_K and g_ref averaged over the batches first (less of the variance of a single
batch, closer to the bias).

Note that K = 0 is biased even when φ is exactly the posterior's value: with φ detached, the
gradient misses the dependence of p_θ(h|v) on W and c (c gets no gradient at all); b and log σ,
which p(h|v) does not depend on, get their exact gradients.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor, nn

from distributed_bism.config import ObjectiveConfig
from distributed_bism.core.bilevel import BilevelStep, step_from_config
from distributed_bism.core.unroll import ParamDict
from distributed_bism.models.grbm import GaussianRBM
from distributed_bism.models.posterior import BernoulliPosterior, Posterior, PosteriorView
from distributed_bism.objectives import NoisyBatch, Objective, get_objective
from distributed_bism.registry.objectives import objective_spec

REFERENCES = ("exact", "unroll")
PER_PARAMETER_TABLE_MAX = 8  # the table lists per-tensor errors for models with at most this many tensors
REFERENCE_CHANGE_WARN = 0.1  # an unroll reference that still moves this much from K_ref/2 to K_ref is not one
Grads = dict[str, Tensor]


def exact_posterior(energy: GaussianRBM, posterior: BernoulliPosterior) -> PosteriorView:
    """q = p_θ(h|v) as a PosteriorView: `posterior`'s relaxed Bernoulli with θ's logits c + Wᵀv
    (differentiable in θ) in place of its own network."""
    return PosteriorView(posterior, forward=energy.posterior_logits)


def _grads(energy: nn.Module) -> Grads:
    """θ's .grad by name (zeros where a parameter got none), detached copies."""
    return {
        n: (p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p))
        for n, p in energy.named_parameters()
        if p.requires_grad
    }


def _zero_grad(module: nn.Module) -> None:
    for p in module.parameters():
        p.grad = None


def hypergradient(
    step: BilevelStep,
    energy: nn.Module,
    posterior: Posterior,
    v: Tensor,
    batch: NoisyBatch,
    optimizer_state: Mapping[str, Mapping[str, Tensor]] | None = None,
    share_inner_noise: bool = False,
) -> Grads:
    """g_K: dJ/dθ at the current (θ, φ) through `step`'s K-step unroll, J on `batch`. Draws the
    inner noise (one shared draw when share_inner_noise, as in training)."""
    _zero_grad(energy)
    shared = step.objective.perturbation(v) if share_inner_noise else None
    phi: ParamDict = dict(posterior.named_parameters())
    step.hypergradient(energy, posterior, phi, v, dict(optimizer_state or {}), shared, outer_batch=batch)
    grads = _grads(energy)
    _zero_grad(energy)
    return grads


def exact_reference_gradient(
    objective: Objective, energy: GaussianRBM, posterior: BernoulliPosterior, batch: NoisyBatch
) -> Grads:
    """g_ref for a GRBM: dJ/dθ of the BiSM loss with the exact posterior (see `exact_posterior`)."""
    _zero_grad(energy)
    loss = objective.outer(energy, exact_posterior(energy, posterior), batch).mean()
    loss.backward(inputs=[p for p in energy.parameters() if p.requires_grad])
    grads = _grads(energy)
    _zero_grad(energy)
    return grads


def with_fixed_outer_noise(objective: Objective, seed: int) -> Objective:
    """`objective` whose higher-level loss J draws its random numbers (h ~ q) from a generator
    seeded with `seed` every time, leaving the global RNG stream as it was (CPU)."""
    outer = objective.outer

    def seeded_outer(energy: Any, q: PosteriorView | None, batch: NoisyBatch) -> Tensor:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return outer(energy, q, batch)

    return replace(objective, outer=seeded_outer)


def _flat(g: Grads) -> Tensor:
    return torch.cat([t.reshape(-1) for t in g.values()])


def cosine(a: Tensor, b: Tensor) -> float:
    """⟨a, b⟩ / (‖a‖ ‖b‖); NaN when either is zero."""
    den = float(a.norm() * b.norm())
    return float(torch.dot(a.reshape(-1), b.reshape(-1))) / den if den > 0 else math.nan


def rel_error(a: Tensor, ref: Tensor) -> float:
    """‖a − ref‖ / ‖ref‖; NaN when ref is zero."""
    den = float(ref.norm())
    return float((a - ref).norm()) / den if den > 0 else math.nan


def _mean_sd(xs: Sequence[float]) -> tuple[float, float]:
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


@dataclass
class BiasReport:
    """What `gradient_bias` measured. Per K: per-batch lists, pooled values, per-parameter means."""

    ks: list[int]
    reference: str  # "exact" or "unroll(K=50)"
    num_batches: int
    cos_sim: dict[int, list[float]] = field(default_factory=dict)
    rel_error: dict[int, list[float]] = field(default_factory=dict)
    pooled_cos_sim: dict[int, float] = field(default_factory=dict)
    pooled_rel_error: dict[int, float] = field(default_factory=dict)
    per_parameter_rel_error: dict[int, dict[str, float]] = field(default_factory=dict)
    # unroll reference only: mean rel. change of g_ref from K_ref/2 to K_ref steps (its own convergence)
    reference_change: float | None = None

    def rows(self) -> list[dict[str, float]]:
        """One row per K: k, cos_mean, cos_sd, rel_mean, rel_sd, pooled_cos, pooled_rel."""
        out = []
        for k in self.ks:
            cm, cs = _mean_sd(self.cos_sim[k])
            rm, rs = _mean_sd(self.rel_error[k])
            out.append(
                {
                    "k": k,
                    "cos_mean": cm,
                    "cos_sd": cs,
                    "rel_mean": rm,
                    "rel_sd": rs,
                    "pooled_cos": self.pooled_cos_sim[k],
                    "pooled_rel": self.pooled_rel_error[k],
                }
            )
        return out

    def table(self) -> str:
        """A fixed-width text table of `rows()`."""
        head = f"{'K':>4}  {'cos-sim (mean ± sd)':>22}  {'rel. error (mean ± sd)':>24}  {'pooled cos':>10}  {'pooled rel':>10}"
        lines = [f"reference: {self.reference}; {self.num_batches} batches", head]
        for r in self.rows():
            lines.append(
                f"{r['k']:>4}  {r['cos_mean']:>12.6f} ± {r['cos_sd']:<8.6f}  {r['rel_mean']:>13.6f} ± "
                f"{r['rel_sd']:<8.6f}  {r['pooled_cos']:>10.6f}  {r['pooled_rel']:>10.6f}"
            )
        names = list(self.per_parameter_rel_error[self.ks[0]]) if self.ks else []
        if 0 < len(names) <= PER_PARAMETER_TABLE_MAX:  # small models (GRBM): which tensors carry the bias
            lines.append("rel. error per parameter (mean over batches):")
            lines.append(f"{'K':>4}  " + "  ".join(f"{n:>12}" for n in names))
            for k in self.ks:
                lines.append(f"{k:>4}  " + "  ".join(f"{self.per_parameter_rel_error[k][n]:>12.6f}" for n in names))
        if self.reference_change is not None:
            lines.append(f"reference convergence: rel. change from K_ref/2 to K_ref steps {self.reference_change:.3g}")
            if self.reference_change > REFERENCE_CHANGE_WARN:
                lines.append(
                    f"warning: the reference has not converged (change > {REFERENCE_CHANGE_WARN:g}): the rows above "
                    "compare against a moving target; raise --reference-steps (the change includes the "
                    "inner steps' own noise, which objective.share_inner_noise removes)"
                )
        return "\n".join(lines)


def gradient_bias(
    energy: nn.Module,
    posterior: Posterior,
    objective_cfg: ObjectiveConfig,
    batches: Iterable[Tensor],
    ks: Sequence[int],
    *,
    posterior_lr: float,
    posterior_betas: tuple[float, float] = (0.9, 0.999),
    reference: str = "exact",
    reference_steps: int = 50,
    optimizer_state: Mapping[str, Mapping[str, Tensor]] | None = None,
) -> BiasReport:
    """Measure cos-sim and relative error of g_K against g_ref (module docstring) for each K in
    `ks` on each batch (B, ...) of `batches`. θ and φ are left as they are (φ is never stepped:
    the unroll works on copies). `optimizer_state`: the posterior optimiser's per-parameter
    state by name, which the unrolled Adam continues from, as in training."""
    if reference not in REFERENCES:
        raise ValueError(f"unknown reference {reference!r}; expected one of {REFERENCES}")
    if not objective_spec(objective_cfg.name).bilevel:
        raise ValueError(f"objective {objective_cfg.name!r} is not bi-level: it has no hypergradient to diagnose")
    if reference == "exact" and not (isinstance(energy, GaussianRBM) and isinstance(posterior, BernoulliPosterior)):
        raise ValueError("the exact reference needs a Gaussian RBM with a Bernoulli posterior; use reference='unroll'")
    if reference == "unroll" and reference_steps < 2:
        raise ValueError(f"reference_steps must be >= 2, got {reference_steps}")
    if not ks or min(ks) < 0:
        raise ValueError(f"need unroll depths K >= 0, got {list(ks)}")
    base = get_objective(objective_cfg)
    share = objective_cfg.share_inner_noise
    per_k: dict[int, list[Grads]] = {k: [] for k in ks}
    refs: list[Grads] = []
    changes: list[float] = []
    for v in batches:
        batch = base.perturbation(v)
        objective = with_fixed_outer_noise(base, int(torch.randint(0, 2**62, ()).item()))

        def step_with(k: int, objective: Objective = objective) -> BilevelStep:  # this batch's objective
            return step_from_config(
                objective,
                replace(objective_cfg, unroll_steps=k),
                posterior_lr=posterior_lr,
                posterior_betas=posterior_betas,
            )

        if reference == "exact":
            refs.append(exact_reference_gradient(objective, energy, posterior, batch))  # type: ignore[arg-type]
        else:
            ref = hypergradient(step_with(reference_steps), energy, posterior, v, batch, optimizer_state, share)
            half = hypergradient(step_with(reference_steps // 2), energy, posterior, v, batch, optimizer_state, share)
            changes.append(rel_error(_flat(half), _flat(ref)))
            refs.append(ref)
        for k in ks:
            per_k[k].append(hypergradient(step_with(k), energy, posterior, v, batch, optimizer_state, share))

    label = "exact posterior p(h|v)" if reference == "exact" else f"unroll(K={reference_steps})"
    report = BiasReport(
        ks=list(ks),
        reference=label,
        num_batches=len(refs),
        reference_change=statistics.fmean(changes) if changes else None,
    )
    pooled_ref = {n: torch.stack([r[n] for r in refs]).mean(0) for n in refs[0]}
    for k in ks:
        report.cos_sim[k] = [cosine(_flat(g), _flat(r)) for g, r in zip(per_k[k], refs)]
        report.rel_error[k] = [rel_error(_flat(g), _flat(r)) for g, r in zip(per_k[k], refs)]
        pooled = {n: torch.stack([g[n] for g in per_k[k]]).mean(0) for n in pooled_ref}
        report.pooled_cos_sim[k] = cosine(_flat(pooled), _flat(pooled_ref))
        report.pooled_rel_error[k] = rel_error(_flat(pooled), _flat(pooled_ref))
        report.per_parameter_rel_error[k] = {
            n: statistics.fmean(rel_error(g[n], r[n]) for g, r in zip(per_k[k], refs)) for n in pooled_ref
        }
    return report
