"""The just-in-time checkpoint: every rank checkpoints at the step after any rank heard that the run
is about to lose a node.

Where the notice comes from is the launcher's business (launch/preemption.py: Ray Train's drain
watcher); the loop sees only a `notice()` callable, true once this rank has been told. Ranks hear
it at different moments (Ray tells each worker by its own message), so the decision is a
collective: at every step boundary each rank votes its flag and the checkpoint is due on every
rank iff any flag is set. The vote rides in the step's own skip decision (one MIN all-reduce of
two flags, TrainLoop.run_step), so watching for a notice adds no collective to the hot path. It
is due once per worker group: Ray's notice stays set, and the run trains on after it until the node is gone and Ray restarts
the group from that checkpoint.
"""

from __future__ import annotations

from collections.abc import Callable

Notice = Callable[[], bool]  # true once this rank has been told a node of the run is being preempted


class PreemptionCheck:
    """At each step boundary, on every rank: `vote()` this rank's flag, agree on it across ranks
    (the caller's collective), then `settle(agreed)`: True at the first boundary at which any
    rank's `notice()` is true, on every rank at once; False before and ever after. Without a
    notice (None on every rank: the local strategy, tests), and once the checkpoint was taken,
    there is nothing to vote on: `vote()` is None on every rank alike."""

    def __init__(self, notice: Notice | None) -> None:
        self.notice = notice
        self.done = False  # the checkpoint was taken: no more votes (every rank set it at the same step)

    def vote(self) -> bool | None:
        """True while this rank has not been told (the flags are MIN-reduced: any told rank
        makes the agreed value False); None when there is nothing to vote on."""
        if self.notice is None or self.done:
            return None
        return not self.notice()

    def settle(self, untold_everywhere: bool) -> bool:
        """Whether the just-in-time checkpoint is due now, from the agreed vote."""
        self.done = not untold_everywhere
        return self.done
