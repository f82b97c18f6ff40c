"""The suite's layers and the fixtures every layer may use.

Each test file lives in one layer, and gets that layer's marker from its directory, so that
`pytest -m unit` (or `pytest tests/unit`) runs one layer:

  unit/         no Ray, no subprocess clusters, no MLflow server: the fast layer (`make test-fast`)
  distributed/  Ray Train worker groups (DDP, DeepSpeed), a killed worker, Ray Tune sweeps
  cluster/      cluster configs, `ray job submit` to a multi-node Ray on this machine
  e2e/          learning to a threshold, bench scripts run whole
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import pytest
import torch

LAYERS = ("unit", "distributed", "cluster", "e2e")
TESTS = Path(__file__).resolve().parent

# Ray Train's controller polls its workers every $RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (2 s in Ray
# 2.60), and a worker's ray.train.report waits until the previous report has been taken by a poll
# (a queue of one): every checkpoint and evaluation of a run under Ray could wait up to 2 s, and
# the end of every run is seen up to 2 s late. The tests' runs are tiny (tens of steps, a report
# every few), so most of their time was that wait. Polled every 0.2 s here instead: set before any
# Ray starts, so the in-process clusters, `bism` subprocesses, `ray start` nodes and the jobs they
# run all inherit it (Ray also propagates it from a driver to its controller and workers). A poll
# that takes longer is awaited in the next round; a worker counts as hung only after
# $RAY_TRAIN_WORKER_HEALTH_CHECK_TIMEOUT_S (10 min), which is left as it is. setdefault: an
# environment that sets it keeps its own.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark each test with its layer, the first directory of its path under tests/. A test file
    outside every layer gets no marker (so `-m unit` would skip it): warned about, by name."""
    outside: set[str] = set()
    for item in items:
        try:
            layer = item.path.resolve().relative_to(TESTS).parts[0]
        except ValueError:  # not under tests/
            continue
        if layer in LAYERS:
            item.add_marker(layer)
        else:
            outside.add(str(item.path.relative_to(TESTS.parent)))
    if outside:
        warnings.warn(f"test files in no layer (move them under tests/{{{','.join(LAYERS)}}}/): "
                      f"{', '.join(sorted(outside))}", pytest.PytestWarning, stacklevel=1)


@pytest.fixture
def float64():
    """Run the test in float64 and restore the default afterwards."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


@pytest.fixture
def one_thread():
    """Run the test on one intra-op thread and restore the count afterwards: the sampler loops do
    thousands of tiny tensor ops, where handing work to a thread pool costs more than it saves (on a
    busy 2-core machine 300 AIS chains × 1000 β took 57 s on 2 threads, 1.2 s on one)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
