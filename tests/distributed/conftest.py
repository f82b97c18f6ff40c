"""Fixtures of the distributed layer: a local Ray for one test module."""

from __future__ import annotations

import pytest

from tests.helpers.private_ray import private_ray


@pytest.fixture(scope="module")
def ray_cluster():
    """A local 2-CPU Ray for one test module, started and shut down by this process (never
    `ray stop`); per module, so it is gone before other modules start clusters of their own. It
    joins no other Ray on the machine, and its workers find no other (tests/helpers/private_ray.py)."""
    with private_ray(num_cpus=2) as ray:
        yield ray
