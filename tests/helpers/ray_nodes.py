"""The cluster tests' Ray cluster: cluster/local_cluster.py's LocalCluster (a head and more nodes on
this machine, each a `ray start --block` process group of its own, stopped by exactly those
groups, never `ray stop`), plus the `ray` CLI and the job server as the tests use them."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("local_cluster", REPO / "cluster" / "local_cluster.py")
local_cluster = importlib.util.module_from_spec(_spec)
sys.modules["local_cluster"] = local_cluster  # its dataclass looks itself up there
_spec.loader.exec_module(local_cluster)
free_port = local_cluster.free_port
VENV_BIN = local_cluster.VENV_BIN


class RayCluster:
    """`cluster/local_cluster.py start` in this process: a head (dashboard and job server on
    127.0.0.1) and worker nodes worker1, worker2, ...; `stop` is `local_cluster.py stop`."""

    def __init__(self, workdir: Path, *, workers: int, num_cpus: int, resources: dict[str, float] | None = None):
        self.dir = workdir / "local_cluster"
        local_cluster.main(["--dir", str(self.dir), "start", "--workers", str(workers), "--cpus", str(num_cpus),
                            "--resources", json.dumps(resources or {})])
        self.local = local_cluster.LocalCluster.load(self.dir)
        self.env = {**os.environ, **self.local.env(), "PATH": f"{VENV_BIN}:{os.environ.get('PATH', '')}"}

    @property
    def temp_dir(self) -> str:
        return self.local.temp_dir

    @property
    def node_ids(self) -> dict[str, str]:
        return self.local.node_ids

    def add_node(self, name: str, *, num_cpus: int, resources: dict[str, float] | None = None) -> None:
        self.local.add_node(name, num_cpus=num_cpus, resources=resources)

    def kill_node(self, name: str) -> None:
        """SIGKILL one node's whole process group, as a preempted machine would vanish."""
        self.local.stop_node(name, graceful=False)

    def ray(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """The venv's `ray CMD SUB --address <dashboard> ARGS` from the repo root (job commands)."""
        return subprocess.run([str(VENV_BIN / "ray"), *args[:2], "--address", self.local.dashboard, *args[2:]],
                              cwd=REPO, env=self.env, capture_output=True, text=True, timeout=timeout)

    def submit(self, job_id: str, entrypoint: list[str], options: list[str], timeout: float = 120) -> None:
        """`ray job submit --no-wait` from the repo root. Right after start the head's job agent may
        not be up yet ("No available agent to submit job"): that one answer is retried."""
        deadline = time.monotonic() + timeout
        while True:
            done = self.ray("job", "submit", "--no-wait", "--submission-id", job_id, *options, "--", *entrypoint)
            if done.returncode == 0:
                return
            if "No available agent" not in done.stderr or time.monotonic() > deadline:
                dashboard = Path(self.temp_dir, "session_latest", "logs", "dashboard.log")
                raise RuntimeError(f"ray job submit {job_id}: exit {done.returncode}\n{done.stderr[-3000:]}\n"
                                   f"dashboard.log: {dashboard.read_text()[-5000:] if dashboard.exists() else '-'}")
            time.sleep(1)

    def job(self, job_id: str) -> dict[str, Any]:
        return self.local.get(f"/api/jobs/{job_id}")

    def logs(self, job_id: str) -> str:
        return self.local.get(f"/api/jobs/{job_id}/logs")["logs"]

    def wait_for_job(self, job_id: str, timeout: float) -> str:
        """The job's final status: SUCCEEDED, FAILED or STOPPED."""
        deadline = time.monotonic() + timeout
        while (status := self.job(job_id)["status"]) not in ("SUCCEEDED", "FAILED", "STOPPED"):
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} is still {status} after {timeout:.0f} s")
            time.sleep(0.5)
        return status

    def stop(self) -> list[int]:
        """`local_cluster.py stop`; the process groups of its nodes that are still alive after it (none)."""
        groups = list(self.local.nodes.values())
        local_cluster.main(["--dir", str(self.dir), "stop", "--kill"])  # SIGKILL: no need to wait for a clean exit
        return [g for g in groups if local_cluster._group_alive(g)]
