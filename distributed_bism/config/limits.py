"""Caps on counts that hold on any machine (the config's part of "bad input fails fast").

A LEAF, like the rest of config/: no torch, nothing else from the package but config.errors.
"""

from __future__ import annotations

from distributed_bism.config.errors import check

# Caps on counts, whatever the machine: a value past them is a typo or a unit slip (1e9 for 1e3),
# which would hang inside the first step instead of failing. preflight.check_memory judges what
# fits this machine's memory. trainer.steps: 33× the longest reference run (CIFAR-10, 300k).
MAX_STEPS = 10_000_000
# Lower-level steps inside ONE training step (K, N, Gibbs sweeps, SGLD steps): each is a forward
# and backward pass of the model, and K's are all kept in memory for the hypergradient.
MAX_INNER_STEPS = 10_000
MAX_EXAMPLES = 10_000_000  # data.n_train / n_test (synthetic draws), eval sample counts, AIS chains
MAX_SAMPLER_STEPS = 1_000_000  # Langevin steps per phase, AIS temperatures
MAX_GRID = 10_000  # eval.num_samples: the images of one sample grid (100 × 100)


def check_count(value: int, key: str, cap: int, what: str) -> None:
    """`value` (already checked >= 0 or > 0) is at most `cap`; `what` says what one unit costs."""
    check(value <= cap, key, f"{value} is more than the {cap} allowed ({what})")
