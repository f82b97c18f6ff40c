"""What a checkpoint's per-rank parts become when a run resumes on another number of workers.

An elastic run (trainer.num_workers: [min, max]) restarts on whatever number of workers the
cluster holds. Everything in a checkpoint is whole (θ, φ, EMA, and the optimisers: a ZeRO
optimiser is saved whole too, training/zero_state.py) except two lists with one entry per
rank of the run that wrote it: the torch RNG states and the objective states (PCD chains).
Checkpoints written before the optimisers were saved whole also hold one ZeRO shard per rank,
which only the same number of workers can read (`load_rank_shard`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from distributed_bism.training.checkpointing import CheckpointError, load_file, optim_shard_file
from distributed_bism.training.replica import Replica, deepspeed_safe_globals

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


def load_rank_shard(replica: Replica, directory: Path, saved_world: int) -> None:
    """This rank's optimiser shard, optim_rank{r}.pt, of a checkpoint written before the optimisers
    were saved whole (DeepSpeed's own per-rank state); a CheckpointError on another world size."""
    if saved_world != replica.world_size:
        raise CheckpointError(
            f"checkpoint {directory} holds one ZeRO optimiser shard per worker of {saved_world}; it cannot "
            f"resume on {replica.world_size} workers (relaunch with trainer.num_workers={saved_world})"
        )
    shard = load_file(directory / optim_shard_file(replica.rank), safe_globals=deepspeed_safe_globals())
    replica.energy_updater.load_state_dict(shard["energy"])
    if replica.posterior_updater is not None:
        replica.posterior_updater.load_state_dict(shard["posterior"])
