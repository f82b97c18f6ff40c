"""data.prepare: the data as the model sees it (flat for a GRBM, the set's own shape otherwise),
and models.build.build_models on those shapes."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from distributed_bism.config import Config, from_dict
from distributed_bism.data import load_dataset
from distributed_bism.data.prepare import example_shapes, model_input_shape, prepare_data
from distributed_bism.models import BernoulliPosterior, ConvEBLVM, GaussianRBM
from distributed_bism.models.build import build_models


def digits(model: dict) -> Config:
    return from_dict(Config, {"data": {"name": "digits", "n_train": 40, "n_test": 10}, "model": model,
                              "posterior": {"name": "bernoulli"}, "tracking": {"enabled": False}})


GRBM = {"name": "grbm", "h_dim": 4}
CONV = {"name": "conv", "h_dim": 3, "ch": 2, "blocks_per_stage": 0}


def test_a_grbm_sees_flat_vectors_and_samples_keep_the_image_shape():
    cfg = digits(GRBM)
    data = prepare_data(cfg)
    train, test = load_dataset(cfg.data)
    assert data.image_shape == (1, 8, 8) and data.input_shape == (64,)
    assert torch.equal(data.train, train.flatten(1)) and torch.equal(data.test, test.flatten(1))
    assert example_shapes(cfg) == ((1, 8, 8), (64,))
    energy, posterior = build_models(cfg, data.input_shape, with_posterior=True)
    assert isinstance(energy, GaussianRBM) and isinstance(posterior, BernoulliPosterior)
    assert energy.free_energy(data.train).shape == (40,)


def test_other_energies_see_the_data_sets_own_shape():
    cfg = digits(CONV)
    data = prepare_data(cfg)
    assert data.image_shape == data.input_shape == (1, 8, 8) and data.train.shape == (40, 1, 8, 8)
    assert model_input_shape(cfg, (2,)) == (2,)
    energy, posterior = build_models(cfg, data.input_shape, with_posterior=False)
    assert isinstance(energy, ConvEBLVM) and posterior is None


def test_example_shapes_load_one_example(monkeypatch, tmp_path: Path):
    seen = []
    import distributed_bism.data.prepare as prepare

    real = prepare.load_dataset
    monkeypatch.setattr(prepare, "load_dataset", lambda c: seen.append((c.n_train, c.n_test)) or real(c))
    cfg = digits(GRBM)
    assert example_shapes(dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, n_train=None))) == ((1, 8, 8), (64,))
    assert seen == [(1, 1)]
