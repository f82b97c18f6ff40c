"""Each GRBM learner raises the exact test log-likelihood on the reference checkerboard.

Reference hyperparameters (Adam 1e-3, batch 100, H=4, σ=0.05, N=5), seed 0, 1500 iterations.
Measured (torch 2.13 CPU): every method starts at −1.92 nats; after 1500 iterations BiDSM K=0
reaches −0.360, BiDSM K=5 −0.359, DSM −0.360, CD-1 −0.375, PCD-1 −0.375 (best possible:
log 2 = 0.693). The thresholds leave ~0.25 nats of margin below those values and sit 1.3 nats
above the start.

What this budget proves: −0.356 is the best single Gaussian (σ → √(1/12), the spread of the
data), a plateau every method reaches first. Leaving it for the two-cell structure takes longer
than CI allows: in 20k-iteration runs (bench/learning_grbm.py) CD-1 leaves it at 8-9k
iterations and DSM at 11-13k; see bench/results for the curves.
"""

from __future__ import annotations

import pytest

from distributed_bism.config import Config, from_dict
from distributed_bism.experiments import CHECKERBOARD_METHODS, checkerboard_grbm
from distributed_bism.trainer import TrainLoop

STEPS = 1500
INITIAL_BELOW = -1.5
FINAL_ABOVE = -0.6


@pytest.mark.slow
@pytest.mark.parametrize("method", list(CHECKERBOARD_METHODS))
def test_method_learns_the_checkerboard(method):
    cfg = from_dict(Config, checkerboard_grbm(method, steps=STEPS, log_every=STEPS, eval_every=STEPS))
    loop = TrainLoop.from_config(cfg, log=lambda s: None)
    history = loop.run()
    initial, final = history.test_loglik[0], history.test_loglik[STEPS]
    assert initial < INITIAL_BELOW, f"{method}: unexpected initial log-likelihood {initial:.3f}"
    assert final > FINAL_ABOVE, f"{method}: log-likelihood {initial:.3f} → {final:.3f}, expected > {FINAL_ABOVE}"
