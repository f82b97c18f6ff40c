"""The just-in-time checkpoint: every rank checkpoints at the step after any rank heard that the run
is about to lose a node.

Where the notice comes from is the launcher's business (launch/preemption.py: Ray Train's drain
watcher); the loop sees only a `notice()` callable, true once this rank has been told. Ranks hear
it at different moments (Ray tells each worker by its own message), so the decision is a
collective: at every step boundary each rank contributes its flag and the checkpoint is due on
every rank iff any flag is set (one MIN all-reduce of one number). It is due once per worker group:
Ray's notice stays set, and the run trains on after it until the node is gone and Ray restarts
the group from that checkpoint.
"""

from __future__ import annotations

from collections.abc import Callable

from distributed_bism.distributed import all_ranks_agree

Notice = Callable[[], bool]  # true once this rank has been told a node of the run is being preempted


class PreemptionCheck:
    """`due()` at each step boundary, on every rank: True at the first step at which any rank's
    `notice()` is true, on every rank at once; False before and ever after. Without a notice
    (None on every rank: the local strategy, tests) it is always False and runs no collective."""

    def __init__(self, notice: Notice | None) -> None:
        self.notice = notice
        self.done = False  # the checkpoint was taken: no more collectives (every rank set it at the same step)

    def due(self) -> bool:
        if self.notice is None or self.done:
            return False
        told_anywhere = not all_ranks_agree(not self.notice())  # any rank = not (every rank untold)
        self.done = told_anywhere
        return told_anywhere
