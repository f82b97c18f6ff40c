"""bench/learning_images.py's budget loop, on a fake clock: it trains past the calibration steps
until each evaluation mark, and stops at the calibration when that alone spends the budget.
(The end-to-end test runs it on the real clock, where how far it gets depends on the machine.)"""

from __future__ import annotations

import itertools
import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import learning_images  # noqa: E402


def _run(monkeypatch: pytest.MonkeyPatch, tick: float, budget: float) -> list[dict[str, Any]]:
    """run_job on the demo model (K=0, batch 8), where each read of the clock advances it by tick."""
    monkeypatch.setattr(learning_images, "evaluate", lambda loop, n, samplers: {"cfid_conditional": 1.0})
    ticks = itertools.count()
    job = {"method": "bimdsm_k0", "dataset": "digits", "budget": budget, "fractions": [0.5, 1.0], "n": 10,
           "overrides": ["trainer.batch_size=8"]}
    return learning_images.run_job(job, clock=lambda: next(ticks) * tick)["points"]


def test_training_goes_on_past_the_calibration_until_each_mark(monkeypatch: pytest.MonkeyPatch) -> None:
    points = _run(monkeypatch, tick=0.25, budget=8.0)
    steps = [p["step"] for p in points]
    assert learning_images.CALIBRATION_STEPS < steps[0] < steps[1], steps
    assert [p["train_s"] for p in points] == pytest.approx([4.25, 8.25])  # ticks past each mark: one check late


def test_a_calibration_that_spends_the_budget_ends_training(monkeypatch: pytest.MonkeyPatch) -> None:
    points = _run(monkeypatch, tick=10.0, budget=8.0)
    assert [p["step"] for p in points] == [learning_images.CALIBRATION_STEPS] * 2
