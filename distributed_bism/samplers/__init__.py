"""Samplers of energy-based latent variable models, by name (`get_sampler(name, **settings)`).

    gibbs              block-Gibbs of a Gaussian RBM (model samples)
    joint_langevin     annealed Langevin on (v, h), continuous h only (model samples)
    marginal_langevin  annealed Langevin on v with the VaES score (model samples)
    conditional        v ~ p(v | h = E_q[h|v_data]), the reference's image sampler (NOT model samples)
    bidvl_decoder      v = P(ĥ), ĥ ~ N(0, I): BiDVL's decoder (its generator)

Each returns a SampleResult whose `label` names the sampler and its settings. SAMPLERS, the
names (eval.sampler's legal values), is the leaf table of distributed_bism/registry/samplers.py.
"""

from __future__ import annotations

from distributed_bism.samplers.base import SAMPLERS, Sampler, SampleResult, get_sampler, register_sampler, sampler_class
from distributed_bism.samplers.conditional import SAMPLER_NAME, ConditionalSampler, conditional_samples, posterior_mean
from distributed_bism.samplers.decoder import DecoderSampler
from distributed_bism.samplers.gibbs import GibbsSampler
from distributed_bism.samplers.langevin import LangevinSchedule, annealed_langevin, langevin_with_grad
from distributed_bism.samplers.langevin_samplers import JointLangevinSampler, MarginalLangevinSampler

__all__ = [
    "SAMPLERS",
    "SAMPLER_NAME",
    "ConditionalSampler",
    "DecoderSampler",
    "GibbsSampler",
    "JointLangevinSampler",
    "LangevinSchedule",
    "MarginalLangevinSampler",
    "SampleResult",
    "Sampler",
    "annealed_langevin",
    "conditional_samples",
    "get_sampler",
    "langevin_with_grad",
    "posterior_mean",
    "register_sampler",
    "sampler_class",
]
