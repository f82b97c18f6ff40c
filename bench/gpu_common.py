"""What the stages of gpu_check.py share: the repository on sys.path, one-line errors, a free
port, atomic JSON writes, and the tiny GRBM configuration of the gradient and DeepSpeed stages."""

from __future__ import annotations

import json
import socket
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as `python3 bench/gpu_check.py` with no install of the package
    sys.path.insert(0, str(REPO))


def last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else ""


def error_line(e: BaseException) -> str:
    """The last line of an exception's message (mp.spawn puts the child's traceback in it)."""
    return last_line(str(e)) or type(e).__name__


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=str) + "\n")
    tmp.replace(path)


def grad_config(strategy: str, world: int, k: int, out_dir: str, **trainer: Any) -> Any:
    """tests/distributed/test_distributed.py's tiny_config (BiDSM on the checkerboard GRBM), with K = k
    and no warm-up (N = 0): the one-step check's configuration."""
    from distributed_bism.config import Config, from_dict

    return from_dict(
        Config,
        {
            "data": {"name": "checkerboard", "n_train": 256, "n_test": 64},
            "model": {"name": "grbm", "h_dim": 4, "init": "small", "init_std": 0.1},
            "posterior": {"name": "bernoulli", "temperature": 0.5},
            "objective": {
                "name": "bidsm",
                "sigma": 0.1,
                "warmup_steps": 0,
                "unroll_steps": k,
                "unroll_optimizer": "adam",
            },
            "optim": {"lr": 1e-2, "posterior_lr": 1e-2},
            "trainer": {
                "name": f"gpu-check-{strategy}",
                "strategy": strategy,
                "num_workers": world,
                "batch_size": 16,
                "max_failures": 0,
                "output_dir": out_dir,
                **trainer,
            },
            "tracking": {"enabled": False},
        },
    )


def energy_grads(module: Any) -> dict[str, Any]:
    """θ's .grad by name, on the CPU in fp32 (zeros where a parameter got none: the GRBM's c at K = 0)."""
    import torch

    from distributed_bism.models import unwrap

    return {
        n: (torch.zeros_like(p) if p.grad is None else p.grad).detach().float().cpu().clone()
        for n, p in unwrap(module).named_parameters()
    }
