"""Execution strategies: how one worker's energy and posterior are wrapped and stepped.

    local      the modules as they are, torch Adam (one process, no Ray)
    ddp        DistributedDataParallel around each module (gloo on CPU, nccl on GPU), torch Adam
    deepspeed  one DeepSpeed engine per module, ZeRO stage 0/1/2, a client torch Adam (no compile)

All three return a `Replica`, and the training loop runs the same `BilevelStep` on it. What
the step calls matters under DDP (docs/stack.md): the higher-level loss calls `replica.energy`
(the wrapper, so its reducer averages dJ/dθ), the warm-up calls `replica.posterior` (so dG/dφ
is averaged), and every inner loss calls the unwrapped modules, whose gradients are either
not accumulated (torch.autograd.grad) or flow into θ through the one outer backward.
A parameter can be in the forward graph and still get no gradient from a score loss (the
GRBM's c at K=0); DDP would then never reduce its bucket and the ranks would drift apart with
no error, so under DDP every backward touches every parameter (`TorchUpdater(touch_all=True)`)
and the reducer can expect all of them. DeepSpeed averages in engine.backward, whatever was called.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from distributed_bism.config import Config
from distributed_bism.training.optim import adam
from distributed_bism.training.updaters import EngineUpdater, TorchUpdater, Updater


@dataclass
class Replica:
    """One worker's models and their updaters, wrapped for the strategy."""

    energy: nn.Module  # called by the higher-level loss: the DDP wrapper, or the module
    posterior: nn.Module | None  # called by the warm-up
    energy_updater: Updater
    posterior_updater: Updater | None
    strategy: str = "local"
    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def sharded_optimizer(self) -> bool:
        """True when each rank holds only its shard of the optimiser state (ZeRO ≥ 1)."""
        return bool(getattr(self.energy_updater, "sharded", False))


def deepspeed_safe_globals() -> list[Any]:
    """The plain data classes a ZeRO optimiser's state_dict pickles besides tensors, allowed by
    name for torch.load(weights_only=True); nothing else in the file may be a class."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    # Found by listing the pickle's GLOBAL opcodes of ZeRO-1/2 shards (fp32 and a loss scaler).
    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


# DDP's reducer warns once per process that a gradient's strides differ from its bucket's, e.g.
# grad [16, 1, 3, 3] strides [9, 144, 3, 1] against [9, 9, 3, 1] for the first conv of a 1-channel
# model: they differ only in a dimension of size 1, where a stride means nothing, so the copy into
# the bucket is the same either way. The warning's six lines buried the workers' progress lines.
GRAD_STRIDES_WARNING = r"Grad strides do not match bucket view strides"


def quiet_grad_strides_warning() -> None:
    """Ignore DDP's grad-strides warning (GRAD_STRIDES_WARNING) in this process; others still show."""
    import warnings

    warnings.filterwarnings("ignore", message=GRAD_STRIDES_WARNING, category=UserWarning)


def _ddp(module: nn.Module, device: torch.device) -> nn.Module:
    from torch.nn.parallel import DistributedDataParallel

    quiet_grad_strides_warning()

    ids = [device.index] if device.type == "cuda" else None
    # Every backward reaches every parameter (touch_all), so there are no unused ones to search for.
    return DistributedDataParallel(module, device_ids=ids, find_unused_parameters=False)


def deepspeed_config(cfg: Config, world_size: int = 1) -> dict[str, Any]:
    """The DeepSpeed config for one engine of `world_size`: no gradient accumulation, ZeRO stage from the config."""
    t = cfg.trainer
    return {
        "train_micro_batch_size_per_gpu": t.batch_per_worker(world_size),
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": t.zero_stage},
        "bf16": {"enabled": t.precision == "bf16"},
        "fp16": {"enabled": t.precision == "fp16", "initial_scale_power": 16},
        "steps_per_print": 1 << 30,  # our own progress lines instead
        "zero_allow_untested_optimizer": True,  # a client torch Adam: nothing to compile
    }


def skip_inference_comm_op() -> None:
    """Keep DeepSpeed from building its CPU shared-memory all-reduce: a C++ op that it compiles
    on first use (~45 s per machine, then ~2 s to load at every launch) and that only its
    `inference_all_reduce` calls; training reduces through torch.distributed (gloo). DeepSpeed
    builds the op only when `deepspeed.ops.__compatible_ops__` lists it, a dict it keeps."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def build_replica(
    cfg: Config,
    energy: nn.Module,
    posterior: nn.Module | None,
    *,
    rank: int = 0,
    world_size: int = 1,
    device: torch.device | None = None,
) -> Replica:
    """Move the modules to `device`, wrap them for cfg.trainer.strategy and build their optimisers."""
    device = device or torch.device("cpu")
    strategy, o = cfg.trainer.strategy, cfg.optim
    energy = energy.to(device)
    posterior = posterior.to(device) if posterior is not None else None
    if strategy == "deepspeed":
        import deepspeed

        if device.type == "cpu":
            skip_inference_comm_op()
        ds = deepspeed_config(cfg, world_size)
        e_engine, *_ = deepspeed.initialize(model=energy, optimizer=adam(energy.parameters(), o.lr, o.betas), config=ds)
        p_engine = None
        if posterior is not None:
            p_engine, *_ = deepspeed.initialize(
                model=posterior, config=ds, optimizer=adam(posterior.parameters(), o.posterior_lr, o.posterior_betas)
            )
        return Replica(
            energy=e_engine.module,
            posterior=p_engine.module if p_engine else None,
            energy_updater=EngineUpdater(e_engine, cfg.trainer.zero_stage),
            posterior_updater=EngineUpdater(p_engine, cfg.trainer.zero_stage) if p_engine else None,
            strategy=strategy,
            rank=rank,
            world_size=world_size,
            device=device,
        )
    ddp = strategy == "ddp" and world_size > 1
    e_updater = TorchUpdater(adam(energy.parameters(), o.lr, o.betas), touch_all=ddp)
    p_updater = (
        TorchUpdater(adam(posterior.parameters(), o.posterior_lr, o.posterior_betas), touch_all=ddp)
        if posterior is not None
        else None
    )
    if ddp:
        energy = _ddp(energy, device)
        posterior = _ddp(posterior, device) if posterior is not None else None
    return Replica(
        energy=energy,
        posterior=posterior,
        energy_updater=e_updater,
        posterior_updater=p_updater,
        strategy=strategy,
        rank=rank,
        world_size=world_size,
        device=device,
    )
