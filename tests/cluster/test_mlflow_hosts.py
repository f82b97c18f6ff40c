"""The MLflow servers of cluster/ answer the hosts that log to them.

`mlflow server` (>= 3.5) answers 403 to a request whose Host header is outside its allowed list,
and by default that list is localhost and private IPs: `Host: bism-mlflow:5000`, which every Ray
pod of the KubeRay manifests sends, is refused. Each server here runs on a free loopback port with
its store in tmp_path, and the requests carry the Host header the clients would send:

  * the Deployment of cluster/kuberay/mlflow.yaml, started with its own command line and env (only
    the bind address, the port and the store paths replaced): 200 for `bism-mlflow:5000` and its
    cluster-local name, 200 for 127.0.0.1/localhost (a port-forward), 403 for a foreign host;
  * the same command with its allowed hosts taken out: 403 for `bism-mlflow:5000`, so the setting
    is what lets the pods in;
  * the `ray up` configs' server on the head, with their `--allowed-hosts` as the head's shell
    expands it (here, on this machine): 200 for the head's address and host name, which the
    default list refuses for a host name.

Each server is its own process group (the server, uvicorn), stopped by that group's id
(tests/helpers/mlflow_server.py). The store is always a sqlite file of the test's: what is checked
here is the Host check, not the PostgreSQL store the manifests configure
(tests/distributed/test_tracking_concurrency.py runs a server on PostgreSQL).
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from tests.helpers.mlflow_server import MlflowServer, without_option

REPO = Path(__file__).resolve().parents[2]
MANIFEST = REPO / "cluster" / "kuberay" / "mlflow.yaml"
RAY_UP = [REPO / "cluster" / "aws.yaml", REPO / "cluster" / "gcp.yaml"]
RAY_CLUSTER = REPO / "cluster" / "kuberay" / "raycluster.yaml"
API = "/api/2.0/mlflow/experiments/search?max_results=1"  # /health and /version skip the host check


def pods_host() -> str:
    """The Host header the Ray pods send: that of their MLFLOW_TRACKING_URI (bism-mlflow:5000;
    test_cluster_configs checks that every Ray pod has the same URI)."""
    (cluster,) = [d for d in yaml.safe_load_all(RAY_CLUSTER.read_text()) if d and d["kind"] == "RayCluster"]
    env = {e["name"]: e["value"] for e in cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["env"]}
    return urlsplit(env["MLFLOW_TRACKING_URI"]).netloc


PODS_HOST = pods_host()


def manifest_container() -> dict[str, Any]:
    (deployment,) = [d for d in yaml.safe_load_all(MANIFEST.read_text()) if d and d["kind"] == "Deployment"]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return container


def option(argv: list[str], name: str) -> str | None:
    return argv[argv.index(name) + 1] if name in argv else None


def ray_up_allowed_hosts(path: Path) -> str:
    """The head's `mlflow server --allowed-hosts "..."` argument, expanded by bash as on the head."""
    (command,) = [c for c in yaml.safe_load(path.read_text())["head_start_ray_commands"] if "/mlflow server " in c]
    match = re.search(r' --allowed-hosts ("[^"]*")', command)
    assert match, f"{path.name}: the head's mlflow server has no --allowed-hosts"
    return subprocess.run(
        ["bash", "-c", f"printf %s {match.group(1)}"], capture_output=True, text=True, check=True
    ).stdout


class Server(MlflowServer):
    def status(self, host: str, path: str = API) -> int:
        """The HTTP status of GET PATH (default: an API call, which checks the host) with `Host: HOST`."""
        return super().status(host, path)


def manifest_env(container: dict[str, Any]) -> dict[str, str]:
    """The container's env vars with a value; those from a Secret (valueFrom: the store's password)
    and those built from them (the store URI, which MlflowServer's --backend-store-uri overrides)
    are left out."""
    given = [e for e in container.get("env", []) if "value" in e]
    secret = {e["name"] for e in container.get("env", []) if "valueFrom" in e}
    return {e["name"]: e["value"] for e in given if not any(f"$({name})" in e["value"] for name in secret)}


def manifest_server_env() -> tuple[list[str], dict[str, str]]:
    """The Deployment's `mlflow server` arguments (after `mlflow`) and its env over this one's;
    MLFLOW_SERVER_ALLOWED_HOSTS only if the manifest sets it."""
    container = manifest_container()
    assert container["command"][:2] == ["mlflow", "server"], container["command"]
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_SERVER_ALLOWED_HOSTS"}
    env |= manifest_env(container)
    return container["command"][1:] + container.get("args", []), env


def not_set(argv: list[str], env: dict[str, str]) -> tuple[list[str], dict[str, str]]:
    """The same server without its allowed hosts (flag and env var)."""
    return without_option(argv, "--allowed-hosts"), {k: v for k, v in env.items() if k != "MLFLOW_SERVER_ALLOWED_HOSTS"}


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Server]]:
    """Two servers: as the manifest configures it, and the same without its allowed hosts."""
    argv, env = manifest_server_env()
    tmp = tmp_path_factory.mktemp("mlflow")
    started: dict[str, Server] = {}
    try:
        started["manifest"] = Server(argv, env, tmp / "manifest")
        started["manifest"].wait_ready()  # its store migrated: the others start from copies
        started["default"] = Server(*not_set(argv, env), tmp / "default", started["manifest"].db)
        started["default"].wait_ready()
        yield started
    finally:
        for server in started.values():
            server.stop()


@pytest.fixture(scope="module")
def ray_up_server(servers: dict[str, Server], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A server with the `ray up` heads' --allowed-hosts (aws.yaml and gcp.yaml give the same)."""
    hosts = {p.name: ray_up_allowed_hosts(p) for p in RAY_UP}
    assert len(set(hosts.values())) == 1, f"the ray up configs allow different hosts: {hosts}"
    argv, env = not_set(*manifest_server_env())
    server = Server(
        [*argv, "--allowed-hosts", hosts["aws.yaml"]],
        env,
        tmp_path_factory.mktemp("ray_up") / "head",
        servers["manifest"].db,
    )
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


def test_manifest_sets_allowed_hosts() -> None:
    container = manifest_container()
    argv = container["command"] + container.get("args", [])
    env = manifest_env(container)
    hosts = option(argv, "--allowed-hosts") or env.get("MLFLOW_SERVER_ALLOWED_HOSTS")
    assert hosts, "cluster/kuberay/mlflow.yaml: no --allowed-hosts / MLFLOW_SERVER_ALLOWED_HOSTS"
    assert "*" not in hosts.split(","), "every host allowed: open to DNS rebinding"


def test_the_pods_host_is_answered(servers: dict[str, Server]) -> None:
    manifest = servers["manifest"]
    service = (PODS_HOST, "bism-mlflow.default.svc.cluster.local:5000")  # the Service, short and full name
    port_forward = ("127.0.0.1:5000", "localhost:5000", "localhost:15000")  # kubectl port-forward, any local port
    for host in service + port_forward:
        assert manifest.status(host) == 200, host
    assert manifest.status("attacker.example:5000") == 403  # still a list, not every host


def test_without_the_setting_the_pods_are_refused(servers: dict[str, Server]) -> None:
    default = servers["default"]
    assert default.status(PODS_HOST) == 403
    assert default.status("127.0.0.1:5000") == 200  # what a port-forward sends: why this went unseen


def test_ray_up_heads_answer_their_address_and_name(ray_up_server: Server, servers: dict[str, Server]) -> None:
    address = subprocess.run(
        ["bash", "-c", "hostname -I | cut -d' ' -f1"], capture_output=True, text=True, check=True
    ).stdout.strip()
    name = socket.gethostname()
    for host in (f"{address}:5000", f"{name}:5000", "127.0.0.1:5000", "localhost:5000"):
        assert ray_up_server.status(host) == 200, host
    assert ray_up_server.status("attacker.example:5000") == 403
    assert servers["default"].status(f"{name}:5000") == 403  # a host name is outside the default list
