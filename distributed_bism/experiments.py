"""Reference experiment set-ups shared by the demo, the tests and the benchmarks.

`checkerboard_grbm` is the reference's checkerboard GRBM (docs/methods.md §2: v=2, H=4, its
initialisation (`model.init=reference`), Adam 1e-3 with betas (0.9, 0.95) for θ and φ, batch 100,
σ=0.05, N=5, KL lower level, 60 000 training points: the reference's train + validation) for each
learner in `CHECKERBOARD_METHODS`. It returns a plain dict, so callers can apply dotted overrides
before building the `Config`.
"""

from __future__ import annotations

from typing import Any

REFERENCE_BETAS = (0.9, 0.95)  # Adam's betas in every reference run (its criterions/base.py), GRBMs included
CHECKERBOARD_N_TRAIN = 60_000  # the reference trains on its train (50k) + validation (10k) draws; test 10k

# learner → its objective section on top of the shared set-up
CHECKERBOARD_METHODS: dict[str, dict[str, Any]] = {
    "bidsm_k0": {"name": "bidsm", "warmup_steps": 5, "unroll_steps": 0},
    "bidsm_k5": {"name": "bidsm", "warmup_steps": 5, "unroll_steps": 5},
    "dsm": {"name": "dsm"},
    "cd1": {"name": "cd", "cd_steps": 1},
    "pcd1": {"name": "pcd", "cd_steps": 1},
}


def checkerboard_grbm(method: str, *, steps: int, log_every: int, eval_every: int, seed: int = 0) -> dict[str, Any]:
    """The checkerboard GRBM experiment for `method` (a key of CHECKERBOARD_METHODS), as a dict."""
    if method not in CHECKERBOARD_METHODS:
        raise ValueError(f"unknown checkerboard method {method!r}; expected one of {', '.join(CHECKERBOARD_METHODS)}")
    return {
        "data": {"name": "checkerboard", "n_train": CHECKERBOARD_N_TRAIN},
        "model": {"name": "grbm", "h_dim": 4, "init": "reference"},
        "posterior": {"name": "bernoulli", "temperature": 0.1},
        "objective": {"sigma": 0.05, "lower_level": "kl", **CHECKERBOARD_METHODS[method]},
        "optim": {
            "lr": 1e-3,
            "posterior_lr": 1e-3,
            "betas": list(REFERENCE_BETAS),
            "posterior_betas": list(REFERENCE_BETAS),
        },
        "trainer": {"steps": steps, "batch_size": 100, "seed": seed, "log_every": log_every},
        "eval": {"every": eval_every},
    }
