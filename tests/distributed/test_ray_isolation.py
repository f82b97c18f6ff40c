"""The distributed tests' own Ray stays their own with other Ray clusters on the machine (issue 15).

test_bism_averages_hypergradients_across_ranks_under_ddp_and_deepspeed failed once while other
Ray clusters ran here and passed alone: the module's Ray was started by an address-less
`ray.init(num_cpus=2)`, which joins (and with num_cpus given, fails on) whatever cluster
$RAY_ADDRESS or the default temp dir's "current cluster" file names; and Ray Train's
PlacementGroupCleaner, in every run, looked its cluster up without an address and met "Found
multiple active Ray instances" (tests/helpers/private_ray.py has the details).

Here another cluster really runs on the machine (a `ray start --head` process group of this
test's, stopped by that group), and the environment points at it the ways a shell on a shared
machine does: $RAY_ADDRESS, $RAY_API_SERVER_ADDRESS, and its address recorded as the current
cluster in Ray's default temp dir (as a `ray start` without --temp-dir leaves it).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.private_ray import ADDRESS_FILE, private_ray
from tests.helpers.ray_nodes import RayCluster


@pytest.fixture(scope="module")
def foreign(tmp_path_factory: pytest.TempPathFactory):
    """Someone else's 1-CPU Ray head on this machine."""
    cluster = RayCluster(tmp_path_factory.mktemp("foreign"), workers=0, num_cpus=1)
    try:
        yield cluster
    finally:
        assert cluster.stop() == [], "a process group of the foreign cluster outlived its stop"


def port(address: str) -> int:
    return int(address.rsplit(":", 1)[1])


def test_private_ray_neither_joins_another_cluster_nor_lets_its_workers_find_one(
    foreign: RayCluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    default_tmp = tmp_path / "default_tmp"
    (default_tmp / "ray").mkdir(parents=True)
    (default_tmp / "ray" / ADDRESS_FILE).write_text(foreign.local.address)
    pointing_there = {
        "RAY_TMPDIR": str(default_tmp),
        "RAY_ADDRESS": foreign.local.address,
        "RAY_API_SERVER_ADDRESS": foreign.local.dashboard,
    }
    for k, v in pointing_there.items():
        monkeypatch.setenv(k, v)

    with private_ray(num_cpus=2) as ray:
        ours = ray.get_runtime_context().gcs_address
        assert port(ours) != foreign.local.port, "the test's Ray joined the other cluster"
        assert ray.cluster_resources().get("CPU") == 2

        @ray.remote(num_cpus=0)
        def lookup() -> tuple[str, dict[str, str | None]]:
            """What an address-less lookup finds in a worker (Ray Train's PlacementGroupCleaner
            asks the State API with address None, which starts here)."""
            from ray._private.services import canonicalize_bootstrap_address_or_die

            env = {k: os.environ.get(k) for k in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
            return canonicalize_bootstrap_address_or_die(None), env

        found, env = ray.get(lookup.remote())
        assert env == {"RAY_ADDRESS": None, "RAY_API_SERVER_ADDRESS": None}, f"a worker sees {env}"
        assert found == ours, f"a worker's address-less lookup finds {found}, not its own cluster {ours}"

    assert {k: os.environ.get(k) for k in pointing_there} == pointing_there, "the environment was not restored"


def test_private_ray_retries_a_start_that_timed_out_and_kills_what_that_start_left(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Ray 2.60 gives a new raylet 30 s to register, then raises and leaves its processes running
    (reproduced under load, beside another Ray and a CPU hog). Here the first start fails that way,
    leaving a process that names the cluster's temp dir, as Ray's GCS and raylet do."""
    import ray

    real_init, calls, stray = ray.init, [], []

    def init(*args: object, **kwargs: object) -> object:
        calls.append(kwargs.get("address"))
        if len(calls) == 1:
            log_dir = os.path.join(os.environ["RAY_TMPDIR"], "ray", "session_x", "logs")
            stray.append(subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)", log_dir]))
            raise Exception(
                "The current node timed out during startup. This could happen because some of the raylet "
                "failed to startup or the GCS has become overloaded."
            )
        return real_init(*args, **kwargs)

    monkeypatch.setattr(ray, "init", init)
    try:
        with private_ray(num_cpus=1) as started:
            assert calls == ["local", "local"], f"ray.init calls: {calls}"
            assert stray[0].poll() is not None, "the failed start's process was left running"
            assert started.cluster_resources().get("CPU") == 1
    finally:
        if stray and stray[0].poll() is None:
            stray[0].kill()
            stray[0].wait()
