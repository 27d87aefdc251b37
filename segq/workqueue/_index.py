"""The claim index: which PENDING record a claim takes next, without scanning the backlog.

Theory of operation
-------------------
A claim takes the highest-priority claimable job; within a priority, jobs
whose ``run_at`` came first (in time order), then jobs without one (in send
order).  The replica (``_claims.GroupState``) knows the records below the
claim head; what lies at or past the head is known only by reading the
queue.  So each process keeps this index beside its replica:

- ``scan``: how far this process has read the queue.  Each claim first reads
  what was sent since (each record is read once per process, whatever the
  backlog), and files each record by its options (``add_read``);
- plain records (priority 0, no ``run_at``, the only kind a ``send`` makes)
  go to a FIFO of positions: the common case stays a deque append and pop;
  records are read in batches (``add_batch``: built in one C call each), and
  a batch without headers is filed with one ``deque.extend``, so indexing a
  backlog of a million costs little more than reading it;
- records with options go to one heap per priority, keyed by due time
  (``inf`` for no ``run_at``, so they follow the timed ones in send order),
  or, while not yet due, to the ``future`` heap keyed by ``run_at``;
- records another process's claim went past (the replica's ``skip_log``,
  from SKIP entries) are filed from the journal, with the priority and
  ``run_at`` the entry carries, if this process has not read them.

Entries are never removed when another process claims their record: an
entry is *live* while its record is PENDING (at or past the head, or in the
replica's ``skipped``), and a dead one is dropped when it reaches the top.
So a claim costs O(log n) in the heap it takes from and O(1) in the others,
however many lower-priority or future jobs wait.
"""

from __future__ import annotations

import heapq
import math
from collections import deque
from itertools import islice
from typing import Any

from .._headers import Framed, split_body
from .._options import PRIORITY, RUN_AT, decode_options
from ._claims import MAX_PRIORITY, GroupState, Skipped, new_skipped

__all__ = ["ClaimIndex", "PLAIN"]

INF = math.inf
PLAIN = Skipped(0, 0, 0.0)  # the options of a record sent without any
_PRIORITY_NAME = PRIORITY.encode("ascii")
_RUN_AT_NAME = RUN_AT.encode("ascii")


def record_options(body: bytes, path: str, start: int) -> tuple[int, float]:
    """Return ``(priority, run_at)`` of the record with headers ``body`` at word ``start`` of queue ``path``.

    The same as ``decode_options`` of its headers, without building the
    other options: a value that does not parse goes to ``decode_options``,
    which ignores it with a warning.
    """
    headers = split_body(body, path, start)[1]
    priority = 0
    raw = headers.get(PRIORITY)
    if raw is not None:
        if len(raw) != 1 or not 0x30 <= raw[0] <= 0x39:
            options = decode_options(headers)
            return options.priority, options.run_at
        priority = raw[0] - 0x30
    raw = headers.get(RUN_AT)
    if raw is None:
        return priority, 0.0
    try:
        run_at = float(raw)
    except ValueError:
        run_at = -1.0
    if not 0.0 <= run_at < INF:  # NaN too
        options = decode_options(headers)
        return options.priority, options.run_at
    return priority, run_at


def _push_all(heap: list[Any], items: list[Any]) -> None:
    """Push ``items`` on ``heap``: one heapify when they outnumber it (the order popped is the same)."""
    if len(items) >= len(heap):
        heap += items
        heapq.heapify(heap)
    else:
        for item in items:
            heapq.heappush(heap, item)


class ClaimIndex:
    """One process's index of the PENDING records of a group, by priority and due time."""

    def __init__(self) -> None:
        self.reset(None)

    def reset(self, state: GroupState | None) -> None:
        """Forget everything and start over from ``state``'s head (a new replica, e.g. after a compaction)."""
        self.state = state
        self.scan = state.head if state is not None else 0
        self.read_from = self.scan  # this index read the records in [read_from, scan)
        self.scan_ordinal = state.head_ordinal if state is not None else 0  # records counted up to scan
        self.skips_seen = 0
        self.plain_skipped: deque[int] = deque()  # plain records below the head, lowest first
        self.plain: deque[int] = deque()  # plain records read at or past the head, lowest first
        self.heaps: list[list[tuple[float, int]]] = [[] for _ in range(MAX_PRIORITY + 1)]
        self.future: list[tuple[float, int, int]] = []  # (run_at, start, priority), not yet due
        self.options: dict[int, Skipped] = {}  # start -> (end, priority, run_at) of records with options
        self.in_heaps = 0  # entries in self.heaps, live or not
        self.seen: list[tuple[int, float]] = []  # (scan, time): when this index first read up from scan

    # -- keeping up --------------------------------------------------------

    def follow(self, state: GroupState) -> None:
        """Take in what the replica learnt from the journal: skipped records, a head moved past ``scan``."""
        if state is not self.state:
            self.reset(state)
        skip_log = state.skip_log
        if self.skips_seen < len(skip_log):
            plain_append = self.plain_skipped.append
            read_from, scan = self.read_from, self.scan
            for start, item in islice(skip_log, self.skips_seen, None):
                if item[1] == 0 and item[2] == 0.0:  # priority, run_at
                    plain_append(start)
                elif not read_from <= start < scan:  # not read here: file it from the journal
                    self._file(start, item, 0.0)
            self.skips_seen = len(skip_log)
        if state.head > self.scan:
            self.scan = state.head
            self.scan_ordinal = state.head_ordinal

    def add_read(self, start: int, end: int, priority: int, run_at: float, now: float) -> None:
        """File a record this process read at ``scan``."""
        self.scan = end
        self.scan_ordinal += 1
        if priority == 0 and run_at == 0.0:
            self.plain.append(start)
        else:
            self._file(start, Skipped(end, priority, run_at), now)

    def add_batch(
        self, payloads: list[bytes], starts: list[int], ends: list[int], framed: bool, now: float, path: str
    ) -> None:
        """File records of queue ``path`` this process read at ``scan``, in order, as columns.

        ``starts`` and ``ends`` hold their position words (a batch may span
        segments: an end is not always the next start); ``framed`` tells
        whether any has headers: without, the batch is plain records, filed
        in one call.
        """
        self.scan = ends[-1]
        self.scan_ordinal += len(payloads)
        if not framed:
            self.plain.extend(starts)
            return
        plain_append = self.plain.append
        options = self.options
        future: list[tuple[float, int, int]] = []
        due: list[tuple[float, int]] = []
        due_priority = -1  # the priority of every entry in ``due``; mixed ones are pushed at once
        for data, start, end in zip(payloads, starts, ends):
            # A record with headers may be a job with options; a byte search
            # (in C) rules most out before the header block is parsed.
            if type(data) is Framed and (data.find(_PRIORITY_NAME) >= 0 or data.find(_RUN_AT_NAME) >= 0):
                priority, run_at = record_options(data, path, start)
                if priority or run_at:
                    options[start] = new_skipped((end, priority, run_at))
                    if run_at > now:
                        future.append((run_at, start, priority))
                    elif due_priority in (priority, -1):
                        due_priority = priority
                        due.append((run_at or INF, start))
                    else:
                        heapq.heappush(self.heaps[priority], (run_at or INF, start))
                        self.in_heaps += 1
                    continue
            plain_append(start)
        if future:
            _push_all(self.future, future)
        if due:
            _push_all(self.heaps[due_priority], due)
            self.in_heaps += len(due)

    def _file(self, start: int, item: Skipped, now: float) -> None:
        self.options[start] = item
        if item.run_at > now:
            heapq.heappush(self.future, (item.run_at, start, item.priority))
        else:
            heapq.heappush(self.heaps[item.priority], (item.run_at or INF, start))
            self.in_heaps += 1

    def _move_due(self, now: float) -> None:
        future = self.future
        while future and future[0][0] <= now:
            run_at, start, priority = heapq.heappop(future)
            heapq.heappush(self.heaps[priority], (run_at, start))
            self.in_heaps += 1

    # -- picking -----------------------------------------------------------

    def best(self, now: float, state: GroupState, taken: set[int]) -> tuple[int, int]:
        """Return ``(priority, start)`` of the record a claim takes next, or ``(-1, 0)`` if none is due.

        ``taken`` holds records already picked in this transaction.
        """
        head, skipped = state.head, state.skipped
        if self.future and self.future[0][0] <= now:
            self._move_due(now)
        if self.in_heaps:
            for priority in range(MAX_PRIORITY, -1, -1):
                heap = self.heaps[priority]
                while heap:
                    start = heap[0][1]
                    if (start >= head or start in skipped) and start not in taken:
                        return priority, start
                    heapq.heappop(heap)  # claimed by now (here or elsewhere)
                    self.in_heaps -= 1
                    if start not in taken:
                        self.options.pop(start, None)
        for fifo in (self.plain_skipped, self.plain):
            while fifo:
                start = fifo[0]
                if (start >= head or start in skipped) and start not in taken:
                    return 0, start
                fifo.popleft()
        return -1, 0

    def take(self, priority: int, start: int) -> None:
        """Remove the entry ``best`` returned."""
        if start in self.options:
            heapq.heappop(self.heaps[priority])
            self.in_heaps -= 1
        else:
            fifo = self.plain_skipped if self.plain_skipped and self.plain_skipped[0] == start else self.plain
            fifo.popleft()

    def options_of(self, start: int) -> Skipped:
        """Return ``(end, priority, run_at)`` of a record this process filed (``PLAIN`` for a plain one)."""
        return self.options.get(start, PLAIN)

    def forget(self, start: int) -> None:
        """Drop what is known of a record now claimed."""
        self.options.pop(start, None)

    # -- waiting and counting ----------------------------------------------

    def next_due(self) -> float:
        """Return when the next scheduled record becomes due (inf if none waits)."""
        return self.future[0][0] if self.future else INF

    def saw(self, now: float) -> None:
        """Note that reading from ``scan`` on happened at ``now`` (for the age of pending jobs)."""
        seen = self.seen
        if not seen or seen[-1][1] != now:
            seen.append((self.scan, now))

    def oldest_pending(self, state: GroupState, now: float) -> float:
        """Return when the oldest pending job became due (inf if none is): its run_at, or when first read."""
        head, skipped = state.head, state.skipped
        earliest = math.inf
        for heap in self.heaps:
            for key, start in heap[:1]:
                if key != INF and (start >= head or start in skipped):
                    earliest = min(earliest, key)
        lowest = math.inf
        for fifo in (self.plain_skipped, self.plain):
            while fifo and not (fifo[0] >= head or fifo[0] in skipped):
                fifo.popleft()
            if fifo:
                lowest = min(lowest, fifo[0])
        if self.scan_ordinal > state.head_ordinal:
            lowest = min(lowest, head)
        if lowest != math.inf:
            seen = self.seen
            while len(seen) > 1 and seen[1][0] <= head and seen[1][0] <= lowest:
                seen.pop(0)  # nothing pending is read before the next mark
            first = seen[0][1] if seen else now
            for position, when in seen:
                if position > lowest:
                    break
                first = when
            earliest = min(earliest, first)
        return earliest

    def counts(self, state: GroupState, now: float) -> tuple[int, int]:
        """Return ``(pending, scheduled)``: PENDING records due now and not yet due.  Index up to date."""
        if self.future and self.future[0][0] <= now:
            self._move_due(now)
        total = len(state.skipped) + self.scan_ordinal - state.head_ordinal
        scheduled = len(self.future)
        return total - scheduled, scheduled
