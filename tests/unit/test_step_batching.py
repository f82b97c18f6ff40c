"""Exact batching of the inner passes and the checkpointed unroll change no number of the step.

Both run the whole iteration (N warm-up steps, K unrolled, J and dJ/dθ) from one seed; the step
draws every noisy batch first, so the three variants consume the same random stream.
"""

from __future__ import annotations

import gc
import weakref

import pytest
import torch

from distributed_bism.config import ConfigError, ObjectiveConfig
from distributed_bism.core.bilevel import CPU_STACK_ELEMENTS, BilevelStep, stack_groups, stack_limit, step_from_config
from distributed_bism.core.unroll import Adam
from distributed_bism.objectives import get_objective
from tests.helpers.tiny_models import tiny_conv, tiny_grbm

N, K = 3, 3


def _run(model: str, **step_kw):
    """θ's gradient, φ after the step, J, and the number of f(v) calls, from seed 5."""
    energy, q = tiny_conv() if model == "conv" else tiny_grbm()
    name, lower = ("bimdsm", "fisher") if model == "conv" else ("bidsm", "kl")
    objective = get_objective(ObjectiveConfig(name=name, sigma=0.3, lower_level=lower))
    opt = torch.optim.Adam(q.parameters(), lr=0.01)
    step = BilevelStep(objective, warmup_steps=N, unroll_steps=K, unroll_optimizer=Adam(0.01), **step_kw)
    calls = []
    if model == "conv":
        inner = energy.visible_features
        energy.visible_features = lambda v: (calls.append(v.shape[0]), inner(v))[1]  # type: ignore[method-assign]
    torch.manual_seed(5)
    v = torch.rand(4, 1, 8, 8) if model == "conv" else torch.rand(16, 2)
    out = step(energy=energy, v=v, posterior=q, posterior_optimizer=opt)
    grad = torch.cat([p.grad.flatten() for p in energy.parameters()])
    phi = torch.cat([p.detach().flatten() for p in q.parameters()])
    return grad, phi, out.loss, calls


@pytest.mark.parametrize("model", ["conv", "grbm"])
@pytest.mark.parametrize("variant", [{"inner_pass_elements": 0}, {"inner_pass_elements": 512}, {"unroll_checkpoint": True}])
def test_batched_step_equals_unbatched_and_checkpointed_on_the_same_noise(float64, model, variant):
    grad, phi, loss, _ = _run(model)
    grad2, phi2, loss2, _ = _run(model, **variant)
    assert grad.abs().max() > 0
    torch.testing.assert_close(grad, grad2, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(phi, phi2, rtol=0, atol=0)
    torch.testing.assert_close(loss, loss2, rtol=1e-13, atol=0)


def test_batched_step_computes_the_visible_features_in_one_call_per_stage(float64):
    """By default on a CPU (each input 4 × 1·8·8 = 256 elements, far below the cap): N warm-up
    inputs in one call, K unrolled inputs in one, the outer batch in its own."""
    *_, calls = _run("conv")
    assert calls == [N * 4, K * 4, 4]
    *_, unbatched = _run("conv", inner_pass_elements=0)
    assert unbatched == [4] * (N + K + 1)
    *_, pairs = _run("conv", inner_pass_elements=512)  # two inputs of 256 elements per call
    assert pairs == [8, 4, 8, 4, 4]


def test_stack_groups_cap_each_call_and_keep_every_input_once():
    assert stack_groups([3, 3, 3], None) == [[0, 1, 2]]
    assert stack_groups([3, 3, 3], 0) == [[0], [1], [2]]
    assert stack_groups([3, 3, 3], 6) == [[0, 1], [2]]
    assert stack_groups([3, 3, 3], 5) == [[0], [1], [2]]
    assert stack_groups([9, 2, 2], 4) == [[0], [1, 2]]  # an input above the cap still gets its call
    assert stack_groups([], 4) == []


def test_stack_limit_is_by_device_unless_configured():
    assert stack_limit(None, torch.device("cpu")) == CPU_STACK_ELEMENTS
    assert stack_limit(None, torch.device("cuda")) is None  # all stacked: each call costs a launch
    assert stack_limit(0, torch.device("cuda")) == 0
    assert stack_limit(4096, torch.device("cpu")) == 4096


def test_inner_pass_elements_is_a_config_key():
    objective_cfg = ObjectiveConfig(name="bimdsm", lower_level="fisher", unroll_steps=1, inner_pass_elements=512)
    step = step_from_config(get_objective(objective_cfg), objective_cfg, posterior_lr=1e-3)
    assert step.inner_pass_elements == 512
    with pytest.raises(ConfigError, match=r"^objective\.inner_pass_elements: must be >= 0"):
        ObjectiveConfig(inner_pass_elements=-1)


class _Held:
    __slots__ = ("t", "__weakref__")


def _kept_bytes_of_unroll(k: int, checkpoint: bool) -> int:
    """Bytes the autograd graph still holds after a k-step unroll of the conv posterior (what
    the backward pass of J will keep alive), via a saved-tensor hook whose handles are counted
    while alive."""
    energy, q = tiny_conv()
    objective = get_objective(ObjectiveConfig(name="bimdsm", lower_level="fisher"))
    step = BilevelStep(objective, unroll_steps=k, unroll_optimizer=Adam(0.01), unroll_checkpoint=checkpoint)
    torch.manual_seed(0)
    v = torch.rand(32, 1, 8, 8)
    alive: weakref.WeakSet[_Held] = weakref.WeakSet()

    def pack(t: torch.Tensor) -> _Held:
        held = _Held()
        held.t = t.detach()  # an output saved with its grad_fn would make a cycle gc cannot see
        alive.add(held)
        return held

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda held: held.t):
        phi_k = step.unrolled_posterior(energy, q, dict(q.named_parameters()), v)
    gc.collect()
    kept = sum(h.t.numel() * h.t.element_size() for h in alive)
    del phi_k
    return kept


def test_checkpointed_unroll_keeps_far_less_per_unrolled_step():
    per_step = (_kept_bytes_of_unroll(4, False) - _kept_bytes_of_unroll(2, False)) / 2
    per_step_ck = (_kept_bytes_of_unroll(4, True) - _kept_bytes_of_unroll(2, True)) / 2
    assert per_step > 0
    assert per_step_ck <= 0.3 * per_step, (per_step_ck, per_step)
