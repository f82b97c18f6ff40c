"""The samplers `eval.sampler` and `eval.compare_samplers` accept: name → its Sampler class.

A leaf: `distributed_bism.samplers.get_sampler` resolves the class on first use.
"""

from __future__ import annotations

SAMPLERS: dict[str, str] = {
    "gibbs": "distributed_bism.samplers.gibbs:GibbsSampler",
    "joint_langevin": "distributed_bism.samplers.langevin_samplers:JointLangevinSampler",
    "marginal_langevin": "distributed_bism.samplers.langevin_samplers:MarginalLangevinSampler",
    "conditional": "distributed_bism.samplers.conditional:ConditionalSampler",
    "bidvl_decoder": "distributed_bism.samplers.decoder:DecoderSampler",
}
