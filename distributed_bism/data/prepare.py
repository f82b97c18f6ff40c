"""The data of a run as its model sees it, from the Config: loaded once, shaped once.

A Gaussian RBM takes flat vectors (D,), every other energy the data set's own example shape
((C, H, W) or (2,)). Training, `bism eval`, `bism sample` and `bism diagnose` all go through
`prepare_data`, so the rule is written once; samples are drawn back as `image_shape`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

from torch import Tensor

from distributed_bism.config import Config
from distributed_bism.data import load_dataset


def model_input_shape(cfg: Config, image_shape: Sequence[int]) -> tuple[int, ...]:
    """What the energy sees per example: flat (prod(image_shape),) for a GRBM, `image_shape` otherwise."""
    return (math.prod(image_shape),) if cfg.model.name == "grbm" else tuple(image_shape)


@dataclass(frozen=True)
class PreparedData:
    """train (N, *input_shape) and test (M, *input_shape), float32 on the CPU, in the model's view.

    image_shape: one example as the data set has it, (C, H, W) or (2,), for drawing samples;
    input_shape: one example as the energy takes it (model_input_shape).
    """

    train: Tensor
    test: Tensor
    image_shape: tuple[int, ...]
    input_shape: tuple[int, ...]


def prepare_data(cfg: Config) -> PreparedData:
    """cfg.data loaded (data.load_dataset, deterministic given the config) and viewed as cfg.model takes it."""
    train, test = load_dataset(cfg.data)
    image_shape = tuple(train.shape[1:])
    input_shape = model_input_shape(cfg, image_shape)
    return PreparedData(
        train.reshape(len(train), *input_shape), test.reshape(len(test), *input_shape), image_shape, input_shape
    )


def example_shapes(cfg: Config) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(image_shape, input_shape) of cfg's data from a one-example load, for rebuilding a model
    without loading its whole data set."""
    one = prepare_data(replace(cfg, data=replace(cfg.data, n_train=1, n_test=1)))
    return one.image_shape, one.input_shape
