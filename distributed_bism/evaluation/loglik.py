"""Log-likelihood of Gaussian RBMs: exact (enumerating h), AIS (forward) and RAISE (reverse).

Annealing path (Neal 2001; Salakhutdinov & Murray 2008), β_0 = 0 < … < β_K = 1:

    E_β(v, h) = ½ Σ_i (v_i − b_i)²/σ_i² − β (cᵀh + vᵀWh)
    f_β(v)    = Σ_h exp(−E_β(v, h)) = exp(−½ Σ_i (v_i − b_i)²/σ_i²) Π_j (1 + exp(β a_j(v))),  a(v) = c + Wᵀv

The base β = 0 is the model with W = c = 0 and the same b, σ: v ~ N(b, σ²), h uniform, with
Z_0 = (2π)^{D/2} Π_i σ_i · 2^H. The transition at β is one block-Gibbs sweep
h ~ Bern(sigmoid(β a(v))), v ~ N(b + β σ² W h, σ²), which (as a kernel on v) is reversible w.r.t. f_β.

Forward AIS: v_0 ~ base, log w = Σ_{k=1..K} [log f_{β_k}(v_{k−1}) − log f_{β_{k−1}}(v_{k−1})], with
v_k from the sweep at β_k. E[w] = Z/Z_0, so log Ẑ = log Z_0 + log mean w is, by Jensen, a stochastic
LOWER bound on log Z: the AIS log-likelihood −F(v) − log Ẑ errs HIGH (optimistic).

Reverse AIS (BDMC on data simulated from the model; Grosse et al. 2015): start a chain at a sample
v_K of the model, run the sweeps in reverse order β_K … β_1 down to v_0 and weigh
    log w = Σ_{k=0..K−1} [log f_{β_k}(v_k) − log f_{β_{k+1}}(v_k)],   E[w] = Z_0/Z,
so log Ẑ = log Z_0 − log mean w is a stochastic UPPER bound on log Z (its log-likelihood errs LOW)
— when the starts are exact model samples: by enumeration for H ≤ 20, else long Gibbs chains
(approximate). Forward and reverse together bracket log Z.

RAISE (Burda, Grosse & Salakhutdinov 2015) runs the same reverse chain from a DATA point v:
    log p̂(v) = −F(v) − log Z_0 + log w,   E[p̂(v)] = p_ann(v),
the likelihood of the annealed model (the forward chain as a generative model), → p(v) as K grows.
It is a stochastic lower bound on log p_ann(v), not on log p(v): it errs low on data the model
fits (its own samples, test data of a trained model) but was measured to err HIGH on data far
from the model (N(0, I) noise under a random GRBM: +0.22 nats at 500 β; tests/test_loglik.py).

Distributed: under an initialised torch.distributed group each rank runs its share of the chains
(seeded `seed + rank`) and the log-weights are all-gathered; one process is world size 1.

The `test_loglik` metric (eval.metrics), at the end of this file: mean log p(v) of the test set
    H <= 20:  exact, enumerating h (rank 0 only)
    H > 20:   forward AIS with eval.ais_chains chains over eval.ais_betas linear β, every rank
              running its share of the chains (a collective: it is declared for all ranks);
              logs log Ẑ, its standard error and the chains' effective sample size
    eval.raise_chains > 0: also RAISE, the conservative estimate from the other side
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from distributed_bism.distributed import gather_rows, rank_and_world, share
from distributed_bism.evaluation.metrics import EvalContext, register_metric
from distributed_bism.models.grbm import MAX_ENUMERABLE_H, GaussianRBM
from distributed_bism.progress_bars import bar

# docs/methods.md: the reference evaluates with 2000 chains and 2000 linearly spaced β.
DEFAULT_NUM_CHAINS = 2000
DEFAULT_NUM_BETAS = 2000


@dataclass(frozen=True)
class LogZEstimate:
    """log Ẑ = log Z_0 + log mean_i w_i from the log-weights of n chains, with its spread.

    std_err: delta-method standard error of log mean w, sqrt(Var(w) / n) / mean(w).
    ess: effective sample size (Σw)² / Σw² (n when all weights are equal, 1 when one dominates).
    side: "lower" for forward AIS (log Ẑ underestimates log Z in expectation), "upper" for RAISE.
    """

    log_z: float
    std_err: float
    ess: float
    num_chains: int
    num_betas: int
    side: str

    @classmethod
    def from_log_weights(cls, log_w: Tensor, log_z0: float, *, num_betas: int, side: str) -> LogZEstimate:
        log_w = log_w.detach().double()
        n = log_w.numel()
        w = torch.exp(log_w - log_w.max())  # scaled weights: every ratio below is scale-free
        mean = w.mean()
        std_err = (w.std(unbiased=True) / math.sqrt(n) / mean).item() if n > 1 else math.inf
        log_mean = torch.logsumexp(log_w, 0).item() - math.log(n)
        return cls(
            log_z=log_z0 + log_mean,
            std_err=std_err,
            ess=(w.sum() ** 2 / (w**2).sum()).item(),
            num_chains=n,
            num_betas=num_betas,
            side=side,
        )


@dataclass(frozen=True)
class LogLikEstimate:
    """Mean log-likelihood over data, with the log Z estimate it implies.

    For AIS, loglik = −mean F(v) − log Ẑ and std_err is that of log Ẑ. For RAISE, loglik is the mean of
    the per-point estimates, std_err the standard error of that mean over points and chains (delta
    method per point), and log_z = −mean F(v) − loglik the log Z it implies.
    """

    loglik: float
    std_err: float
    log_z: LogZEstimate
    num_points: int


# ----------------------------------------------------------------------------------------- math
def linear_betas(num_betas: int, *, dtype: torch.dtype = torch.float64) -> Tensor:
    """β_0 = 0 … β_{K} = 1, num_betas values evenly spaced (the reference's schedule), (num_betas,)."""
    if num_betas < 2:
        raise ValueError(f"an annealing schedule needs at least 2 betas (0 and 1), got {num_betas}")
    return torch.linspace(0.0, 1.0, num_betas, dtype=dtype)


def _check_betas(betas: Tensor) -> Tensor:
    if betas.dim() != 1 or len(betas) < 2 or betas[0] != 0 or betas[-1] != 1 or (betas.diff() < 0).any():
        raise ValueError("betas must be a non-decreasing 1-D schedule from 0 to 1")
    return betas


def base_log_partition(grbm: GaussianRBM) -> float:
    """log Z_0 = (D/2) log 2π + Σ_i log σ_i + H log 2 of the base model (W = c = 0, same b, σ)."""
    return (0.5 * grbm.v_dim * math.log(2 * math.pi) + grbm.log_sigma.sum() + grbm.h_dim * math.log(2)).item()


def _log_f_delta(grbm: GaussianRBM, v: Tensor, beta_to: float, beta_from: float) -> Tensor:
    """log f_{β_to}(v) − log f_{β_from}(v) = Σ_j softplus(β_to a_j) − softplus(β_from a_j), (N,)."""
    a = grbm.posterior_logits(v)
    return (F.softplus(beta_to * a) - F.softplus(beta_from * a)).sum(-1)


def _sweep(grbm: GaussianRBM, v: Tensor, beta: float, generator: torch.Generator | None) -> Tensor:
    """One block-Gibbs sweep at β: h ~ Bern(sigmoid(β a(v))), v' ~ N(b + β σ² W h, σ²), (N, D)."""
    h = torch.bernoulli(torch.sigmoid(beta * grbm.posterior_logits(v)), generator=generator)
    mean = grbm.b + beta * torch.exp(2 * grbm.log_sigma) * (h @ grbm.W.T)
    noise = torch.randn(mean.shape, generator=generator, dtype=mean.dtype, device=mean.device)
    return mean + torch.exp(grbm.log_sigma) * noise


@torch.no_grad()
def ais_log_weights(
    grbm: GaussianRBM, betas: Tensor, num_chains: int, generator: torch.Generator | None = None
) -> Tensor:
    """Forward AIS log-weights of `num_chains` independent chains, (num_chains,): log w with E[w] = Z/Z_0."""
    beta_values: list[float] = _check_betas(betas).tolist()
    sigma = torch.exp(grbm.log_sigma)
    noise = torch.randn((num_chains, grbm.v_dim), generator=generator, dtype=sigma.dtype, device=sigma.device)
    v = grbm.b + sigma * noise  # exact draws of the base
    log_w = torch.zeros(num_chains, dtype=sigma.dtype, device=sigma.device)
    for k in bar(range(1, len(beta_values)), "AIS", unit="β"):
        log_w += _log_f_delta(grbm, v, beta_values[k], beta_values[k - 1])
        if k < len(beta_values) - 1:  # the state after the last β is never weighed
            v = _sweep(grbm, v, beta_values[k], generator)
    return log_w


@torch.no_grad()
def raise_log_weights(
    grbm: GaussianRBM, data: Tensor, betas: Tensor, num_chains: int, generator: torch.Generator | None = None
) -> Tensor:
    """RAISE log-weights, (num_chains, N): log p̂(v_n) per chain, with E[p̂(v)] = p_ann(v) (module docstring)."""
    beta_values: list[float] = _check_betas(betas).tolist()
    v = grbm._check_v(data).unsqueeze(0).expand(num_chains, *data.shape).reshape(-1, grbm.v_dim)
    log_w = -grbm.free_energy(v) - base_log_partition(grbm)
    # v_k → v_{k−1} by the sweep at β_k, weighed at β_{k−1}
    for k in bar(range(len(beta_values) - 1, 0, -1), "RAISE", unit="β"):
        v = _sweep(grbm, v, beta_values[k], generator)
        log_w += _log_f_delta(grbm, v, beta_values[k - 1], beta_values[k])
    return log_w.view(num_chains, len(data))


# ------------------------------------------------------------------------------- distribution
def chain_share(num_chains: int, rank: int, world_size: int) -> int:
    """Chains run by `rank`: num_chains split as evenly as possible, the first ranks taking the remainder."""
    start, stop = share(num_chains, rank, world_size)
    return stop - start


# ------------------------------------------------------------------------------------- public
def exact_log_likelihood(grbm: GaussianRBM, data: Tensor, *, batch_size: int = 10_000) -> float:
    """Mean exact log p(v) over data (N, D), enumerating h (GaussianRBM.log_likelihood; H ≤ 20)."""
    with torch.no_grad():
        log_z = grbm.log_partition()
        total = sum(grbm.log_likelihood(chunk, log_z=log_z).sum().item() for chunk in data.split(batch_size))
    return total / len(data)


def _schedule(num_betas: int, betas: Tensor | None, grbm: GaussianRBM) -> Tensor:
    return (_check_betas(betas) if betas is not None else linear_betas(num_betas)).to(grbm.W)


def ais_log_partition(
    grbm: GaussianRBM,
    *,
    num_chains: int = DEFAULT_NUM_CHAINS,
    num_betas: int = DEFAULT_NUM_BETAS,
    betas: Tensor | None = None,
    seed: int = 0,
) -> LogZEstimate:
    """Forward-AIS estimate of log Z (a stochastic lower bound), over all ranks' chains.

    `betas` (K+1,) overrides the linear schedule of `num_betas` values. Rank r runs its share of
    `num_chains` with a generator seeded `seed + r`; every rank returns the same estimate.
    """
    rank, world = rank_and_world()
    sched = _schedule(num_betas, betas, grbm)
    gen = torch.Generator(device=grbm.W.device).manual_seed(seed + rank)
    log_w = gather_rows(ais_log_weights(grbm, sched, chain_share(num_chains, rank, world), gen))
    return LogZEstimate.from_log_weights(log_w, base_log_partition(grbm), num_betas=len(sched), side="lower")


def ais_log_likelihood(
    grbm: GaussianRBM,
    data: Tensor,
    *,
    num_chains: int = DEFAULT_NUM_CHAINS,
    num_betas: int = DEFAULT_NUM_BETAS,
    betas: Tensor | None = None,
    seed: int = 0,
    batch_size: int = 10_000,
) -> LogLikEstimate:
    """Mean log p(v) over data (N, D) = −mean F(v) − log Ẑ_AIS (a stochastic upper bound)."""
    est = ais_log_partition(grbm, num_chains=num_chains, num_betas=num_betas, betas=betas, seed=seed)
    neg_f = _mean_neg_free_energy(grbm, data, batch_size)
    return LogLikEstimate(loglik=neg_f - est.log_z, std_err=est.std_err, log_z=est, num_points=len(data))


def raise_log_likelihood(
    grbm: GaussianRBM,
    data: Tensor,
    *,
    num_chains: int = 10,
    num_betas: int = DEFAULT_NUM_BETAS,
    betas: Tensor | None = None,
    seed: int = 0,
) -> LogLikEstimate:
    """RAISE estimate of the mean log p(v) over data (N, D), `num_chains` reverse chains per point
    (a stochastic lower bound on the annealed model's log-likelihood; see the module docstring). Under torch.distributed each rank takes a share of the
    points (seeded `seed + rank`) and the per-point estimates are all-gathered."""
    rank, world = rank_and_world()
    sched = _schedule(num_betas, betas, grbm)
    start, stop = share(len(data), rank, world)
    mine = data[start:stop]
    gen = torch.Generator(device=grbm.W.device).manual_seed(seed + rank)
    log_w = raise_log_weights(grbm, mine, sched, num_chains, gen)  # (chains, n)
    per_point = torch.logsumexp(log_w, 0) - math.log(num_chains)
    w = torch.exp(log_w - log_w.max(0).values)
    var_point = (
        (w.var(0, unbiased=True) / num_chains / w.mean(0) ** 2)
        if num_chains > 1
        else torch.full_like(per_point, math.inf)
    )
    ess = (w.sum(0) ** 2 / (w**2).sum(0)).mean()
    gathered = gather_rows(torch.stack([per_point, var_point, -grbm.free_energy(mine), ess.expand_as(per_point)], 1))
    n = len(gathered)
    loglik = gathered[:, 0].mean().item()
    std_err = math.sqrt(gathered[:, 1].sum().item()) / n
    log_z = LogZEstimate(
        log_z=gathered[:, 2].mean().item() - loglik,
        std_err=std_err,
        ess=gathered[:, 3].mean().item(),
        num_chains=num_chains,
        num_betas=len(sched),
        side="upper",
    )
    return LogLikEstimate(loglik=loglik, std_err=std_err, log_z=log_z, num_points=n)


def reverse_ais_log_partition(
    grbm: GaussianRBM,
    *,
    num_chains: int = DEFAULT_NUM_CHAINS,
    num_betas: int = DEFAULT_NUM_BETAS,
    betas: Tensor | None = None,
    seed: int = 0,
    gibbs_steps: int = 1000,
) -> LogZEstimate:
    """Reverse-AIS estimate of log Z (BDMC on data simulated from the model): a stochastic UPPER bound.

    Each chain starts at a sample of the model and anneals β 1 → 0 (the RAISE chain of one point):
    log w = Σ_{k=0..K−1} [log f_{β_k}(v_k) − log f_{β_{k+1}}(v_k)], E[w] = Z_0/Z, and
    log Ẑ = log Z_0 − log mean w ≥ log Z in expectation — when the starts are exact samples, which
    they are for H ≤ 20 (enumerated p(h), `GaussianRBM.sample_exact`). For larger H they come from
    `gibbs_steps` block-Gibbs sweeps and the bound holds only as far as those chains mixed.
    Distributed like `ais_log_partition`.
    """
    rank, world = rank_and_world()
    sched = _schedule(num_betas, betas, grbm)
    gen = torch.Generator(device=grbm.W.device).manual_seed(seed + rank)
    n = chain_share(num_chains, rank, world)
    if grbm.h_dim <= MAX_ENUMERABLE_H:
        starts = grbm.sample_exact(n, gen)
    else:
        with torch.no_grad():
            starts = grbm.b + torch.exp(grbm.log_sigma) * torch.randn(
                (n, grbm.v_dim), generator=gen, dtype=grbm.W.dtype, device=grbm.W.device
            )
            for _ in range(gibbs_steps):
                starts = grbm.gibbs_step(starts, gen)
    with torch.no_grad():  # raise_log_weights = log p̂ = −F − log Z_0 + log w, so log w = that + F + log Z_0
        log_w = raise_log_weights(grbm, starts, sched, 1, gen)[0] + grbm.free_energy(starts) + base_log_partition(grbm)
    log_w = gather_rows(log_w)
    inverse = LogZEstimate.from_log_weights(log_w, -base_log_partition(grbm), num_betas=len(sched), side="upper")
    return dataclasses.replace(inverse, log_z=-inverse.log_z)  # log Ẑ = −(log(1/Z_0) + log mean w)


def _mean_neg_free_energy(grbm: GaussianRBM, data: Tensor, batch_size: int = 10_000) -> float:
    with torch.no_grad():
        return sum((-grbm.free_energy(c)).sum().item() for c in data.split(batch_size)) / len(data)


@dataclass(frozen=True)
class LogLikBounds:
    """Both sides of the mean log-likelihood: `lower` = −mean F − log Ẑ_reverse, `upper` = −mean F −
    log Ẑ_forward (each a stochastic bound; see the two log Z estimators)."""

    lower: LogLikEstimate
    upper: LogLikEstimate


def bidirectional_log_likelihood(
    grbm: GaussianRBM,
    data: Tensor,
    *,
    num_chains: int = DEFAULT_NUM_CHAINS,
    num_betas: int = DEFAULT_NUM_BETAS,
    betas: Tensor | None = None,
    seed: int = 0,
) -> LogLikBounds:
    """Forward AIS (upper) and reverse AIS from model samples (lower) for the mean log p(v) on data (N, D)."""
    neg_f = _mean_neg_free_energy(grbm, data)
    kw = dict(num_chains=num_chains, num_betas=num_betas, betas=betas, seed=seed)
    fwd, rev = ais_log_partition(grbm, **kw), reverse_ais_log_partition(grbm, **kw)  # type: ignore[arg-type]
    return LogLikBounds(
        lower=LogLikEstimate(neg_f - rev.log_z, rev.std_err, rev, len(data)),
        upper=LogLikEstimate(neg_f - fwd.log_z, fwd.std_err, fwd, len(data)),
    )


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
        out.update(
            {
                "eval/test_loglik": est.loglik,
                "eval/test_loglik_std_err": est.std_err,
                "eval/log_z": est.log_z.log_z,
                "eval/log_z_std_err": est.log_z.std_err,
                "eval/ais_ess": est.log_z.ess,
            }
        )
    if e.raise_chains > 0:
        low = raise_log_likelihood(grbm, data, num_chains=e.raise_chains, num_betas=e.ais_betas, seed=seed)
        out.update({"eval/test_loglik_raise": low.loglik, "eval/test_loglik_raise_std_err": low.std_err})
    return out
