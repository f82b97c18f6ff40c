"""distributed_bism: bi-level score matching for energy-based latent variable models, at scale."""

from __future__ import annotations

from typing import Any


def train(config: Any, **kwargs: Any) -> Any:
    """Train per `config` (a Config, a nested dict or a YAML path); see distributed_bism.api.train."""
    from distributed_bism.api import train as _train

    return _train(config, **kwargs)


__all__ = ["train"]
