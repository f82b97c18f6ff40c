"""Sample-quality metrics split across 2 gloo ranks (spawned processes) give what one process
gives for the same seed: the samples bit for bit, classifier-KID exactly (its features are
gathered in chunk order), classifier-FID and FID to 1e-6 relative. The Fréchet distances come
from feature sums all-reduced across ranks: the same numbers added in another order, which
changes the covariances by float64 rounding (~1e-16 relative). The distance takes square roots of
the eigenvalues of Σ_a^{1/2} Σ_b Σ_a^{1/2}, and the features of dead ReLU units make some of them
zero: √(1e-16) turns that rounding into ~1e-8 (measured: 2.7e-9 relative on the held-out
reference), the precision to which even one process determines the value. A rank that skipped the
all-reduce, or drew other samples, is off by far more (tens of percent). The split and the sums in
one process: tests/unit/test_eval_shares.py."""

from __future__ import annotations

import socket
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from distributed_bism.config import Config, from_dict
from distributed_bism.distributed import gather_rows
from distributed_bism.evaluation.classifier_fid import FeatureClassifier, FeatureNet, _train, labelled_splits
from distributed_bism.evaluation.metrics import run_metrics
from distributed_bism.models import BernoulliPosterior, GaussianRBM
from tests.helpers.local_runs import scratch_cwd  # noqa: F401 (scratch_cwd: an autouse fixture)
from tests.unit.test_evaluation import _FakeInception, context

# 90 samples in 5 chunks of 20 (3 on rank 0, 2 on rank 1; standard FID with a stand-in Inception
# file too), then in 1 chunk (rank 1 draws none)
CASES = ((20, ["classifier_fid", "classifier_kid", "fid"]), (100, ["classifier_fid", "classifier_kid"]))


def _config(out: Path, chunk: int, metrics: list[str]) -> Config:
    return from_dict(Config, {
        "data": {"name": "digits"}, "model": {"name": "grbm", "h_dim": 6}, "trainer": {"output_dir": str(out)},
        "eval": {"metrics": metrics, "fid_samples": 90, "sample_chunk": chunk, "classifier_dir": str(out / "clf"),
                 "inception_weights": str(out / "inception.pt"), "langevin_steps": [3, 3, 3]}})


def _prepare(out: Path) -> None:
    """digits.pt (100 held-out, 120 training digits, flat) and a classifier trained 2 epochs into
    the cache (clf/): features that tell digits apart, in a second."""
    train_x, train_y, test_x, _ = labelled_splits("digits", None, 0)
    torch.save({"test": test_x[:100].flatten(1), "train": train_x[:120].flatten(1)}, out / "digits.pt")
    net = FeatureNet(1)
    _train(net, train_x, train_y, 2, 64, 0)
    (out / "clf").mkdir()
    torch.save(FeatureClassifier("digits", net, (1, 8, 8), 0.0).payload(), out / "clf" / "digits-seed0-v1.pt")
    torch.jit.script(_FakeInception()).save(str(out / "inception.pt"))


def evaluate(
    out: Path, chunk: int, metrics: list[str], rank: int = 0, world: int = 1
) -> tuple[dict[str, float], torch.Tensor]:
    """The metrics on this rank (rank 0's values; {} on the others) and every rank's samples, gathered."""
    torch.set_num_threads(1)  # one thread in every process: the same kernels, the same float order
    torch.manual_seed(0)
    grbm, q = GaussianRBM(64, 6, init_std=0.1), BernoulliPosterior(64, 6)
    data = torch.load(out / "digits.pt", weights_only=True)
    test, train = data["test"], data["train"]
    cfg = _config(out, chunk, metrics)
    ctx = context(cfg, grbm, q, test, out, image_shape=(1, 8, 8), train_data=train, rank=rank, world_size=world)
    values = run_metrics(cfg.eval.metrics, ctx)
    return values, gather_rows(ctx.shared[f"real_and_fake/{cfg.eval.sampler}"][1])


def _rank(rank: int, port: int, out: str) -> None:
    """One of 2 gloo ranks: every case's evaluation, saved to <out>/rank<rank>.pt. A collective
    that one rank never joins fails after 2 minutes, not torch's 30."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=timedelta(seconds=120))
    try:
        torch.save([evaluate(Path(out), chunk, metrics, rank, 2) for chunk, metrics in CASES], f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_ranks_give_the_classifier_fid_of_one(tmp_path: Path) -> None:
    """classifier_fid, classifier_kid (with their held-out and noise references) and fid (a
    stand-in Inception file) on 2 ranks equal the one-process values of the same seed, for 5
    chunks split 3/2 and for 1 chunk (rank 1 empty); rank 1 takes part and reports nothing."""
    _prepare(tmp_path)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # spawn: fresh processes (torch is threaded in this one); join raises if a rank fails
    mp.start_processes(_rank, args=(port, str(tmp_path)), nprocs=2, join=True, start_method="spawn")
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    for i, (chunk, metrics) in enumerate(CASES):
        one, one_samples = evaluate(tmp_path, chunk, metrics)
        (two, two_samples), (other, other_samples) = results[0][i], results[1][i]
        assert other == {}  # rank 1 takes part, rank 0 reports
        assert one_samples.shape == (90, 64)
        assert torch.equal(two_samples, one_samples) and torch.equal(other_samples, one_samples), chunk
        assert set(two) == set(one) and ("eval/fid" in one) == ("fid" in metrics)
        for key, value in one.items():
            if "kid" in key or "accuracy" in key:  # from the same features in the same order: exact
                assert two[key] == value, (chunk, key, two[key], value)
            else:  # Fréchet distances: the same sums added in another order (see the module docstring)
                assert two[key] == pytest.approx(value, rel=1e-6), (chunk, key, two[key], value)
