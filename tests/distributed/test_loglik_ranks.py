"""The cross-rank reduction of AIS chains on 2 gloo processes (forked): every rank reports the
single-process answer (the rest of the log-likelihood: tests/unit/test_loglik.py)."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from distributed_bism.evaluation.loglik import (
    LogZEstimate,
    ais_log_partition,
    ais_log_weights,
    base_log_partition,
    chain_share,
    linear_betas,
    reverse_ais_log_partition,
)
from distributed_bism.models import GaussianRBM

pytestmark = pytest.mark.usefixtures("float64", "one_thread")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_default_dtype(torch.float64)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        grbm = GaussianRBM(6, 4, init_std=0.5)
        grbm.load_state_dict(torch.load(out + ".model"))
        fwd = ais_log_partition(grbm, num_chains=301, num_betas=20, seed=5)
        rev = reverse_ais_log_partition(grbm, num_chains=301, num_betas=20, seed=5)
        torch.save({"fwd": fwd, "rev": rev}, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_two_ranks_reduce_to_the_single_process_answer(tmp_path):
    """2 gloo processes, 301 chains (151 + 150, seeds 5 and 6): every rank reports the estimate that
    one process computes from the same chains' log-weights concatenated."""
    torch.manual_seed(3)
    grbm = GaussianRBM(6, 4, init_std=0.5)
    out = str(tmp_path / "est")
    torch.save(grbm.state_dict(), out + ".model")
    # fork, not spawn: the children need not import torch again (spawn took ~15 s on a busy machine)
    mp.start_processes(_rank_worker, args=(2, _free_port(), out), nprocs=2, join=True, start_method="fork")
    got = [torch.load(f"{out}.{r}", weights_only=False) for r in range(2)]

    betas = linear_betas(20)
    log_w = torch.cat([ais_log_weights(grbm, betas, chain_share(301, r, 2), torch.Generator().manual_seed(5 + r))
                       for r in range(2)])
    expected = LogZEstimate.from_log_weights(log_w, base_log_partition(grbm), num_betas=20, side="lower")
    for g in got:
        assert g["fwd"] == expected and g["rev"] == got[0]["rev"]
    assert got[0]["rev"].num_chains == 301
    # The pooled estimate differs from either rank's own chains alone (the reduction happened).
    alone = LogZEstimate.from_log_weights(log_w[:151], base_log_partition(grbm), num_betas=20, side="lower")
    assert alone.log_z != expected.log_z
