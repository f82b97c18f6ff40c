"""A Ray cluster of several nodes on this machine, for development: a head plus worker nodes, each
a `ray start --block` process in a session of its own, so each node is one process group.

    .venv/bin/python cluster/local_cluster.py start --workers 1 --cpus 2     # head + 1 worker node
    .venv/bin/python cluster/local_cluster.py status                          # nodes, addresses, env
    .venv/bin/python cluster/local_cluster.py stop-node worker1               # one node, as if preempted
    .venv/bin/python cluster/local_cluster.py add-node worker2 --cpus 2
    .venv/bin/python cluster/local_cluster.py stop                            # everything it started

State lives in --dir (default outputs/local_cluster): cluster.json (ports, Ray's temp dir, the
process group of every node), the cluster's auth token and each node's log. `stop` signals exactly
those process groups, after checking that each is still a `ray start` of this cluster's temp dir;
it never runs `ray stop`, which would stop every Ray cluster on the machine.

Ray 2.60's `ray start` turns on token authentication, so every client needs RAY_AUTH_MODE=token and
the token: `status` prints the environment to export (RAY_AUTH_TOKEN_PATH points at this
cluster's token file). Ray resolves 127.0.0.1 to this machine's address, and its GCS port listens
on all interfaces: the token is what keeps others out. The dashboard and job server bind 127.0.0.1.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

VENV_BIN = Path(sys.executable).parent  # the venv's ray, so jobs on the head find `bism` on PATH
STATE_FILE = "cluster.json"
DEFAULT_DIR = Path(__file__).resolve().parents[1] / "outputs" / "local_cluster"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # the id now belongs to someone else's group: not ours
        return False
    return True


@dataclass
class LocalCluster:
    directory: Path
    temp_dir: str  # Ray's temp dir: short, unix socket paths in it are limited to ~107 characters
    port: int
    dashboard_port: int
    nodes: dict[str, int] = field(default_factory=dict)  # node name -> pid of its `ray start` = its process group
    node_ids: dict[str, str] = field(default_factory=dict)  # node name -> Ray's node id

    # ------------------------------------------------------------------ state
    @classmethod
    def create(cls, directory: Path, *, num_cpus: int, resources: dict[str, float] | None = None) -> LocalCluster:
        """Start a head; its dashboard and job server on 127.0.0.1."""
        directory = directory.resolve()
        if (directory / STATE_FILE).exists():
            raise SystemExit(f"a local cluster is already recorded in {directory}; stop it first")
        (directory / "logs").mkdir(parents=True, exist_ok=True)
        token = directory / "auth_token"
        token.write_text(secrets.token_hex(16))
        token.chmod(0o600)
        cluster = cls(directory, tempfile.mkdtemp(prefix="rc", dir="/tmp"), free_port(), free_port())
        try:
            cluster.add_node("head", num_cpus=num_cpus, resources=resources)
        except BaseException:
            cluster.stop()
            raise
        return cluster

    @classmethod
    def load(cls, directory: Path) -> LocalCluster:
        state = directory.resolve() / STATE_FILE
        if not state.exists():
            raise SystemExit(f"no local cluster recorded in {directory}")
        raw = json.loads(state.read_text())
        return cls(**{**raw, "directory": Path(raw["directory"])})

    def _save(self) -> None:
        (self.directory / STATE_FILE).write_text(json.dumps({**asdict(self), "directory": str(self.directory)}, indent=1))

    # ------------------------------------------------------------------ addresses
    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def dashboard(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def env(self) -> dict[str, str]:
        """What a client of this cluster (ray CLI, bism, a driver) needs in its environment."""
        return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(self.directory / "auth_token"),
                "RAY_TMPDIR": self.temp_dir, "RAY_ADDRESS": self.address, "RAY_API_SERVER_ADDRESS": self.dashboard}

    def _node_env(self) -> dict[str, str]:
        env = {**os.environ, **self.env(), "PATH": f"{VENV_BIN}:{os.environ.get('PATH', '')}",
               "RAY_USAGE_STATS_ENABLED": "0", "RAY_DEDUP_LOGS": "0",
               # a vanished node is declared dead after ~10 s instead of ~30 s, so its work moves on sooner
               "RAY_health_check_period_ms": "2000", "RAY_health_check_failure_threshold": "5"}
        env.pop("RAY_ADDRESS")  # `ray start` takes the address on its command line
        return env

    def get(self, path: str) -> Any:
        """GET a dashboard endpoint (JSON), with the token."""
        token = (self.directory / "auth_token").read_text().strip()
        request = urllib.request.Request(self.dashboard + path, headers={"Authorization": f"Bearer {token}"})
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read())

    def alive_nodes(self) -> dict[str, dict[str, Any]]:
        """node id -> Ray's record of each ALIVE node (the state API)."""
        reply = self.get("/api/v0/nodes?limit=1000&detail=true")
        return {n["node_id"]: n for n in reply["data"]["result"]["result"] if n["state"] == "ALIVE"}

    # ------------------------------------------------------------------ nodes
    def add_node(self, name: str, *, num_cpus: int, resources: dict[str, float] | None = None,
                 timeout: float = 120) -> str:
        """Start node `name` (the first one is the head) and wait until Ray lists it ALIVE; its node id."""
        if name in self.nodes:
            raise SystemExit(f"node {name!r} is already running")
        # a node stopped a moment ago may still be listed ALIVE until Ray's health check notices
        known = set(self.alive_nodes()) if self.nodes else set()
        cmd = [str(VENV_BIN / "ray"), "start", "--block", "--disable-usage-stats", "--temp-dir", self.temp_dir,
               "--num-cpus", str(num_cpus), "--num-gpus", "0",
               # the agent's HTTP port is fixed (52365) by default: two nodes on one machine, or any other
               # Ray here, would collide and leave the node without a job agent ("No available agent")
               "--dashboard-agent-listen-port", str(free_port())]
        if not self.nodes:
            cmd += ["--head", "--port", str(self.port), "--dashboard-host", "127.0.0.1",
                    "--dashboard-port", str(self.dashboard_port), "--ray-client-server-port", str(free_port())]
        else:
            cmd += ["--address", self.address]
        if resources:
            cmd += ["--resources", json.dumps(resources)]
        log = (self.directory / "logs" / f"{name}.log").open("w")
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self._node_env(), start_new_session=True)
        self.nodes[name] = proc.pid
        self._save()
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"ray node {name} exited: {self.log(name)[-3000:]}")
            with contextlib.suppress(OSError, ValueError, KeyError):
                new = set(self.alive_nodes()) - known
                if new:
                    self.node_ids[name] = new.pop()
                    self._save()
                    return self.node_ids[name]
            if time.monotonic() > deadline:
                raise TimeoutError(f"ray node {name} did not come up: {self.log(name)[-3000:]}")
            time.sleep(0.5)

    def log(self, name: str) -> str:
        return (self.directory / "logs" / f"{name}.log").read_text()

    def _ours(self, pid: int) -> bool:
        """Whether pid is still the `ray start` of this cluster (not a reused pid)."""
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read().decode(errors="replace")
        except OSError:
            return _group_alive(pid)  # the leader is gone; its group may still hold Ray's processes
        return "ray" in cmdline and self.temp_dir in cmdline

    def stop_node(self, name: str, *, graceful: bool = True, timeout: float = 15) -> None:
        """Stop one node: SIGTERM to its process group (SIGKILL at once if not graceful, as a
        preempted machine vanishes), SIGKILL to whatever of it is left after `timeout`."""
        pgid = self.nodes.pop(name)
        self.node_ids.pop(name, None)
        self._save()
        if not self._ours(pgid):
            return
        for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0))[0 if graceful else 1:]:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, sig)
            deadline = time.monotonic() + wait
            while _group_alive(pgid) and time.monotonic() < deadline:
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(pgid, os.WNOHANG)  # reap it when it is our child (started in this process)
                time.sleep(0.1)
            if not _group_alive(pgid):
                return

    def stop(self, *, graceful: bool = True) -> None:
        """Stop every node (worker nodes first, the head last) and remove Ray's temp dir."""
        for name in [n for n in self.nodes if n != "head"] + ["head"] * ("head" in self.nodes):
            self.stop_node(name, graceful=graceful)
        shutil.rmtree(self.temp_dir, ignore_errors=True)
        (self.directory / STATE_FILE).unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="a Ray cluster of several nodes on this machine")
    parser.add_argument("--dir", type=Path, default=DEFAULT_DIR, help=f"state directory (default {DEFAULT_DIR})")
    sub = parser.add_subparsers(dest="command", required=True)
    start = sub.add_parser("start", help="start a head and --workers worker nodes")
    start.add_argument("--workers", type=int, default=1, help="worker nodes besides the head")
    start.add_argument("--cpus", type=int, default=1, help="CPUs each node offers")
    start.add_argument("--resources", default="{}", help="JSON custom resources of every node, e.g. '{\"slot\": 1}'")
    add = sub.add_parser("add-node", help="start one more worker node")
    add.add_argument("name")
    add.add_argument("--cpus", type=int, default=1)
    add.add_argument("--resources", default="{}")
    stop_node = sub.add_parser("stop-node", help="stop one node")
    stop_node.add_argument("name")
    stop_node.add_argument("--kill", action="store_true", help="SIGKILL at once (a preemption), not SIGTERM")
    stop = sub.add_parser("stop", help="stop every node this cluster started")
    stop.add_argument("--kill", action="store_true", help="SIGKILL at once instead of SIGTERM first")
    sub.add_parser("status", help="nodes, addresses and the client environment")
    args = parser.parse_args(argv)

    if args.command == "start":
        resources = json.loads(args.resources)
        cluster = LocalCluster.create(args.dir, num_cpus=args.cpus, resources=resources)
        try:
            for i in range(1, args.workers + 1):
                cluster.add_node(f"worker{i}", num_cpus=args.cpus, resources=resources)
        except BaseException:
            cluster.stop()
            raise
    else:
        cluster = LocalCluster.load(args.dir)
    if args.command == "add-node":
        cluster.add_node(args.name, num_cpus=args.cpus, resources=json.loads(args.resources))
    elif args.command == "stop-node":
        cluster.stop_node(args.name, graceful=not args.kill)
    elif args.command == "stop":
        cluster.stop(graceful=not args.kill)
        print(f"stopped: {args.dir}")
        return 0
    print(f"nodes (name: process group, Ray node id): "
          f"{ {name: (pid, cluster.node_ids.get(name)) for name, pid in cluster.nodes.items()} }")
    print(f"dashboard and job server: {cluster.dashboard}")
    print("client environment:\n" + "\n".join(f"  export {k}={v}" for k, v in cluster.env().items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
