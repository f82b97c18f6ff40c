"""Correctness across workers, on a real Ray TorchTrainer with 2 CPU workers (gloo).

The silent trap (docs/stack.md): a wrapper whose forward is never called does not average
gradients, and nothing raises; ranks drift apart. Each test here fails in that case:
  * the gradient each rank applies after one step must equal the mean over shards of the
    single-process hypergradient on each shard (and the shards' own gradients are checked
    to differ, so an un-averaged gradient cannot pass);
  * after 20 steps the energy's and the posterior's parameters must be equal on every rank;
  * a NaN loss on rank 0 only must make every rank skip the step;
  * a checkpoint (with ZeRO, every rank's optimiser shard) reloads to the same continuation.
The warm-up is off (N = 0) in the one-step check: with N > 0 φ would first be trained on the
averaged warm-up gradient, which no single-process run on one shard reproduces.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from ray import cloudpickle

from distributed_bism.config import Config, from_dict
from distributed_bism.launch.ray_backend import run_on_ray
from distributed_bism.training.loop import TrainLoop
from tests.helpers import dist_workers
from tests.helpers.dist_workers import first_step_config

cloudpickle.register_pickle_by_value(dist_workers)  # workers cannot import tests/

KS = (0, 3)


def tiny_config(strategy: str, zero_stage: int = 1) -> dict:
    """A 2-worker BiDSM run on the checkerboard GRBM (output_dir: set per case by run_cases)."""
    return {
        "data": {"name": "checkerboard", "n_train": 256, "n_test": 64},
        "model": {"name": "grbm", "h_dim": 4, "init": "small", "init_std": 0.1},
        "posterior": {"name": "bernoulli", "temperature": 0.5},
        "objective": {"name": "bidsm", "sigma": 0.1, "warmup_steps": 2, "unroll_steps": 3, "unroll_optimizer": "adam"},
        "optim": {"lr": 1e-2, "posterior_lr": 1e-2},
        "trainer": {"name": f"probe-{strategy}-{zero_stage}", "strategy": strategy, "num_workers": 2,
                    "batch_size": 16, "zero_stage": zero_stage, "max_failures": 0},
        "tracking": {"enabled": False},
    }


def single_process_grads(cfg: Config, k: int, seen: dict) -> dict[str, torch.Tensor]:
    """dJ/dθ on one shard in this process, from the same initial weights and noise stream."""
    local = dataclasses.replace(first_step_config(cfg, k), trainer=dataclasses.replace(cfg.trainer, strategy="local", num_workers=1))
    loop = TrainLoop.from_config(local)
    torch.set_rng_state(seen["rng"])
    loop.forward_backward(seen["batch"])
    return {n: p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p)
            for n, p in loop.replica.energy.named_parameters()}


def close(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-6) -> bool:
    return bool((a - b).abs().max() <= rel * max(1.0, b.abs().max().item()))


def check_ranks(cfg: Config, ranks: list[dict], ks: tuple[int, ...] = KS) -> None:
    for k in ks:
        shards = [single_process_grads(cfg, k, ranks[r]["first_step"][k]) for r in range(2)]
        mean = {n: (shards[0][n] + shards[1][n]) / 2 for n in shards[0]}
        spread = max((shards[0][n] - shards[1][n]).abs().max().item() for n in mean)
        scale = max(m.abs().max().item() for m in mean.values())
        assert spread > 1e-3 * scale, f"K={k}: the shards' gradients barely differ; the test could not see un-averaging"
        for r in range(2):
            applied = ranks[r]["first_step"][k]["grads"]
            for n in mean:
                assert close(applied[n], mean[n]), (
                    f"K={k} rank {r} {n}: applied {applied[n].flatten()[:4]} != mean over shards {mean[n].flatten()[:4]} (shards {shards[0][n].flatten()[:4]} {shards[1][n].flatten()[:4]})")
    for key in ("params_after_20", "params_continued", "params_after_nan"):
        for n, p in ranks[0][key].items():
            assert torch.equal(p, ranks[1][key][n]), f"{key}: {n} differs between ranks"
    for r in range(2):
        if cfg.trainer.strategy == "deepspeed":
            assert ranks[r]["shm_comm_op_built"] is False, "DeepSpeed built its CPU inference all-reduce op"
        for n, p in ranks[r]["params_continued"].items():
            assert torch.equal(p, ranks[r]["params_reloaded"][n]), f"rank {r}: {n} differs after a checkpoint round trip"
        assert ranks[r]["bad_steps"] == 1, f"rank {r} did not skip the step where rank 0's loss was NaN"
        for n, p in ranks[r]["params_continued"].items():
            assert torch.equal(p, ranks[r]["params_after_nan"][n]), f"rank {r}: {n} changed in a skipped step"


def run_cases(tmp_path, cases: dict[str, tuple[dict, tuple[int, ...]]]) -> None:
    """Each case (config dict, Ks of the one-step check) probed in turn by ONE worker group (its
    start-up is most of a probe's cost; the process group serves every strategy), then checked."""
    built = []
    for label, (raw, ks) in cases.items():
        out = tmp_path / label
        out.mkdir()
        built.append((label, from_dict(Config, {**raw, "trainer": {**raw["trainer"], "output_dir": str(out / "out")}}),
                      out, ks))
    run_on_ray(built[0][1], dist_workers.gradient_probes,
               {"cases": [{"config": cfg.to_dict(), "ks": ks, "out": str(out)} for _, cfg, out, ks in built]})
    for label, cfg, out, ks in built:
        try:
            check_ranks(cfg, [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(2)], ks=ks)
        except AssertionError as e:
            raise AssertionError(f"{label}: {e}") from e


@pytest.mark.usefixtures("ray_cluster")
def test_bism_averages_hypergradients_across_ranks_under_ddp_and_deepspeed(tmp_path):
    """BiDSM at K = 0 and 3 under ddp, deepspeed ZeRO-1 and ZeRO-2."""
    run_cases(tmp_path, {f"{strategy}-{stage}": (tiny_config(strategy, stage), KS)
                         for strategy, stage in (("ddp", 1), ("deepspeed", 1), ("deepspeed", 2))})


# Objectives besides BiSM: section overrides of tiny_config and the Ks of the one-step check.
OTHER_OBJECTIVES: dict[str, tuple[dict, tuple[int, ...]]] = {
    # vages_dsm: K = 0 only (it does not unroll)
    "vages_dsm": ({"objective": {"name": "vages_dsm", "sigma": 0.1, "warmup_steps": 2, "unroll_steps": 0,
                                 "num_particles": 2}}, (0,)),
    # bidvl: a marginal energy and the encoder-decoder in the posterior slot; at K = 3 the upper
    # level is differentiated through the unrolled decoder
    "bidvl": ({"model": {"name": "marginal_mlp", "h_dim": 2, "hidden": [8]},
               "posterior": {"name": "encoder_decoder", "encoder": "mlp", "hidden": [8], "decoder_hidden": [8],
                             "decoder_output": "none"},
               "objective": {"name": "bidvl", "warmup_steps": 2, "unroll_steps": 3, "unroll_optimizer": "adam",
                             "bidvl_lambda": 0.5}}, KS),
    # BiDSM with the memory-bounded unroll: dJ/dθ reaches θ through the recomputed steps, and must
    # still arrive once at each parameter for DDP's and DeepSpeed's hooks to average it
    "bidsm_unroll_checkpoint": ({"objective": {"name": "bidsm", "sigma": 0.1, "warmup_steps": 2, "unroll_steps": 3,
                                               "unroll_optimizer": "adam", "unroll_checkpoint": True}}, (3,)),
}


@pytest.mark.usefixtures("ray_cluster")
def test_other_objectives_average_gradients_across_ranks_under_ddp_and_deepspeed(tmp_path):
    """Each of OTHER_OBJECTIVES under ddp and deepspeed ZeRO-2."""
    run_cases(tmp_path, {f"{name}-{strategy}": ({**tiny_config(strategy, stage), **sections}, ks)
                         for name, (sections, ks) in OTHER_OBJECTIVES.items()
                         for strategy, stage in (("ddp", 1), ("deepspeed", 2))})
