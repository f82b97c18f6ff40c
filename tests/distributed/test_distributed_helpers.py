"""distributed_bism.distributed: each collective in one process (world size 1: its input back, no
group needed) and on 2 gloo processes (every rank gets the same, correct answer)."""

from __future__ import annotations

import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from distributed_bism.distributed import (all_ranks_agree, broadcast_object, collective_device, gather_objects,
                                          gather_rows, mean_over_ranks, rank_and_world)


def test_one_process_is_world_size_one_and_returns_its_input():
    assert not dist.is_initialized()
    rows = torch.arange(6.0).view(3, 2)
    assert rank_and_world() == (0, 1)
    assert gather_objects({"a": 1}) == [{"a": 1}]
    assert broadcast_object("x") == "x"
    assert mean_over_ranks(2.5) == 2.5
    assert all_ranks_agree(True) is True and all_ranks_agree(False) is False
    assert gather_rows(rows) is rows


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
