"""The clusters' MLflow servers keep their store in PostgreSQL, not in sqlite on a node's disk.

Beside test_cluster_configs.py (the rest of cluster/'s schema checks):

* kuberay/mlflow.yaml: the server's store is MLFLOW_BACKEND_STORE_URI (not on its command line),
  a postgresql+psycopg:// URI whose host and port are a Service of the PostgreSQL StatefulSet
  declared beside it, whose user and database are the ones that StatefulSet creates, and whose
  password is the same Secret key the database is given; the database's data is on a volume claim
  of its own; the manifest says how to create that Secret.
* aws.yaml, gcp.yaml: the head's server gets its store from a file that `ray up` copies from the
  user's machine (file_mounts), as MLFLOW_BACKEND_STORE_URI; a command before it stops the set-up
  when the file holds no PostgreSQL URI (run here in bash, as the head would).
* The driver of those URIs (psycopg) is installed with the runtime extra the image and `make setup`
  install, and the URIs are ones MLflow and this package take for PostgreSQL.
"""

from __future__ import annotations

import re
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
MANIFEST = REPO / "cluster" / "kuberay" / "mlflow.yaml"
RAY_UP = [REPO / "cluster" / "aws.yaml", REPO / "cluster" / "gcp.yaml"]
STORE_ENV = "MLFLOW_BACKEND_STORE_URI"  # mlflow server's --backend-store-uri (its click envvar)


def check_store_uri(uri: str) -> None:
    """A PostgreSQL URI that names psycopg (3) as its driver, which is installed, and that MLflow and
    this package's checks read as PostgreSQL."""
    from sqlalchemy.engine import make_url

    from distributed_bism.tracking import uri_scheme

    url = make_url(uri)
    assert (url.get_backend_name(), url.get_driver_name()) == ("postgresql", "psycopg"), uri
    url.get_dialect().import_dbapi()  # psycopg is installed
    assert uri_scheme(uri) == "postgresql"


def test_the_driver_is_a_runtime_dependency() -> None:
    """The image installs `.[dist]` and `make setup` `.[dist,dev]`: psycopg must be in dist."""
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert any(re.match(r"psycopg\[binary\]==", dep) for dep in extras["dist"]), extras["dist"]


# --------------------------------------------------------------------------- KubeRay
def manifest(kind: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(MANIFEST.read_text()) if d and d["kind"] == kind]


def env_of(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container.get("env", [])}


def secret_ref(entry: dict[str, Any]) -> tuple[str, str]:
    ref = entry["valueFrom"]["secretKeyRef"]
    return ref["name"], ref["key"]


def test_kuberay_mlflow_store_is_the_postgresql_beside_it() -> None:
    ((server,),) = [d["spec"]["template"]["spec"]["containers"] for d in manifest("Deployment")]
    argv = server["command"] + server.get("args", [])
    assert "--backend-store-uri" not in argv, "the store URI (with its password) on the command line"
    env = env_of(server)
    uri = env[STORE_ENV]["value"]
    m = re.fullmatch(r"postgresql\+psycopg://(\w+):\$\((\w+)\)@([\w-]+):(\d+)/(\w+)", uri)
    assert m, uri
    user, password_var, host, port, database = m.groups()
    assert list(env).index(password_var) < list(env).index(STORE_ENV), "Kubernetes fills $(VAR) from earlier vars only"
    check_store_uri(uri.replace(f"$({password_var})", "secret"))

    (service,) = [s for s in manifest("Service") if s["metadata"]["name"] == host]
    (service_port,) = [p for p in service["spec"]["ports"] if p["port"] == int(port)]
    (database_set,) = [
        s for s in manifest("StatefulSet") if s["spec"]["template"]["metadata"]["labels"] == service["spec"]["selector"]
    ]
    (postgres,) = database_set["spec"]["template"]["spec"]["containers"]
    assert re.fullmatch(r"postgres:\d+(\.\d+)?", postgres["image"]), postgres["image"]
    assert service_port["targetPort"] in [p["containerPort"] for p in postgres["ports"]]
    db_env = env_of(postgres)
    assert (db_env["POSTGRES_USER"]["value"], db_env["POSTGRES_DB"]["value"]) == (user, database)
    secret = secret_ref(env[password_var])
    assert secret_ref(db_env["POSTGRES_PASSWORD"]) == secret
    # the data on a claim of its own, where postgres:18 keeps it (/var/lib/postgresql/18/docker)
    (claim,) = database_set["spec"]["volumeClaimTemplates"]
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
    (mount,) = postgres["volumeMounts"]
    assert (mount["name"], mount["mountPath"]) == (claim["metadata"]["name"], "/var/lib/postgresql")
    # the Secret is not in the repo (no password is): the manifest says how to make it
    assert f"kubectl create secret generic {secret[0]} --from-literal={secret[1]}=" in MANIFEST.read_text()
    assert not manifest("Secret")


# --------------------------------------------------------------------------- ray up
def head_commands(path: Path) -> tuple[list[str], dict[str, str]]:
    config = yaml.safe_load(path.read_text())
    return config["head_start_ray_commands"], config["file_mounts"]


@pytest.mark.parametrize("path", RAY_UP, ids=lambda p: p.name)
def test_ray_up_head_server_reads_its_postgresql_uri_from_a_mounted_file(path: Path, tmp_path: Path) -> None:
    commands, mounts = head_commands(path)
    (i,) = [i for i, c in enumerate(commands) if "/mlflow server " in c]
    server = commands[i]
    assert "--backend-store-uri" not in server, "the store URI (with its password) on the command line"
    m = re.match(rf'{STORE_ENV}="\$\(cat (~/[\w./-]+)\)" nohup ', server)
    assert m, server
    uri_file = m.group(1)
    assert mounts.get(uri_file) == uri_file, f"{uri_file} is not copied from this machine by file_mounts"

    # the command before the server stops the head's set-up unless that file holds a PostgreSQL URI
    guard = commands[i - 1]
    assert uri_file in guard
    home = tmp_path / "home"
    target = home / uri_file.removeprefix("~/")
    target.parent.mkdir(parents=True)

    def run_guard() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["bash", "-c", guard], env={"HOME": str(home), "PATH": "/usr/bin:/bin"}, capture_output=True, text=True
        )

    missing = run_guard()
    assert missing.returncode != 0 and "PostgreSQL URI" in missing.stderr, missing
    target.write_text("sqlite:////home/ubuntu/mlflow.db\n")
    assert run_guard().returncode != 0
    good = "postgresql+psycopg://mlflow:secret@bism-db.example.internal:5432/mlflow"
    target.write_text(good + "\n")
    assert run_guard().returncode == 0
    # what the head's shell hands the server: the file's URI, a psycopg one
    shown = subprocess.run(
        ["bash", "-c", f'{STORE_ENV}="$(cat {uri_file})" printenv {STORE_ENV}'],
        env={"HOME": str(home), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
    )
    assert shown.stdout.strip() == good
    check_store_uri(good)
    assert re.search(r"postgresql\+psycopg://", path.read_text()), "the config does not say which URI to write"
