"""Hyperparameter sweeps: declarative specs (`spec`), the Ray Tune runner and its report."""

from distributed_bism.tune.load import load_spec
from distributed_bism.tune.spec import Domain, Resources, SchedulerSpec, SearcherSpec, SweepSpec

__all__ = ["Domain", "Resources", "SchedulerSpec", "SearcherSpec", "SweepSpec", "load_spec"]
