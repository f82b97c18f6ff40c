"""A node preempted as Kubernetes or a cloud VM does it, on the two-node loopback cluster.

`cluster/local_cluster.py` starts a head and a worker node (2 CPUs and one `bism_slot` each: two
workers that each ask for a slot land on different nodes). Mid-run the worker node's `ray start`
process gets SIGTERM, as a pod's PID 1 does when Kubernetes deletes it and a VM's processes do when
the cloud reclaims it. Ray 2.60's `ray start` then drains its own node with reason PREEMPTION and a
deadline $RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S (30 s) away, and stops its processes when that is
over. Ray Train's watcher (polling every 5 s, the default) tells both workers; they checkpoint at
the next step and train on. When the deadline has passed Ray restarts the group, counting a
preemption; a replacement node joins (as the autoscaler would start one), and the run resumes from
a checkpoint at or after the just-in-time one and finishes. With trainer.max_failures=0 and
trainer.max_preemption_failures=1 the job succeeds only if Ray counted the restart as a preemption.

timeline.json in the test's directory records when each of these happened (seconds after the SIGTERM).
"""

from __future__ import annotations

import copy
import json
import os
import re
import signal
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.distributed.test_tune import TINY
from tests.helpers.ray_nodes import REPO, RayCluster
from tests.unit.test_bad_input import no_ray  # noqa: F401  (no_ray: autouse, nothing here may call ray.init)

STEPS, EVERY, LOG = 3000, 2000, 100  # regular checkpoints are rare: the restart resumes from the just-in-time one


def config(tmp_path: Path) -> Path:
    cfg = copy.deepcopy(TINY)
    cfg["trainer"].update({"name": "spot", "num_workers": 2, "resources_per_worker": {"bism_slot": 1},
                           "steps": STEPS, "checkpoint_every": EVERY, "log_every": LOG, "num_to_keep": 100,
                           "max_failures": 0, "max_preemption_failures": 1, "output_dir": str(tmp_path / "out")})
    cfg["tracking"] = {"enabled": False}
    cfg["eval"] = {"every": STEPS, "metrics": []}
    path = tmp_path / "spot.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def wait_for(what: str, ok: Any, cluster: RayCluster, timeout: float = 300) -> float:
    """Poll ok() until true; the time it became true (time.monotonic)."""
    deadline = time.monotonic() + timeout
    while not ok():
        assert time.monotonic() < deadline, f"{what}: not within {timeout:.0f} s\n" + cluster.logs("spot")[-3000:]
        time.sleep(0.2)
    return time.monotonic()


@pytest.mark.slow
@pytest.mark.soak
def test_sigterm_to_a_node_checkpoints_in_time_and_resumes_as_a_preemption(cluster: RayCluster,
                                                                            tmp_path: Path) -> None:
    run = tmp_path / "out" / "ray_results" / "spot"
    cluster.submit("spot", ["bism", "train", str(config(tmp_path))],
                   ["--runtime-env", str(REPO / "cluster" / "runtime_env.yaml"), "--working-dir", "."])
    wait_for("training", lambda: f"step {LOG}/{STEPS}" in cluster.logs("spot"), cluster)

    def told() -> list[int]:
        return [int(s) for s in re.findall(r"step (\d+): a node of the run is being preempted", cluster.logs("spot"))]

    sigterm = time.monotonic()
    os.kill(cluster.local.nodes["worker1"], signal.SIGTERM)  # the node's `ray start` only, as Kubernetes signals PID 1
    noticed = wait_for("the preemption notice", lambda: bool(told()), cluster)
    step = told()[0]
    saved = wait_for("the just-in-time checkpoint", lambda: (run / f"checkpoint_{step:08d}" / "state.pt").is_file(),
                     cluster)
    # the old node is gone once its `ray start` has exited (after the drain deadline); then a new one joins
    gone = wait_for("the drained node's exit", lambda: not _alive(cluster.local.nodes["worker1"]), cluster)
    cluster.local.stop_node("worker1")  # forgets it (it is no longer a `ray start` of the cluster: no signal)
    add_node(cluster, "worker2")
    resumed = wait_for("the resume", lambda: "resumed from" in cluster.logs("spot"), cluster)
    status = cluster.wait_for_job("spot", timeout=600)
    logs = cluster.logs("spot")
    assert status == "SUCCEEDED", f"{cluster.job('spot').get('message')}\n{logs[-4000:]}"
    found = re.search(r"resumed from \S+/checkpoint_(\d+) at step (\d+)", logs)
    assert found and int(found.group(2)) == step, logs[-3000:]  # the just-in-time checkpoint, not step 0
    assert f"step {STEPS}/{STEPS}" in logs
    (tmp_path / "timeline.json").write_text(json.dumps({
        "notice_s": noticed - sigterm, "jit_checkpoint_s": saved - sigterm, "jit_step": step,
        "node_exit_s": gone - sigterm, "resumed_s": resumed - sigterm, "resumed_step": int(found.group(2)),
    }, indent=1))


def add_node(cluster: RayCluster, name: str) -> None:
    """A replacement node. On 2 busy cores Ray's fixed 30 s for a new raylet to register can run out
    ("timed out during startup", as in tests/helpers/private_ray.py): then its process group is
    killed and one more is started under another name."""
    try:
        cluster.add_node(name, num_cpus=2, resources={"bism_slot": 1})
    except RuntimeError as e:
        if "timed out during startup" not in str(e):
            raise
        cluster.local.stop_node(name, graceful=False)
        cluster.add_node(name + "b", num_cpus=2, resources={"bism_slot": 1})


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie (exited, not yet reaped) is gone too
        return f.read().split(") ")[-1][0] != "Z"
