"""A local Ray that belongs to this process and to nothing else on the machine (issue 15).

`ray.init()` without an address does not always start a cluster: it joins the one named by
$RAY_ADDRESS, or by the "current cluster" file in Ray's default temp dir, which every `ray start`
that used the default temp dir writes (and which stays behind, stale, when such a cluster is
stopped by PID instead of `ray stop`). With `num_cpus` given it then fails ("When connecting to an
existing cluster, num_cpus and num_gpus must not be provided"), after logging "Found multiple
active Ray instances ... Connecting to latest cluster". And inside a run, Ray Train's
PlacementGroupCleaner (a detached actor of every TorchTrainer run) looks its cluster up the same
way, without an address: with another Ray on the machine it fails with "Found multiple active Ray
instances", or asks the other cluster whether our controller is alive, and on "not found" removes
our placement group, killing the worker group.

`private_ray` therefore starts a new cluster explicitly (address "local"), in a temp dir of its
own ($RAY_TMPDIR, inherited by the raylet and every worker), without $RAY_ADDRESS or
$RAY_API_SERVER_ADDRESS, and records its own address as that temp dir's current cluster: every
address-less lookup in this process and in its workers finds this cluster and no other.

Under load it may also fail to start at all: Ray 2.60's `ray.init` gives the new raylet a fixed
30 s (not configurable, ray/_private/node.py) to register with the GCS, then raises "The current
node timed out during startup" and leaves the half-started processes running. A `nice`d test on 2
busy cores gets there (reproduced with another Ray and one CPU hog on this machine: 2 of 2 runs).
So a start that times out is retried (STARTUP_TRIES in all), after killing exactly the processes of
the failed attempt: those whose command line names this cluster's own temp dir.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil

# what Ray reads to find "the" cluster; set or unset for the cluster's lifetime, then restored
ISOLATED = ("RAY_TMPDIR", "RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")
ADDRESS_FILE = "ray_current_cluster"  # under <default temp dir>/ray, as `ray start` writes it (Ray 2.60)
STARTUP_TIMED_OUT = "timed out during startup"  # Ray 2.60's Exception when the raylet registers late
STARTUP_TRIES = 3


def processes_of(temp_dir: str) -> list[psutil.Process]:
    """The processes whose command line names temp_dir (a cluster's GCS, raylet, agents, monitors)."""
    inside = temp_dir.rstrip("/") + "/"  # not a longer name that starts the same
    found = []
    for p in psutil.process_iter():
        try:
            if p.pid != os.getpid() and any(inside in arg for arg in p.cmdline()):
                found.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            pass
    return found


def start_local(num_cpus: int, temp_dir: str) -> None:
    """ray.init of a new local cluster (in $RAY_TMPDIR = temp_dir); a start that timed out is
    retried after its processes are killed, by PID."""
    import ray

    for attempt in range(1, STARTUP_TRIES + 1):
        try:
            ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, logging_level="WARNING")
            return
        except Exception as e:
            if STARTUP_TIMED_OUT not in str(e) or attempt == STARTUP_TRIES:
                raise
            print(f"private_ray: start {attempt}/{STARTUP_TRIES} timed out ({e}); retrying", flush=True)
            ray.shutdown()
            left = processes_of(temp_dir)
            for p in left:
                with contextlib.suppress(psutil.NoSuchProcess):
                    p.kill()
            psutil.wait_procs(left, timeout=30)


@contextlib.contextmanager
def private_ray(num_cpus: int) -> Iterator[Any]:
    """A new local Ray with `num_cpus` CPUs and no dashboard, started and shut down by this process
    (never `ray stop`); yields the `ray` module."""
    import ray

    saved = {k: os.environ.get(k) for k in ISOLATED}
    tmp = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # short: Ray's socket paths have a length limit
    os.environ["RAY_TMPDIR"] = tmp
    os.environ.pop("RAY_ADDRESS", None)
    os.environ.pop("RAY_API_SERVER_ADDRESS", None)
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    try:
        start_local(num_cpus, tmp)
        own = Path(tmp, "ray", ADDRESS_FILE)
        own.parent.mkdir(parents=True, exist_ok=True)
        own.write_text(ray.get_runtime_context().gcs_address)
        yield ray
    finally:
        ray.shutdown()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        shutil.rmtree(tmp, ignore_errors=True)
