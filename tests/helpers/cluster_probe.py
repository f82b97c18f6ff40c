"""A training run whose workers say where they ran: the driver of the multi-node test, submitted
as a Ray job from the repo root (`python -m tests.helpers.cluster_probe CONFIG.yaml OUT_DIR`:
`-m` puts the working directory, the uploaded checkout, on sys.path, so `tests.helpers` imports).

It trains through the package's own path (`run_on_ray`, `worker_loop`, `TrainLoop.fit`: the loop,
its checkpoints and its resume), tracking off. Each worker writes OUT_DIR/start_rank{r}_{pid}.json
(its rank, node and world size) when it starts, and OUT_DIR/final_rank{r}.pt (node, step, θ and φ) when it is done.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import torch
from ray import cloudpickle

from distributed_bism.config import load_config
from distributed_bism.launch.preflight import preflight
from distributed_bism.launch.ray_backend import run_on_ray, worker_loop
from tests.helpers import dist_workers

cloudpickle.register_pickle_by_value(dist_workers)  # sent by value: workers need not import tests/


def probe_worker(conf: dict[str, Any]) -> None:
    import ray
    import ray.train

    out = Path(conf["out"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    node = ray.get_runtime_context().get_node_id()
    (out / f"start_rank{rank}_{os.getpid()}.json").write_text(json.dumps({"rank": rank, "node": node, "world": world}))
    loop = worker_loop(conf)
    loop.fit()
    torch.save({"rank": rank, "node": node, "world": world, "step": loop.step, "params": dist_workers.params_of(loop)},
               out / f"final_rank{rank}.pt")


def main(config: str, out: str) -> None:
    cfg, _ = preflight(load_config(config))
    Path(out).mkdir(parents=True, exist_ok=True)
    run_on_ray(cfg, probe_worker, {"config": cfg.to_dict(), "run_id": None, "tracking_uri": None, "out": out})
    print(f"probe done: {out}", flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:])
