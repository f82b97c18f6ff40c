"""Fixtures of the distributed layer: a local Ray for one test module."""

from __future__ import annotations

import pytest


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
