"""The cheap learning signals (evaluation/learning_signal.py) and the lr warm-up, on models whose
answers are known in closed form."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from distributed_bism.config import Config, from_dict
from distributed_bism.evaluation.learning_signal import denoise_gain, mean_energy
from distributed_bism.evaluation.metrics import EvalContext, run_metrics
from distributed_bism.training.optim import LRSchedule


class Quadratic(nn.Module):
    """E(v) = ½ scale·‖v‖²: the Gaussian N(0, I/scale), a marginal energy (no h_dim)."""

    def __init__(self, scale: float):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(scale))

    def forward(self, v: Tensor) -> Tensor:
        return 0.5 * self.scale * v.flatten(1).pow(2).sum(-1)


def test_denoise_gain_of_a_gaussian_model_matches_its_closed_form() -> None:
    """Data N(0, s²I), model score −v/s², v̂ = ṽ + σ²·score: gain = r − r² with r = σ²/s²."""
    s, sigma = 1.0, 0.5
    v = s * torch.randn(20_000, 4, generator=torch.Generator().manual_seed(123))  # not the noise seed
    r = sigma**2 / s**2
    gain = denoise_gain(Quadratic(1 / s**2), None, v, sigma, sigma)
    assert gain == pytest.approx(r - r**2, abs=0.01)
    assert denoise_gain(Quadratic(0.0), None, v, sigma, sigma) == pytest.approx(0.0, abs=1e-6)  # a zero score
    assert denoise_gain(Quadratic(-1.0), None, v, sigma, sigma) < -0.2  # a score pointing away from the data


def _config(**objective: object) -> Config:
    return from_dict(Config, {"data": {"name": "digits"}, "model": {"name": "marginal_mlp"},
                              "objective": {"name": "mdsm", **objective}, "tracking": {"enabled": False}})


def _ctx(cfg: Config, energy: nn.Module, test: Tensor) -> EvalContext:
    return EvalContext(cfg=cfg, energy=energy, posterior=None, train_data=None, test_data=test,
                       image_shape=tuple(test.shape[1:]), step=0, device=torch.device("cpu"))


def test_denoise_and_energy_gap_metrics_report_levels_and_means() -> None:
    cfg = _config(sigma_begin=0.1, sigma_end=0.4, sigma0=0.2)
    test = 0.5 + 0.1 * torch.randn(200, 1, 2, 2, generator=torch.Generator().manual_seed(1))
    values = run_metrics(["denoise", "energy_gap"], _ctx(cfg, Quadratic(1.0), test))
    levels = [k for k in values if k.startswith("eval/denoise_gain@")]
    assert levels == ["eval/denoise_gain@0.1", "eval/denoise_gain@0.2", "eval/denoise_gain@0.4"]
    assert values["eval/denoise_gain"] == pytest.approx(sum(values[k] for k in levels) / 3)
    # E = ½‖v‖² over 4 pixels: data near 0.5 → ≈ 0.52; uniform noise → 4 · ½ · E[u²] = 2/3
    assert values["eval/energy_data"] == pytest.approx(mean_energy(Quadratic(1.0), None, test))
    assert values["eval/energy_noise"] == pytest.approx(2 / 3, abs=0.05)
    assert values["eval/energy_gap"] == pytest.approx(values["eval/energy_noise"] - values["eval/energy_data"])
    # evaluation leaves the training RNG where it was, and repeats itself
    state = torch.get_rng_state()
    again = run_metrics(["denoise", "energy_gap"], _ctx(cfg, Quadratic(1.0), test))
    assert again == values and torch.equal(torch.get_rng_state(), state)


def test_lr_warmup_ramps_linearly_then_follows_the_schedule() -> None:
    const = LRSchedule(1.0, "constant", total=10, warmup=4)
    assert [const.at(t) for t in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    cosine, plain = LRSchedule(1.0, "cosine", total=10, min_lr=0.0, warmup=2), LRSchedule(1.0, "cosine", total=10)
    assert cosine.at(0) == pytest.approx(0.5 * plain.at(0))
    assert [cosine.at(t) for t in range(2, 11)] == [plain.at(t) for t in range(2, 11)]
    assert LRSchedule(1.0, "constant").at(0) == 1.0  # no warm-up: the reference
