"""`ray job submit` for real, on a two-node Ray cluster on this machine (loopback only).

`cluster/local_cluster.py start` brings up a head and a worker node (2 CPUs each) once for the
module, each node a `ray start --block` process group with its own temp dir, ports and auth token;
each node has one unit of the custom resource `bism_slot`, so two workers that each ask for one
land on different nodes. `local_cluster.py stop` ends exactly those process groups (never `ray
stop`), and the fixture checks that none of them is left.

  * `bism train` submitted with --working-dir . and cluster/runtime_env.yaml: SUCCEEDED, its
    logs show training, the MLflow run is FINISHED, and the upload left .venv and outputs behind;
  * `bism tune` submitted as a job completes its trials;
  * two workers, one per node, on a shared storage_path: rank 0 writes each checkpoint with the
    DeepSpeed ZeRO-1 optimiser gathered whole from both nodes' partitions; the worker node
    is SIGKILLed mid-run and a replacement node joins (what a cluster autoscaler does after a
    preemption): Ray restarts the worker group, it resumes from the last checkpoint, and the
    parameters end identical on both workers;
  * an elastic run (trainer.num_workers: [1, 2]) loses the worker node, goes on with one worker
    from the last checkpoint, and grows back to two when the node returns.
Bad addresses and storage paths on the job/cluster paths, which need no cluster, are in
tests/unit/test_cluster_bad_input.py.
"""

from __future__ import annotations

import copy
import json
import math
import re
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from distributed_bism.training.checkpointing import CheckpointError, load_state
from distributed_bism.training.zero_state import is_full_state
from tests.distributed.test_tune import TINY
from tests.helpers.ray_nodes import REPO, RayCluster
from tests.unit.test_bad_input import no_ray  # noqa: F401  (no_ray: autouse, nothing here may call ray.init)

RUNTIME_ENV = REPO / "cluster" / "runtime_env.yaml"
PROBE_STEPS, PROBE_EVERY = 600, 100


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
    while not (first / "state.pt").exists():
        assert time.monotonic() < deadline, "no checkpoint appeared: " + cluster.logs("probe")[-3000:]
        time.sleep(0.1)
    # one worker runs on the head, the other on the worker node
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
    last = load_state(shared / "probe" / f"checkpoint_{PROBE_STEPS:08d}")
    assert is_full_state(last["energy_optimizer"]), "ZeRO-1's optimiser is saved whole, both nodes' partitions"


ELASTIC_STEPS, ELASTIC_EVERY = 3000, 50


def wait_until(what: str, done: Any, cluster: RayCluster, timeout: float = 300) -> None:
    """Poll done() every 0.1 s; fail naming `what`, with the job's logs, after `timeout` s."""
    deadline = time.monotonic() + timeout
    while not done():
        assert cluster.job("elastic")["status"] in ("PENDING", "RUNNING"), cluster.logs("elastic")[-4000:]
        assert time.monotonic() < deadline, f"{what} did not happen: " + cluster.logs("elastic")[-4000:]
        time.sleep(0.1)


def checkpoint_worlds(run: Path, seen: dict[Path, int]) -> dict[int, int]:
    """step → the number of workers that wrote its checkpoint, of every readable checkpoint of `run`
    (`seen`: those read before, each read once)."""
    for d in run.glob("checkpoint_*"):
        if d not in seen and d.name[len("checkpoint_") :].isdigit():
            try:
                seen[d] = load_state(d)["world_size"]
            except CheckpointError:  # one being written
                continue
    return {int(d.name[len("checkpoint_") :]): w for d, w in seen.items() if d.is_dir()}


@pytest.mark.slow
@pytest.mark.soak
def test_an_elastic_run_shrinks_to_one_node_and_grows_back(cluster: RayCluster, tmp_path: Path) -> None:
    """trainer.num_workers: [1, 2] on two nodes: the worker node is SIGKILLed mid-run, the run goes
    on with one worker from the last checkpoint; the node comes back, and the run grows back to two
    workers from the newest checkpoint (Ray looks for room every elastic_resize_interval_s)."""
    shared, out = tmp_path / "shared", tmp_path / "elastic"
    config = yaml.safe_load(probe_config(tmp_path, "elastic", shared).read_text())
    config["trainer"].update(
        num_workers=[1, 2],
        global_batch_size=32,
        steps=ELASTIC_STEPS,
        checkpoint_every=ELASTIC_EVERY,
        log_every=ELASTIC_EVERY,
        num_to_keep=ELASTIC_STEPS // ELASTIC_EVERY,  # keep them all: the test reads who wrote each
        elastic_resize_interval_s=2.0,
        max_failures=3,
    )
    config["eval"]["every"] = ELASTIC_STEPS
    path = write_yaml(tmp_path / "elastic.yaml", config)
    submit(cluster, "elastic", "python", "-m", "tests.helpers.cluster_probe", str(path), str(out))
    run, seen = shared / "elastic", {}
    wait_until("a checkpoint of 2 workers", lambda: 2 in checkpoint_worlds(run, seen).values(), cluster)

    cluster.kill_node("worker1")
    killed, shrunk = time.monotonic(), checkpoint_worlds(run, seen)
    wait_until(
        "a checkpoint of 1 worker after the node was lost",
        lambda: any(w == 1 and s > max(shrunk) for s, w in checkpoint_worlds(run, seen).items()),
        cluster,
    )
    one = time.monotonic()
    cluster.add_node("worker1", num_cpus=2, resources={"bism_slot": 1})
    added, grown = time.monotonic(), checkpoint_worlds(run, seen)
    wait_until(
        "a checkpoint of 2 workers after the node came back",
        lambda: any(w == 2 and s > max(grown) for s, w in checkpoint_worlds(run, seen).items()),
        cluster,
        timeout=600,
    )
    two = time.monotonic()
    status, logs = cluster.wait_for_job("elastic", timeout=600), cluster.logs("elastic")
    assert status == "SUCCEEDED", logs[-4000:]
    # what cluster/README.md "Elastic runs" quotes (not asserted: it is the machine's speed)
    print(
        f"elastic: last 2-worker checkpoint at kill: step {max(shrunk)}; first 1-worker checkpoint "
        f"{one - killed:.0f} s after the kill; node added {added - killed:.0f} s after the kill; first "
        f"2-worker checkpoint again {two - added:.0f} s after the node came back"
    )

    worlds = checkpoint_worlds(run, seen)
    steps = sorted(worlds)
    # 2 workers, then 1 from the last checkpoint, then 2 again to the end (each phase 1+ checkpoints)
    phases = [worlds[s] for i, s in enumerate(steps) if i == 0 or worlds[s] != worlds[steps[i - 1]]]
    assert phases == [2, 1, 2], worlds
    assert steps[-1] == ELASTIC_STEPS and worlds[steps[-1]] == 2
    starts = [s["world"] for s in started(out)]
    assert 1 in starts and starts[-1] == 2, starts
    assert "workers 1-2 (elastic)" in logs and "global batch 32" in logs
    resumed = [int(m) for m in re.findall(r"resumed from \S+ at step (\d+)", logs)]
    assert len(resumed) >= 2 and resumed == sorted(resumed), resumed  # shrink, then grow, each from a newer one
    losses = [float(x) for x in re.findall(r"step \d+/\d+  loss (\S+)", logs)]
    assert losses and all(math.isfinite(x) for x in losses), losses[-10:]
    ranks = [torch.load(out / f"final_rank{r}.pt", weights_only=True) for r in range(2)]
    assert [r["world"] for r in ranks] == [2, 2] and ranks[0]["step"] == ranks[1]["step"] == ELASTIC_STEPS
    for n, p in ranks[0]["params"].items():
        assert torch.isfinite(p).all(), n
        assert torch.equal(p, ranks[1]["params"][n]), f"{n} differs between the workers on the two nodes"
