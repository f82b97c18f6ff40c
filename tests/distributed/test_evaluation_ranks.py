"""Evaluation on 2 gloo ranks (spawned processes): test_loglik's AIS and its collectives between
rank-0-only metrics (the rest of evaluation: tests/unit/test_evaluation.py)."""

from __future__ import annotations

import multiprocessing as mp
import socket
from pathlib import Path
from typing import Any

import torch

from distributed_bism.evaluation.loglik import exact_log_likelihood
from distributed_bism.evaluation.metrics import run_metrics
from distributed_bism.models import BernoulliPosterior, GaussianRBM
from tests.helpers.local_runs import scratch_cwd  # noqa: F401 (scratch_cwd: an autouse fixture)
from tests.unit.test_evaluation import context


def _ais_rank(rank: int, port: int, path: str, queue: Any) -> None:
    """One of 2 gloo ranks: run test_loglik (AIS, collectives) then samples (rank 0 only) twice."""
    import torch.distributed as dist

    from distributed_bism.evaluation import loglik as lik
    from tests.helpers.local_runs import tiny as tiny_cfg

    lik.MAX_ENUMERABLE_H = 3  # this process only
    # one thread: AIS is thousands of tiny tensor ops, where 2 ranks × a thread pool each on 2 cores
    # spend their time handing work around (conftest.one_thread)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        torch.manual_seed(0)
        grbm = GaussianRBM(2, 4, init_std=0.5)
        cfg = tiny_cfg(Path(path), **{"eval.ais_chains": 300, "eval.ais_betas": 100,
                                      "eval.metrics": ["samples", "test_loglik"], "eval.num_samples": 8})
        test = torch.randn(64, 2, generator=torch.Generator().manual_seed(1))
        q = BernoulliPosterior(2, 4)
        out = [run_metrics(cfg.eval.metrics, context(cfg, grbm, q, test, Path(path), image_shape=(2,), rank=rank,
                                                     world_size=2)) for _ in range(2)]
        queue.put((rank, out, exact_log_likelihood(grbm, test)))
    finally:
        dist.destroy_process_group()


def test_ais_metric_runs_on_every_rank(tmp_path: Path) -> None:
    """On 2 gloo processes, test_loglik's AIS runs on both ranks (each its share of the chains,
    all-gathered) between rank-0-only metrics, without a hang: rank 0 gets the values, rank 1 none."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_ais_rank, args=(r, port, str(tmp_path), queue)) for r in range(2)]
    for p in procs:
        p.start()
    try:
        results = dict((r, (out, exact)) for r, out, exact in (queue.get(timeout=120) for _ in procs))
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    (out0, exact), (out1, _) = results[0], results[1]
    assert out1 == [{}, {}]
    for values in out0:
        assert abs(values["eval/test_loglik"] - exact) < 0.1
    assert (tmp_path / "samples" / "tiny" / "step_00000000.png").is_file()
