"""`ray job submit` for real, on a two-node Ray cluster on this machine (loopback only).

`cluster/local_cluster.py start` brings up a head and a worker node (2 CPUs each) once for the
module, each node a `ray start --block` process group with its own temp dir, ports and auth token;
each node has one unit of the custom resource `bism_slot`, so two workers that each ask for one
land on different nodes. `local_cluster.py stop` ends exactly those process groups (never `ray
stop`), and the fixture checks that none of them is left.

  * `bism train` submitted with --working-dir . and cluster/runtime_env.yaml: SUCCEEDED, its
    logs show training, the MLflow run is FINISHED, and the upload left .venv and outputs behind;
  * `bism tune` submitted as a job completes its trials;
  * two workers, one per node, on a shared storage_path: both nodes write into the same
    checkpoint directories (DeepSpeed ZeRO-1: rank 1 writes its optimiser shard); the worker node
    is SIGKILLed mid-run and a replacement node joins (what a cluster autoscaler does after a
    preemption): Ray restarts the worker group, it resumes from the last checkpoint, and the
    parameters end identical on both workers.
Bad addresses and storage paths on the job/cluster paths, which need no cluster, are in
tests/unit/test_cluster_bad_input.py.
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from tests.distributed.test_tune import TINY
from tests.helpers.ray_nodes import REPO, RayCluster
from tests.unit.test_bad_input import no_ray  # noqa: F401  (no_ray: autouse, nothing here may call ray.init)

RUNTIME_ENV = REPO / "cluster" / "runtime_env.yaml"
PROBE_STEPS, PROBE_EVERY = 600, 100


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory):
    c = RayCluster(tmp_path_factory.mktemp("cluster"), workers=1, num_cpus=2, resources={"bism_slot": 1})
    try:
        yield c
    finally:
        left = c.stop()
        assert not left, f"local_cluster.py stop left process groups {left} running"


def write_yaml(path: Path, data: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def submit(cluster: RayCluster, job_id: str, *entrypoint: str) -> None:
    """`ray job submit --no-wait` from the repo root, with the working dir and cluster/runtime_env.yaml."""
    cluster.submit(job_id, list(entrypoint), ["--runtime-env", str(RUNTIME_ENV), "--working-dir", "."])


def run_job(cluster: RayCluster, job_id: str, *entrypoint: str, timeout: float = 300) -> str:
    """Submit, wait for the end, assert SUCCEEDED; the job's logs."""
    submit(cluster, job_id, *entrypoint)
    status = cluster.wait_for_job(job_id, timeout)
    logs = cluster.logs(job_id)
    assert status == "SUCCEEDED", f"{status}: {cluster.job(job_id).get('message')}\n{logs[-4000:]}"
    return logs


def mlflow_runs(output_dir: Path) -> list[Any]:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{output_dir / 'mlflow.db'}")
    return client.search_runs([client.get_experiment_by_name("distributed_bism").experiment_id])


@pytest.mark.slow
def test_train_job(cluster: RayCluster, tmp_path: Path) -> None:
    out = tmp_path / "out"
    cfg = copy.deepcopy(TINY)
    cfg["trainer"].update(
        {
            "name": "job",
            "num_workers": 2,
            "placement_strategy": "SPREAD",
            "steps": 20,
            "checkpoint_every": 10,
            "output_dir": str(out),
        }
    )
    cfg["eval"]["every"] = 20
    logs = run_job(cluster, "train-job", "bism", "train", str(write_yaml(tmp_path / "tiny.yaml", cfg)))
    assert "step 20/20" in logs and "done: run 'job' at step 20" in logs, logs[-3000:]
    (run,) = mlflow_runs(out)
    assert run.info.status == "FINISHED" and "train/loss" in run.data.metrics
    assert run.data.tags["checkpoint_path"].endswith("checkpoint_00000020")
    assert (out / "ray_results" / "job" / "checkpoint_00000020" / "state.pt").is_file()

    # The uploaded package: the code, not .venv, outputs or .git (gitignore and Ray's own excludes).
    pkgs = list(Path(cluster.temp_dir, "session_latest", "runtime_resources", "working_dir_files").glob("_ray_pkg_*"))
    assert any(
        (p / "distributed_bism" / "launch" / "ray_backend.py").is_file() and (p / "cluster" / "README.md").is_file()
        for p in pkgs
    )
    for pkg in pkgs:
        assert not [p for p in (".venv", "outputs", ".git", "bench/results") if (pkg / p).exists()], pkg
        size = sum(p.stat().st_size for p in pkg.rglob("*") if p.is_file())
        assert size < 20e6, f"the working_dir upload is {size / 1e6:.1f} MB"


@pytest.mark.slow
def test_tune_job(cluster: RayCluster, tmp_path: Path) -> None:
    base = write_yaml(
        tmp_path / "tiny.yaml", {**TINY, "trainer": {**TINY["trainer"], "steps": 10, "checkpoint_every": 10}}
    )
    spec = write_yaml(
        tmp_path / "sweep.yaml",
        {
            "base": str(base),
            "search": {"optim.lr": {"grid": [3e-2, 1e-2]}},
            "metric": "eval/test_loglik",
            "mode": "max",
            "scheduler": {"name": "fifo"},
            "searcher": {"name": "random"},
            "num_samples": 1,
            "max_concurrent_trials": 2,
            "resources": {"workers_per_trial": 1, "gpus_per_worker": 0},
        },
    )
    out = tmp_path / "out"
    run_job(cluster, "tune-job", "bism", "tune", str(spec), "--name", "jt", "--output-dir", str(out))
    rows = json.loads((out / "sweeps" / "jt" / "results.json").read_text())
    assert sorted(r["optim.lr"] for r in rows) == [1e-2, 3e-2] and {r["status"] for r in rows} == {"done"}, rows
    runs = mlflow_runs(out)
    assert len(runs) == 3 and all(r.info.status == "FINISHED" for r in runs), [r.info.status for r in runs]


def probe_config(tmp_path: Path, name: str, shared: Path) -> Path:
    cfg = copy.deepcopy(TINY)
    cfg["objective"]["unroll_steps"] = 1
    cfg["trainer"].update(
        {
            "name": name,
            "strategy": "deepspeed",
            "zero_stage": 1,
            "num_workers": 2,
            "resources_per_worker": {"bism_slot": 1},
            "steps": PROBE_STEPS,
            "checkpoint_every": PROBE_EVERY,
            "log_every": PROBE_EVERY,
            "max_failures": 2,
            "output_dir": str(tmp_path / "out"),
            "storage_path": str(shared),
        }
    )
    cfg["tracking"] = {"enabled": False}
    cfg["eval"]["every"] = PROBE_STEPS
    return write_yaml(tmp_path / f"{name}.yaml", cfg)


def started(out: Path) -> list[dict[str, Any]]:
    """One record per worker start (a restarted group adds two), in the order they started."""
    files = sorted(out.glob("start_rank*.json"), key=lambda p: p.stat().st_mtime_ns)
    return [json.loads(p.read_text()) for p in files]


@pytest.mark.slow
def test_two_nodes_one_worker_each_survive_losing_a_node(cluster: RayCluster, tmp_path: Path) -> None:
    shared, out = tmp_path / "shared", tmp_path / "probe"  # shared: both nodes' storage_path, as NFS would be
    submit(
        cluster,
        "probe",
        "python",
        "-m",
        "tests.helpers.cluster_probe",
        str(probe_config(tmp_path, "probe", shared)),
        str(out),
    )
    first = shared / "probe" / f"checkpoint_{PROBE_EVERY:08d}"
    deadline = time.monotonic() + 240
    while not all((first / f).exists() for f in ("state.pt", "optim_rank0.pt", "optim_rank1.pt")):
        assert time.monotonic() < deadline, "no checkpoint appeared: " + cluster.logs("probe")[-3000:]
        time.sleep(0.1)
    # ZeRO-1: rank 0 writes state.pt and its optimiser shard, rank 1 its own shard, into one checkpoint
    # directory of the shared storage_path; one worker runs on the head, the other on the worker node
    before = {s["rank"]: s["node"] for s in started(out)}
    assert len(before) == 2 and set(before.values()) == {cluster.node_ids["head"], cluster.node_ids["worker1"]}, (
        before,
        cluster.node_ids,
    )

    # The worker node vanishes mid-run, as a preempted spot VM would; a replacement joins, as the
    # autoscaler would start one. Without it the restarted group would wait for a bism_slot.
    cluster.kill_node("worker1")
    cluster.add_node("worker1", num_cpus=2, resources={"bism_slot": 1})
    status, logs = cluster.wait_for_job("probe", timeout=300), cluster.logs("probe")
    assert status == "SUCCEEDED", logs[-4000:]
    assert len(started(out)) >= 4, f"the worker group was not restarted: {started(out)}"
    assert f"resumed from {shared / 'probe'}/checkpoint_" in logs, "the restarted workers did not load a checkpoint"
    ranks = [torch.load(out / f"final_rank{r}.pt", weights_only=True) for r in range(2)]
    assert {r["node"] for r in ranks} == {cluster.node_ids["head"], cluster.node_ids["worker1"]}, (
        ranks,
        cluster.node_ids,
    )
    assert cluster.node_ids["worker1"] not in before.values()  # the replacement node ran a worker after the kill
    assert ranks[0]["step"] == ranks[1]["step"] == PROBE_STEPS
    for n, p in ranks[0]["params"].items():
        assert torch.equal(p, ranks[1]["params"][n]), f"{n} differs between the workers on the two nodes"
    last = shared / "probe" / f"checkpoint_{PROBE_STEPS:08d}"
    assert {p.name for p in last.iterdir()} >= {"state.pt", "optim_rank0.pt", "optim_rank1.pt"}
