"""Recomputation of one unrolled step in the backward pass (`objective.unroll_checkpoint`).

An unrolled step maps (φ_k, state_k) to (φ_{k+1}, state_{k+1}) through ∇_φ G(θ, φ_k), which it
takes with create_graph; its graph holds the ResNet's activations at ṽ_k and the inner
backward's. `checkpointed_step` keeps only the step's inputs: its forward runs the step and
drops the graph, its backward runs the step again (same random numbers) and differentiates it
in φ_k, state_k and θ. θ enters as explicit inputs so that dJ/dθ arrives at θ's AccumulateGrad
once, like any other gradient (what DDP's and DeepSpeed's hooks expect).

torch.utils.checkpoint does not fit: the step calls autograd.grad in its own forward, which the
non-reentrant checkpoint answers by recomputing there and keeping the result (measured: more
memory, not less), and the reentrant one runs without a graph.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor

Step = Callable[[dict[str, Tensor], dict[str, Any]], tuple[dict[str, Tensor], dict[str, Any]]]


def _flatten(tree: Any, out: list[Tensor]) -> Any:
    """Replace every tensor of a dict tree by its index in `out`; other leaves stay as they are."""
    if isinstance(tree, dict):
        return {k: _flatten(v, out) for k, v in tree.items()}
    if isinstance(tree, Tensor):
        out.append(tree)
        return _Slot(len(out) - 1)
    return tree


def _unflatten(template: Any, tensors: Sequence[Tensor]) -> Any:
    if isinstance(template, dict):
        return {k: _unflatten(v, tensors) for k, v in template.items()}
    return tensors[template.index] if isinstance(template, _Slot) else template


class _Slot:
    __slots__ = ("index",)

    def __init__(self, index: int):
        self.index = index


@contextmanager
def _replayed_rng(state: tuple[Tensor, list[Tensor], list[int]]) -> Any:
    cpu, cuda, devices = state
    with torch.random.fork_rng(devices=devices):
        torch.set_rng_state(cpu)
        for d, s in zip(devices, cuda):
            torch.cuda.set_rng_state(s, d)
        yield


def _rng_state(tensors: Sequence[Tensor]) -> tuple[Tensor, list[Tensor], list[int]]:
    devices = sorted({t.device.index or 0 for t in tensors if t.is_cuda})
    return torch.get_rng_state(), [torch.cuda.get_rng_state(d) for d in devices], devices


class _Recomputed(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, holder: dict[str, Any], *inputs: Tensor) -> tuple[Tensor, ...]:  # type: ignore[override]
        ctx.holder = holder
        ctx.save_for_backward(*inputs[: holder["n_state"]])
        ctx.rng = _rng_state(inputs)
        with torch.enable_grad():
            outs = holder["run"]([t.detach().requires_grad_(t.requires_grad) for t in inputs[: holder["n_state"]]])
        return tuple(o.detach() for o in outs)

    @staticmethod
    def backward(ctx: Any, *grad_outs: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        holder = ctx.holder
        state_in = [t.detach().requires_grad_(t.requires_grad) for t in ctx.saved_tensors]
        theta: list[Tensor] = holder["theta"]
        with _replayed_rng(ctx.rng), torch.enable_grad():
            outs = holder["run"](state_in)
        wanted = [t for t in state_in if t.requires_grad] + theta
        grads = iter(torch.autograd.grad(outs, wanted, grad_outs, allow_unused=True))
        state_grads = [next(grads) if t.requires_grad else None for t in state_in]
        return (None, *state_grads, *grads)


def checkpointed_step(
    step: Step, phi: dict[str, Tensor], state: dict[str, Any], theta: Sequence[Tensor]
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """step(φ_k, state_k) → (φ_{k+1}, state_{k+1}), differentiable in φ_k, state_k's tensors and
    `theta` (the parameters the step reads from its modules), with only the inputs kept."""
    tensors: list[Tensor] = []
    template_in = _flatten({"phi": phi, "state": state}, tensors)
    holder: dict[str, Any] = {"n_state": len(tensors), "theta": list(theta)}
    template_out: list[Any] = []

    def run(flat: list[Tensor]) -> list[Tensor]:
        tree = _unflatten(template_in, flat)
        new_phi, new_state = step(tree["phi"], tree["state"])
        outs: list[Tensor] = []
        template_out[:] = [_flatten({"phi": new_phi, "state": new_state}, outs)]
        return outs

    holder["run"] = run
    outs = _Recomputed.apply(holder, *tensors, *holder["theta"])
    tree = _unflatten(template_out[0], outs)
    return tree["phi"], tree["state"]
