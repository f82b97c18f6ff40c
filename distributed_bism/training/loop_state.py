"""What a checkpoint holds of a TrainLoop, and how a loop is restored from it: the explicit dict
of checkpointing.py, filled from and read back into one worker's loop.

`loop_state` is a collective (the RNG streams, the objective's state and ZeRO's optimiser
partitions are gathered from every rank); `restore` runs on every rank, and re-deals the per-rank
parts when the checkpoint was written by another number of workers (resize.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from distributed_bism.distributed import gather_objects
from distributed_bism.models import unwrap
from distributed_bism.training.resize import load_rank_shard, reseed, resplit_objective_states

if TYPE_CHECKING:
    from distributed_bism.training.loop import TrainLoop


def loop_state(loop: TrainLoop) -> dict[str, Any]:
    """The checkpoint dict (checkpointing.py); a collective: every rank must call it."""
    r = loop.replica
    rng = gather_objects(torch.get_rng_state())
    obj = gather_objects(loop.objective.state_dict())
    return {
        "step": loop.step,
        "world_size": loop.world_size,
        "bad_steps": loop.bad_steps,
        "energy": unwrap(r.energy).state_dict(),
        "posterior": unwrap(r.posterior).state_dict() if r.posterior is not None else None,
        "ema": loop.ema.state_dict(),
        # whole, ZeRO's too (gathered from the ranks: a collective), so any world size resumes it
        "energy_optimizer": r.energy_updater.state_dict(),
        "posterior_optimizer": r.posterior_updater.state_dict() if r.posterior_updater is not None else None,
        "rng": rng,
        "objective": obj,
        "config": loop.cfg.to_yaml(),
        "mlflow_run_id": loop.run_id,
    }


def restore(loop: TrainLoop, state: dict[str, Any], directory: Path) -> None:
    """Load `state` (read from `directory`) into `loop`, on the loop's number of workers whatever
    the number that wrote it: RNG streams and PCD chains are re-dealt then (resize.py)."""
    r = loop.replica
    unwrap(r.energy).load_state_dict(state["energy"])
    if r.posterior is not None:
        unwrap(r.posterior).load_state_dict(state["posterior"])
    loop.ema.load_state_dict(state["ema"])
    if state["energy_optimizer"] is None:  # a checkpoint with one ZeRO shard per rank (before elastic runs)
        load_rank_shard(r, directory, state["world_size"])
    else:
        r.energy_updater.load_state_dict(state["energy_optimizer"])
        if r.posterior_updater is not None:
            r.posterior_updater.load_state_dict(state["posterior_optimizer"])
    loop.step, loop.bad_steps = state["step"], state["bad_steps"]
    loop.run_id = loop.run_id or state["mlflow_run_id"]
    if state["world_size"] == loop.world_size:
        torch.set_rng_state(state["rng"][loop.rank])
        loop.objective.load_state_dict(state["objective"][loop.rank])
    else:
        loop.log(
            f"checkpoint was written by {state['world_size']} workers, resuming on {loop.world_size}: "
            "noise streams are re-seeded from the seed, rank and step, so the run is no longer "
            "bit-for-bit the one a fixed number of workers would give"
        )
        reseed(loop.cfg.trainer.seed, loop.rank, loop.step)
        loop.objective.load_state_dict(resplit_objective_states(state["objective"], loop.rank, loop.world_size))
