"""Objectives: what the training step minimises, selected by `objective.name`.

    bidsm, bimdsm, bissm   bi-level score matching (a higher-level SM loss on s_w, plus a
                           lower-level loss for the posterior)
    dsm, mdsm, ssm         score matching on the exact free energy (GRBM baselines)
    cd, pcd                contrastive divergence (GRBM baselines)
    vages_dsm, vages_mdsm, vages_ksd
                           VaGES: DSM / MDSM / KSD of the VaES score, θ-gradient by VaGES (no
                           unroll), plus the same lower-level loss as BiSM
    bidvl                  bi-level doubly variational learning (a marginal energy, an encoder and
                           a decoder; see bidvl.py)

Each name has one line in distributed_bism/registry/objectives.py: its ObjectiveSpec (what the
method needs, read by config validation without torch) and the path of its builder,
`build(cfg, spec) -> Objective`, in the method's own module (score_matching.py, vages.py,
contrastive.py, bidvl.py), imported here on first use.
"""

from __future__ import annotations

from distributed_bism.config import ObjectiveConfig
from distributed_bism.objectives.base import Objective
from distributed_bism.objectives.noise import NoisyBatch, Perturbation
from distributed_bism.registry import resolve
from distributed_bism.registry.objectives import objective_spec

__all__ = ["Objective", "get_objective", "NoisyBatch", "Perturbation"]


def get_objective(cfg: ObjectiveConfig) -> Objective:
    """Build the objective named by `cfg.name` (validated when the config was loaded)."""
    spec = objective_spec(cfg.name)
    objective = resolve(spec.build)(cfg, spec)
    assert isinstance(objective, Objective) and objective.name == cfg.name, f"{spec.build} did not build {cfg.name}"
    return objective
