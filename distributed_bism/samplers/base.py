"""The sampler interface and `get_sampler(name, **settings)`.

The names and where each class lives are in distributed_bism/registry/samplers.py (a leaf, which
config validation reads); `get_sampler` imports a sampler's module when it is first asked for.

Every sampler returns a `SampleResult` whose `label` names the sampler and its settings, so that
a figure or file made from it says how it was made (conditional samples are not model samples).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from torch import Tensor, nn

from distributed_bism.registry import resolve
from distributed_bism.registry.samplers import SAMPLERS
from distributed_bism.samplers.langevin import LangevinSchedule


@dataclass(frozen=True)
class SampleResult:
    """samples (N, *data_shape); `label` a human-readable name of the sampler and its settings;
    `sampler` the registry name; `model_samples` False when the samples are not draws of the
    model's marginal p(v) (the conditional sampler)."""

    samples: Tensor
    label: str
    sampler: str
    model_samples: bool


class Sampler:
    """Base class. `sample` draws `num_samples` values of shape `data_shape`; `v_data` (N, ...)
    is needed by the conditional sampler and is an optional start for the others."""

    name: ClassVar[str]

    def sample(
        self,
        energy: nn.Module,
        posterior: nn.Module | None = None,
        *,
        num_samples: int,
        data_shape: Sequence[int],
        v_data: Tensor | None = None,
        seed: int = 0,
    ) -> SampleResult:
        raise NotImplementedError


_SCHEDULE_KEYS = {f.name for f in dataclasses.fields(LangevinSchedule)}


def register_sampler(name: str) -> Callable[[type[Sampler]], type[Sampler]]:
    """Class decorator: the sampler's registry name, which its line in registry/samplers.py must
    point at this class (`sampler_class` checks that)."""

    def add(cls: type[Sampler]) -> type[Sampler]:
        cls.name = name
        return cls

    return add


def sampler_class(name: str) -> type[Sampler]:
    """The class registered as `name` (a ValueError for a name the registry does not hold)."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; expected one of {', '.join(sorted(SAMPLERS))}")
    cls = resolve(SAMPLERS[name])
    if getattr(cls, "name", None) != name:
        raise TypeError(f"registry/samplers.py: {name!r} points at {SAMPLERS[name]}, which is not the sampler {name!r}")
    return cls


def get_sampler(name: str, **settings: Any) -> Sampler:
    """The sampler `name` with `settings` (its dataclass fields). Samplers with a Langevin
    schedule also take the schedule's fields flat (step, t_max, hot, anneal, settle, cool, denoise_sigma);
    what is not given keeps the reference's default."""
    cls = sampler_class(name)
    fields = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    flat = {k: settings.pop(k) for k in list(settings) if k in _SCHEDULE_KEYS}
    if flat:
        if "schedule" not in fields:
            raise ValueError(f"sampler {name!r} has no Langevin schedule; got {', '.join(sorted(flat))}")
        settings["schedule"] = dataclasses.replace(settings.get("schedule", LangevinSchedule()), **flat)
    unknown = sorted(set(settings) - fields)
    if unknown:
        raise ValueError(
            f"sampler {name!r}: unknown setting(s) {', '.join(unknown)}; "
            f"expected some of {', '.join(sorted(fields | (_SCHEDULE_KEYS if 'schedule' in fields else set())))}"
        )
    return cls(**settings)


def describe_schedule(s: LangevinSchedule) -> str:
    """A short text of a schedule for labels."""
    return (
        f"√α={s.step:g}, {s.hot}@T={s.t_max:g}, {s.anneal}→T=1"
        + (f", {s.settle}@T=1" if s.settle else "")
        + f", {s.cool}→T=0"
        + (f", denoise σ0={s.denoise_sigma:g}" if s.denoise_sigma > 0 else "")
    )
