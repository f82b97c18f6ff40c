"""Name registries: the names a config may use, each mapped to where its implementation lives.

Every module here is a LEAF: it imports nothing from the package and no torch, so validating a
config (distributed_bism.config.validate) reads names without loading any implementation. An
implementation is imported on first use, by `resolve`, from its "package.module:attribute" path.

    datasets.py    data.name, eval.ood_dataset           → a loader, DataConfig → (train, test)
    samplers.py    eval.sampler, eval.compare_samplers    → a Sampler class
    metrics.py     eval.metrics, eval.final_metrics       → a Metric (evaluation/metrics.py)
    objectives.py  objective.name                         → an ObjectiveSpec: what the method needs,
                                                            and the path of its builder

Adding one: write the implementation in its own module and add one line to the table here.
"""

from __future__ import annotations

import importlib
from typing import Any


def resolve(path: str) -> Any:
    """The object at "package.module:attribute" (the attribute may be dotted), importing the module."""
    module, sep, attr = path.partition(":")
    if not sep or not attr:
        raise ValueError(f"registry path {path!r}: expected 'package.module:attribute'")
    obj: Any = importlib.import_module(module)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj
