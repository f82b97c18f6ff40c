"""What a checkpoint's per-rank parts become when a run resumes on another number of workers.

An elastic run (trainer.num_workers: [min, max]) restarts on whatever number of workers the
cluster holds. Everything in a checkpoint is whole (θ, φ, EMA, and the optimisers: a ZeRO
optimiser is saved whole too, training/zero_state.py) except two lists with one entry per
rank of the run that wrote it: the torch RNG states and the objective states (PCD chains).
"""

from __future__ import annotations

from typing import Any

import torch

RANK_SEED_STRIDE = 1_000_003  # rank r of a run of seed s draws its noise from s + STRIDE·r (TrainLoop)


def reseed(seed: int, rank: int, step: int) -> None:
    """The noise stream of `rank` after a resume on a new world size: a pure function of the
    run's seed, the rank and the step resumed at, so two resumes of the same checkpoint on the
    same number of workers draw the same noise (not the noise the old ranks would have drawn)."""
    torch.manual_seed(seed + RANK_SEED_STRIDE * rank + step)


def resplit_objective_states(saved: list[dict[str, Any]], rank: int, world_size: int) -> dict[str, Any]:
    """This rank's objective state from the states of every rank of another world size. PCD
    chains (each rank's (B, D), B its batch) are concatenated, rank order, and dealt out again in
    contiguous blocks of len // world_size: with a fixed global batch every chain carries on, on
    some rank. Anything else ({} for non-contrastive objectives) starts afresh ({})."""
    if not saved or not all("chains" in s for s in saved):
        return {}
    chains = torch.cat([s["chains"] for s in saved])
    per = len(chains) // world_size
    return {"chains": chains[rank * per : (rank + 1) * per].clone()} if per else {}
