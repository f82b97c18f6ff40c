"""distributed_bism.distributed: each collective in one process (world size 1: its input back, no
group needed) and on 2 gloo processes (every rank gets the same, correct answer), with the feature
sums that evaluation reduces (evaluation/feature_stats.py)."""

from __future__ import annotations

import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from distributed_bism.distributed import (
    all_ranks_agree,
    broadcast_object,
    collective_device,
    from_rank0,
    gather_objects,
    gather_rows,
    mean_over_ranks,
    rank_and_world,
    share,
    sum_over_ranks,
)


def test_one_process_is_world_size_one_and_returns_its_input():
    assert not dist.is_initialized()
    rows = torch.arange(6.0).view(3, 2)
    assert rank_and_world() == (0, 1)
    assert gather_objects({"a": 1}) == [{"a": 1}]
    assert broadcast_object("x") == "x"
    assert mean_over_ranks(2.5) == 2.5
    assert all_ranks_agree(True) is True and all_ranks_agree(False) is False
    assert gather_rows(rows) is rows
    assert sum_over_ranks(rows) is rows and from_rank0(lambda: "made", "x") == "made"
    assert [share(5, r, 1) for r in range(1)] == [(0, 5)]


def _rank(rank: int, port: int, path: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        rows = torch.full((3 - rank, 2), float(rank))  # unequal shares: 3 rows on rank 0, 2 on rank 1
        torch.save({"world": rank_and_world(), "device": str(collective_device()),
                    "objects": gather_objects({"rank": rank}), "broadcast": broadcast_object(f"from {rank}"),
                    "mean": mean_over_ranks(1.0 + rank), "agree": all_ranks_agree(True),
                    "veto": all_ranks_agree(rank != 1), "rows": gather_rows(rows)}, f"{path}.{rank}")
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_get_the_same_answers(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    path = str(tmp_path / "out")
    # fork, not spawn: the children need not import torch again
    mp.start_processes(_rank, args=(port, path), nprocs=2, join=True, start_method="fork")
    for r in range(2):
        got = torch.load(f"{path}.{r}", weights_only=False)
        assert got["world"] == (r, 2) and got["device"] == "cpu"
        assert got["objects"] == [{"rank": 0}, {"rank": 1}]
        assert got["broadcast"] == "from 0"
        assert got["mean"] == 1.5
        assert got["agree"] is True and got["veto"] is False  # rank 1's False vetoes on both ranks
        assert torch.equal(got["rows"], torch.tensor([[0.0, 0.0]] * 3 + [[1.0, 1.0]] * 2))


def _reducing_rank(rank: int, port: int, path: str) -> None:
    """sum_over_ranks, from_rank0 (a value, and a failure on rank 0) and FeatureStats.reduced of
    uneven shares of one set of rows (rank 0: rows 0..6, rank 1: rows 7..11)."""
    from distributed_bism.evaluation.feature_stats import FeatureStats

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        rows = torch.randn(12, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        mine = rows[:7] if rank == 0 else rows[7:]
        local = torch.full((2, 2), float(rank + 1))
        summed = sum_over_ranks(local)
        stats = FeatureStats.of(mine).reduced()

        def fail() -> int:
            raise ValueError("no classifier here")

        try:
            from_rank0(fail, "the classifier")
            failure = None
        except Exception as e:  # what each rank raised, for the test to compare
            failure = (type(e).__name__, str(e))
        torch.save({"sum": summed, "local": local, "value": from_rank0(lambda: {"made by": rank}, "a dict"),
                    "failure": failure, "count": stats.count, "mean": stats.mean, "cov": stats.cov}, f"{path}.{rank}")
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_reduce_sums_and_share_rank_0s_result(tmp_path):
    """Both ranks get the elementwise sum (their own tensor untouched), rank 0's value from
    from_rank0, and the mean and covariance of all 12 rows from their 7 + 5; a failure on rank 0
    is raised on rank 0 as itself and on rank 1 as a RuntimeError naming it (no rank left waiting)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    path = str(tmp_path / "out")
    mp.start_processes(_reducing_rank, args=(port, path), nprocs=2, join=True, start_method="fork")
    rows = torch.randn(12, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for r in range(2):
        got = torch.load(f"{path}.{r}", weights_only=False)
        assert torch.equal(got["sum"], torch.full((2, 2), 3.0)) and torch.equal(got["local"], torch.full((2, 2), r + 1.0))
        assert got["value"] == {"made by": 0}
        assert got["count"] == 12
        torch.testing.assert_close(got["mean"], rows.mean(0), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(got["cov"], torch.cov(rows.T), rtol=1e-10, atol=1e-10)
    assert torch.load(f"{path}.0", weights_only=False)["failure"] == ("ValueError", "no classifier here")
    assert torch.load(f"{path}.1", weights_only=False)["failure"] == (
        "RuntimeError", "rank 0 failed to make the classifier: ValueError: no classifier here")
