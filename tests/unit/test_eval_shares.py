"""Evaluation split across ranks, in one process: the per-rank split arithmetic, the chunks each
rank draws (their union is the one-process draw, bit for bit), feature sums that add up to the
whole set's mean and covariance, the settings (eval.sample_chunk, trainer.collective_timeout_s
and the TorchConfig it makes) and progress bars on rank 0 only. The same on 2 gloo ranks, with
the real all-reduce: tests/distributed/test_eval_scaling.py."""

from __future__ import annotations

import io
import math
from pathlib import Path

import pytest
import torch

from distributed_bism import progress_bars
from distributed_bism.config import ConfigError
from distributed_bism.distributed import share
from distributed_bism.evaluation.classifier_fid import frechet_distance
from distributed_bism.evaluation.feature_stats import FeatureStats, frechet_of_stats
from distributed_bism.evaluation.sample_quality import real_and_fake
from distributed_bism.evaluation.sample_shares import SampleShare, chunk_seed
from tests.helpers.local_runs import scratch_cwd, tiny  # noqa: F401 (scratch_cwd: an autouse fixture)
from tests.helpers.tiny_models import tiny_grbm
from tests.unit.test_evaluation import context


@pytest.mark.parametrize("world", [1, 2, 3, 5])
def test_share_splits_n_evenly_remainder_to_the_first_ranks(world: int) -> None:
    for n in range(0, 23):
        parts = [share(n, r, world) for r in range(world)]
        assert parts[0][0] == 0 and parts[-1][1] == n
        assert all(a[1] == b[0] for a, b in zip(parts, parts[1:]))  # contiguous, in rank order
        sizes = [stop - start for start, stop in parts]
        assert sizes == [n // world + (1 if r < n % world else 0) for r in range(world)], (n, sizes)


def test_sample_shares_cover_the_rows_in_chunks_and_leave_extra_ranks_empty() -> None:
    """23 rows in chunks of 5 = 5 chunks (the last of 3 rows): 3 ranks take 2, 2, 1 chunks; 7 ranks
    leave 2 empty. Every rank's rows are whole chunks, and together they are [0, n) once."""
    for world, chunks in ((1, [5]), (3, [2, 2, 1]), (7, [1, 1, 1, 1, 1, 0, 0])):
        parts = [SampleShare(23, 5, r, world) for r in range(world)]
        assert [len(p.chunks) for p in parts] == chunks
        assert [p.rows(k) for p in parts for k in p.chunks] == [slice(i, min(i + 5, 23)) for i in range(0, 23, 5)]
        assert [(p.start, p.stop) for p in parts if p.chunks][0][0] == 0
        assert all(p.start == p.stop for p in parts if not p.chunks)
        assert sum(p.stop - p.start for p in parts) == 23
    with pytest.raises(ValueError, match="rank 2 of 2"):
        SampleShare(10, 5, 2, 2)


def test_chunk_seeds_differ_across_chunks_and_seeds() -> None:
    seeds = {chunk_seed(s, k) for s in range(20) for k in range(50)}
    assert len(seeds) == 1000  # seed + k would give (0, 1) and (1, 0) the same stream
    assert chunk_seed(3, 4) == chunk_seed(3, 4)


def test_ranks_draw_exactly_the_rows_of_one_process(tmp_path: Path) -> None:
    """real_and_fake on ranks 0..W-1 (no collective involved in drawing): each rank's held-out rows
    and samples, concatenated in rank order, equal the one-process draw bit for bit, for W = 2, 3
    and 8 (8 > the 6 chunks: two ranks draw nothing)."""
    grbm, q = tiny_grbm()
    cfg = tiny(tmp_path, **{"eval.fid_samples": 27, "eval.sample_chunk": 5})
    g = torch.Generator().manual_seed(1)
    test, train = torch.randn(40, 2, generator=g), torch.randn(60, 2, generator=g)

    def drawn(rank: int, world: int) -> tuple[torch.Tensor, torch.Tensor]:
        ctx = context(cfg, grbm, q, test, tmp_path, image_shape=(2,), train_data=train, rank=rank, world_size=world)
        got = real_and_fake(ctx)
        assert got is not None
        real, fake, part = got
        assert len(real) == len(fake) == part.stop - part.start
        return real, fake

    real1, fake1 = drawn(0, 1)
    assert fake1.shape == (27, 2) and torch.equal(real1, test[:27])
    assert not torch.equal(fake1[:5], fake1[5:10])  # each chunk has its own stream
    for world in (2, 3, 8):
        parts = [drawn(r, world) for r in range(world)]
        assert torch.equal(torch.cat([p[0] for p in parts]), real1)
        assert torch.equal(torch.cat([p[1] for p in parts]), fake1), f"{world} ranks drew other samples"


def test_map_of_an_empty_share_has_the_feature_shape() -> None:
    part = SampleShare(4, 5, rank=1, world_size=2)  # one chunk, on rank 0
    out = part.map(lambda x: x.double() @ torch.ones(3, 7, dtype=torch.float64), torch.zeros(0, 3))
    assert out.shape == (0, 7) and out.dtype == torch.float64
    with pytest.raises(ValueError, match="holds rows"):
        SampleShare(4, 5).map(lambda x: x, torch.zeros(3, 3))


def test_feature_sums_of_parts_give_the_whole_sets_gaussian() -> None:
    """(n, Σx, Σxxᵀ) of three uneven parts (one empty), added, give torch's mean and unbiased
    covariance of the whole set and the same Fréchet distance as the rows themselves."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(301, 6, generator=g, dtype=torch.float64) @ torch.randn(6, 6, generator=g, dtype=torch.float64) + 3
    b = torch.rand(157, 6, generator=g, dtype=torch.float64) * 4

    def added(x: torch.Tensor, cuts: tuple[int, ...]) -> FeatureStats:
        parts = [FeatureStats.of(p) for p in torch.tensor_split(x, cuts)]
        return FeatureStats(sum(p.count for p in parts), sum(p.total for p in parts), sum(p.outer for p in parts))

    sa, sb = added(a, (100, 100, 250)), added(b, (1, 90))
    assert sa.count == 301
    torch.testing.assert_close(sa.mean, a.mean(0), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(sa.cov, torch.cov(a.T), rtol=1e-10, atol=1e-10)
    assert frechet_of_stats(sa, sb) == pytest.approx(frechet_distance(a, b), rel=1e-10)
    alone, one = FeatureStats.of(a), FeatureStats.of(a).reduced()  # one process: reduced = itself
    assert one.count == alone.count and torch.equal(one.total, alone.total) and torch.equal(one.outer, alone.outer)
    broken = b.clone()
    broken[3, 2] = math.inf
    assert math.isnan(frechet_of_stats(sa, added(broken, (1, 90))))


def test_eval_settings_are_validated(tmp_path: Path) -> None:
    assert tiny(tmp_path).trainer.collective_timeout_s == 4 * 3600 and tiny(tmp_path).eval.sample_chunk == 250
    for key, value, message in (
        ("eval.sample_chunk", 0, r"^eval\.sample_chunk: must be > 0"),
        ("trainer.collective_timeout_s", 10, r"^trainer\.collective_timeout_s: must be between 60 and 604800"),
        ("trainer.collective_timeout_s", 10**7, r"^trainer\.collective_timeout_s: must be between"),
        ("trainer.collective_timeout_s", "long", r"^trainer\.collective_timeout_s: "),
    ):
        with pytest.raises(ConfigError, match=message):
            tiny(tmp_path, **{key: value})


def test_torch_config_carries_the_collective_timeout(tmp_path: Path) -> None:
    from distributed_bism.launch.ray_backend import torch_config

    cfg = tiny(tmp_path, **{"trainer.collective_timeout_s": 5400})
    cpu, gpu = torch_config(cfg, use_gpu=False), torch_config(cfg, use_gpu=True)
    assert (cpu.backend, cpu.timeout_s) == ("gloo", 5400) and (gpu.backend, gpu.timeout_s) == ("nccl", 5400)


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("rank", [0, 1])
def test_progress_bars_on_rank_0_only(rank: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """On a terminal, rank 0 draws the bar; rank 1 of 2 does the same work and writes nothing."""
    err = _Terminal()
    monkeypatch.setattr("sys.stderr", err)
    monkeypatch.setattr(progress_bars, "rank_and_world", lambda: (rank, 2))
    assert list(progress_bars.bar(range(3), "chunks")) == [0, 1, 2]
    assert ("chunks:" in err.getvalue()) == (rank == 0), err.getvalue()
