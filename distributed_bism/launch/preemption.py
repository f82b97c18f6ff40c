"""Preemption on Ray Train 2.60: the restarts it is allowed, and how a worker hears of it in time.

How Ray tells a preemption from a failure (ray/train/v2, 2.60). A node is *drained* through the
GCS with a reason and an optional deadline: the cloud autoscaler (autoscaler v2 drains a spot node
it is told will be reclaimed), `ray drain-node --reason DRAIN_NODE_REASON_PREEMPTION
--deadline-remaining-seconds N`, or the node itself: `ray start` handles SIGTERM (what Kubernetes
sends a pod being deleted, what a VM's shutdown sends its processes) by draining its own node with
reason PREEMPTION and a deadline of $RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S (30 s) before it stops
its processes. Ray Train's controller runs a `PreemptionWatcher` that polls the GCS's draining
nodes every $RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S (5 s) and, for a node holding some of the run's
workers, tells every worker (`mark_preempt`: its train context's `preemption_context`). The
controller then waits until the workers have all ended or the deadline (120 s after the notice
when the drain gave none) has passed, and restarts the group from the newest checkpoint, counting
the restart against `FailureConfig.max_preemption_failures`, not `max_failures`; so is a worker
death whose actor error says `preempted`. A group that returns normally meanwhile ends the run
as finished.

So a worker does not stop when told: it checkpoints at once (`TrainLoop`, through
training/preemption.py, which agrees on the step across ranks) and trains on; the restart
resumes from that checkpoint, or from a later one if the node outlived the next.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from distributed_bism.config import TrainerConfig

if TYPE_CHECKING:
    from ray.train.v2.api.config import FailureConfig


def failure_config(t: TrainerConfig) -> FailureConfig:
    """Ray Train's FailureConfig of the run: trainer.max_failures restarts after failures and, apart
    from them, trainer.max_preemption_failures after preemptions (None: no limit, Ray's -1)."""
    from ray.train.v2.api.config import FailureConfig

    preemptions = -1 if t.max_preemption_failures is None else t.max_preemption_failures
    return FailureConfig(max_failures=t.max_failures, max_preemption_failures=preemptions)


class RayPreemptionNotice:
    """This worker's notice of a preemption: true once Ray Train's watcher has told it that a node
    of its worker group is being drained for preemption (and ever after, for this group).

    It reads the worker's own copy of the notice (`preemption_context`, where `mark_preempt` puts
    it): a step-boundary check costs an attribute read. `ray.train.get_preemption_info()`, the
    public reader, is a barrier through Ray Train's synchronisation actor on every call, too dear
    for every step; the loop agrees across ranks itself (training/preemption.py). Built inside a
    Ray Train worker; fails there at once if Ray has moved what it reads."""

    def __init__(self) -> None:
        from ray.train.v2._internal.execution.context import get_train_context

        self._context = get_train_context().preemption_context

    def __call__(self) -> bool:
        return self._context.preemption_info is not None
