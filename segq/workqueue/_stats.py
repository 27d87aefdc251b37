"""GroupStats: how many jobs of a group are where, read from the replica and the claim index.

Every count is kept as the state changes (``GroupState`` tables and totals,
``ClaimIndex`` ordinals and heaps), so reading them is O(1) once the index
has read what was sent since it last looked.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from ._claims import GroupState
from ._index import ClaimIndex

__all__ = ["GroupStats", "group_stats"]


@dataclass(frozen=True)
class GroupStats:
    """Where a group's jobs are.

    ``pending``: never claimed and due; ``scheduled``: never claimed, not yet
    due (``run_at`` in the future); ``claimed``: held by a worker;
    ``retrying``: given back, waiting for another attempt; ``done``: acked;
    ``dead``: sent to the dead-letter queue (``done`` and ``dead`` count
    since the group was created).  ``oldest_pending_age``: seconds since
    the oldest pending job became due (its ``run_at``, or for a job without
    one, when this process first read it), None when none is pending.
    """

    pending: int
    scheduled: int
    claimed: int
    retrying: int
    done: int
    dead: int
    oldest_pending_age: float | None

    def to_dict(self) -> dict[str, Any]:
        """Return the stats as a JSON-ready dict (the ``stats`` of ``segq info --json``)."""
        return asdict(self)


def group_stats(state: GroupState, index: ClaimIndex, now: float) -> GroupStats:
    """Return the stats of ``state``; ``index`` must have read the queue up to its tail."""
    pending, scheduled = index.counts(state, now)
    oldest = index.oldest_pending(state, now) if pending else math.inf
    return GroupStats(
        pending=pending,
        scheduled=scheduled,
        claimed=len(state.claims),
        retrying=len(state.waiting),
        done=state.acked_total,
        dead=state.dead_total,
        oldest_pending_age=None if oldest == math.inf else max(0.0, now - oldest),
    )
