"""Each GRBM learner leaves the single-Gaussian plateau of the reference checkerboard.

The reference set-up (`experiments.checkerboard_grbm`: its initialisation, Adam 1e-3 with betas
(0.9, 0.95), batch 100, H=4, σ=0.05, N=5, 60 000 training points), seed 0, one torch thread.
−0.356 nats is the plateau: the best single Gaussian (σ → √(1/12), the spread of the data),
which every learner reaches first (from −2.95 here). Leaving it, the hidden units start to tell
the two cells apart; the best possible is log 2 = 0.693.

Budgets and thresholds are measured (seed 0, one thread; the same trajectories as seed 0 of
bench/results/paper_loglik.json, which also has seeds 1 and 2):

    learner    steps   model.init=reference   model.init=small   threshold
    CD-1        4000        −0.2953               −0.3299           −0.31
    PCD-1       4000        −0.2982               −0.3305           −0.31
    DSM        10000        −0.2603               −0.279            −0.27
    BiDSM K=0   4000        −0.3368               −0.3474           −0.343
    BiDSM K=5   4000        −0.3387               −0.3477           −0.343

With `model.init=small` (W ~ N(0, 0.01²), b = c = 0) every case fails: checked by running this
file with INIT = "small" (at 8000 iterations DSM had still passed a −0.315 threshold under small,
−0.314; hence 10000). The margins are thin, 0.01-0.03 nats, and rest on seed 0's trajectory
on one thread (deterministic here, but not promised across torch builds or CPUs). BiDSM leaves
the plateau slowly under either init (over 3 seeds it passes −0.30 at 13k, 19.5k and after 20k
iterations with the reference init), so within a CI budget it can only be asserted to be
measurably above the plateau, not far above it. Most of what held the earlier set-up on the
plateau is not W's scale: DSM from the small W but with b = 0 and betas (0.9, 0.95) reaches
−0.279 at 10k, while from the small W with b at the data mean and betas (0.9, 0.999) (the old
start) it is at −0.354 (seed 0, bench/README.md).
"""

from __future__ import annotations

import pytest

from distributed_bism.config import Config, from_dict
from distributed_bism.experiments import CHECKERBOARD_METHODS, checkerboard_grbm
from distributed_bism.training.loop import TrainLoop

PLATEAU = -0.356
INIT = "reference"
INITIAL_BELOW = -1.5
# learner → (iterations, the exact test log-likelihood it must exceed then)
BUDGET: dict[str, tuple[int, float]] = {
    "cd1": (4000, -0.31),
    "pcd1": (4000, -0.31),
    "dsm": (10000, -0.27),
    "bidsm_k0": (4000, -0.343),
    "bidsm_k5": (4000, -0.343),
}
assert set(BUDGET) == set(CHECKERBOARD_METHODS)
assert all(threshold > PLATEAU for _, threshold in BUDGET.values())


@pytest.mark.slow
@pytest.mark.parametrize("method", list(CHECKERBOARD_METHODS))
def test_method_leaves_the_plateau(method, one_thread):
    steps, threshold = BUDGET[method]
    d = checkerboard_grbm(method, steps=steps, log_every=steps, eval_every=steps)
    d["model"]["init"] = INIT
    loop = TrainLoop.from_config(from_dict(Config, d), log=lambda s: None)
    history = loop.run()
    initial, final = history.test_loglik[0], history.test_loglik[steps]
    assert initial < INITIAL_BELOW, f"{method}: unexpected initial log-likelihood {initial:.3f}"
    assert final > threshold, (f"{method}: log-likelihood {initial:.3f} → {final:.4f} after {steps} iterations, "
                               f"expected > {threshold} (the plateau is {PLATEAU})")
