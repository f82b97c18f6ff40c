"""Shared fixtures: tiny float64 models for the exactness tests."""

from __future__ import annotations

import pytest
import torch

from distributed_bism.models import BernoulliPosterior, ConvEBLVM, GaussianPosterior, GaussianRBM


@pytest.fixture
def float64():
    """Run the test in float64 and restore the default afterwards."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


@pytest.fixture
def one_thread():
    """Run the test on one intra-op thread and restore the count afterwards: the sampler loops do
    thousands of tiny tensor ops, where handing work to a thread pool costs more than it saves (on a
    busy 2-core machine 300 AIS chains × 1000 β took 57 s on 2 threads, 1.2 s on one)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def tiny_grbm(v_dim: int = 2, h_dim: int = 3, seed: int = 0) -> tuple[GaussianRBM, BernoulliPosterior]:
    """A GRBM with non-trivial parameters and a linear Bernoulli posterior (τ = 0.5)."""
    torch.manual_seed(seed)
    grbm = GaussianRBM(v_dim, h_dim, init_std=0.5)
    with torch.no_grad():
        grbm.b.normal_(0, 0.3)
        grbm.c.normal_(0, 0.3)
        grbm.log_sigma.normal_(0, 0.2)
    return grbm, BernoulliPosterior(v_dim, h_dim, temperature=0.5)


def tiny_conv(seed: int = 0) -> tuple[ConvEBLVM, GaussianPosterior]:
    """A conv EBLVM on 1×8×8 with 2 base channels and a small conv Gaussian posterior."""
    torch.manual_seed(seed)
    energy = ConvEBLVM((1, 8, 8), h_dim=3, ch=2, blocks_per_stage=0)
    q = GaussianPosterior((1, 8, 8), 3, encoder="conv", channels=(4, 4, 4))
    return energy, q


@pytest.fixture(scope="module")
def ray_cluster():
    """A local 2-CPU Ray for one test module, started and shut down by this process (never
    `ray stop`); per module, so it is gone before other modules start clusters of their own."""
    import os

    import ray

    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    try:
        yield ray
    finally:
        ray.shutdown()
