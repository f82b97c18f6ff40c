"""The two-node loopback cluster of tests/cluster/: one per test module that asks for it."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.helpers.ray_nodes import RayCluster


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RayCluster]:
    """A head and one worker node (2 CPUs each, one `bism_slot` per node: one worker each),
    stopped by its own process groups; the test fails if any is left running."""
    c = RayCluster(tmp_path_factory.mktemp("cluster"), workers=1, num_cpus=2, resources={"bism_slot": 1})
    try:
        yield c
    finally:
        left = c.stop()
        assert not left, f"local_cluster.py stop left process groups {left} running"
