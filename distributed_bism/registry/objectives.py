"""The objectives `objective.name` accepts: name → ObjectiveSpec, one line each.

A spec is what a method IS and NEEDS, as plain data, so that config validation checks a
model/posterior/objective combination without importing torch; `build` names the function in the
method's own module that makes its losses (distributed_bism.objectives.get_objective resolves it).
A new method: a builder in its module and one line here. The table's order is the order error
messages list the names in.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ObjectiveSpec:
    """One method.

    build: "module:function", function(cfg: ObjectiveConfig, spec) -> Objective.
    family: bism | score_matching | contrastive | vages | bidvl (how the θ-gradient is estimated).
    perturbation: gaussian | multiscale | rademacher | none: how the data is noised (objectives/noise.py).
    loss: dsm | mdsm | ssm | ksd, the higher level's score loss; None for the others.
    bilevel: a posterior is trained by a lower-level loss (so the method has a hypergradient).
    energy: what the model must provide.
        joint         E(v, h) of an EBLVM with a latent (grbm, conv); the posterior supplies h
        free_energy   the exact free energy F(v): a GRBM, or a marginal energy E(v) (no latent)
        grbm          a GRBM's free energy and its block-Gibbs sampler
        marginal      a marginal energy E(v) (marginal_conv, marginal_mlp)
    posterior: the posterior.name the method needs and that only it may use (None: any).
    divide_inner_by_sigma: the lower-level loss at ṽ is divided by that example's σ_i (multi-scale).
    contrastive: the higher level keeps Gibbs chains, which checkpoints carry (persistent: PCD).
    unrolls: objective.unroll_steps may be > 0 (VaGES's θ-gradient needs no unrolling: K must be 0).
    """

    build: str
    family: str
    perturbation: str = "none"
    loss: str | None = None
    bilevel: bool = False
    energy: str = "joint"
    posterior: str | None = None
    divide_inner_by_sigma: bool = False
    contrastive: bool = False
    persistent: bool = False
    unrolls: bool = True


_SM = "distributed_bism.objectives.score_matching:build"
_VAGES = "distributed_bism.objectives.vages:build"
_CD = "distributed_bism.objectives.contrastive:build"

OBJECTIVES: dict[str, ObjectiveSpec] = {
    "bidsm": ObjectiveSpec(_SM, "bism", "gaussian", "dsm", bilevel=True),
    "bimdsm": ObjectiveSpec(_SM, "bism", "multiscale", "mdsm", bilevel=True, divide_inner_by_sigma=True),
    "bissm": ObjectiveSpec(_SM, "bism", "rademacher", "ssm", bilevel=True),
    "bidvl": ObjectiveSpec(
        "distributed_bism.objectives.bidvl:build", "bidvl", bilevel=True, energy="marginal", posterior="encoder_decoder"
    ),
    "vages_dsm": ObjectiveSpec(_VAGES, "vages", "gaussian", "dsm", bilevel=True, unrolls=False),
    "vages_mdsm": ObjectiveSpec(
        _VAGES, "vages", "multiscale", "mdsm", bilevel=True, unrolls=False, divide_inner_by_sigma=True
    ),
    "vages_ksd": ObjectiveSpec(_VAGES, "vages", "none", "ksd", bilevel=True, unrolls=False),
    "dsm": ObjectiveSpec(_SM, "score_matching", "gaussian", "dsm", energy="free_energy"),
    "mdsm": ObjectiveSpec(_SM, "score_matching", "multiscale", "mdsm", energy="free_energy"),
    "ssm": ObjectiveSpec(_SM, "score_matching", "rademacher", "ssm", energy="free_energy"),
    "cd": ObjectiveSpec(_CD, "contrastive", energy="grbm", contrastive=True),
    "pcd": ObjectiveSpec(_CD, "contrastive", energy="grbm", contrastive=True, persistent=True),
}


def objective_spec(name: str) -> ObjectiveSpec:
    """The spec of `name`; for a name the table lacks, the ValueError config validation gives."""
    if name not in OBJECTIVES:
        raise ValueError(f"objective.name: unknown objective {name!r}; expected one of {tuple(OBJECTIVES)}")
    return OBJECTIVES[name]
