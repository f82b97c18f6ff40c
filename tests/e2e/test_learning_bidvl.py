"""BiDVL learns digits: a short run whose reconstruction error, OOD AUROC and classifier-FID are
measured through the trainer's own evaluation (the rest of BiDVL: tests/unit/test_bidvl.py)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch.nn.functional as F

from distributed_bism.models import unwrap
from distributed_bism.training.loop import TrainLoop
from tests.unit.test_bidvl import digits_config


@pytest.fixture(scope="module")
def classifier_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("classifiers")


def test_short_digits_run_reconstructs_detects_ood_and_improves_fid(tmp_path, classifier_cache):
    """250 steps on digits: the test reconstruction error falls; the trainer's evaluation (the
    metric registry, the bidvl_decoder sampler) gives OOD AUROC > 0.9 against uniform noise and a
    lower classifier-FID of decoder samples than the initial model's."""
    cfg = digits_config(tmp_path, eval={"metrics": ["ood_auroc", "classifier_fid"],
                                        "classifier_dir": str(classifier_cache), "fid_samples": 297})
    loop = TrainLoop.from_config(cfg)
    q = unwrap(loop.replica.posterior)

    def recon_mse() -> float:
        return F.mse_loss(q.reconstruct(loop.test_data), loop.test_data).item()

    before, mse_before = loop.evaluate(), recon_mse()
    for _ in range(cfg.trainer.steps):
        loop.run_step(loop.batches(loop.step))
    after, mse_after = loop.evaluate(), recon_mse()
    assert mse_after < 0.7 * mse_before, f"reconstruction MSE {mse_before:.4f} → {mse_after:.4f}"
    assert after["eval/ood_auroc"] > 0.9, after
    assert after["eval/classifier_fid"] < 0.7 * before["eval/classifier_fid"], (before, after)
    assert dataclasses.asdict(cfg.eval)["ood_dataset"] == "uniform_noise"
