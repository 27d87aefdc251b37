"""WorkQueue: competing consumers with leases, retries and a dead-letter queue.

Theory of operation
-------------------
A *group* is a set of workers, in any processes, sharing the records of a
queue: each record is held by at most one worker at a time.  The group's
state lives in ``groups/<group>/journal`` (``_journal``: an append-only,
memory-mapped log) and in ``cursors/g.<group>.pos`` (its low-water mark,
which holds back segment deletion like a receiver's position).  Each
``WorkQueue`` changes it only in transactions of its ``GroupHandle``
(``_group``: lock, catch up, append, unlock); this module is the policy:
what a claim takes and what a settle does.  The appended entry is the
commit: once ``claim``, ``ack``, ``nack`` or ``renew`` returns, it survives
a SIGKILL of any process.

Records are claimed lowest position first: records given back whose time has
come, then new ones from the claim head.  Each claimer first sweeps back
claims whose lease has ended and claims of dead workers (a worker is its PID
plus its start time; liveness is watched through pidfds, so a death is seen
at once and a reused PID is another process).  A claim that fails (nack,
lease run out, owner dead, ``close``) on its ``max_attempts``-th attempt is
sent to the dead-letter queue (a segq queue, ``dead/<group>`` by default),
then marked done: a crash between the two can leave a duplicate dead letter,
never a lost record.

Waiting for work costs nothing: a claimer with nothing to claim sleeps in
``poll`` on its wake FIFO (``_wake``: senders and givers-back write to it),
the pidfds of the workers holding claims, and a timeout at the earliest
lease end or retry time.
"""

from __future__ import annotations

import itertools
import logging
import math
import operator
import os
import select
import struct
import threading
import time
import weakref
from typing import Any, Callable, Iterable, Iterator, NamedTuple, Sequence

from .._args import SyncPolicy, check_path, check_timeout, parse_sync
from .. import _wake
from .._control import CLAIM_WAITERS, CONSUMER_SEGMENT_SIZE, DATA_WAITING, TAIL, TAIL_INDEX, WORD, Control, require_queue
from .._followups import Enqueue
from .._format import HEADER_SIZE
from .._headers import Framed
from .._lifetime import ClosedByWith, Ticker
from .._liveness import Liveness, my_owner
from .._messages import MessageFields
from .._options import PRIORITY, RUN_AT
from .._reader import RecordReader
from .._segment import StrPath, segment_path
from .._state import Position, check_name, same_segment
from .._wake import Waiter, Waker, group_tag
from ..errors import ClaimLost, Closed, CorruptionError, Empty, InvalidArgument, UsageError
from ._admin import remove_group, requeue_dead
from ._claims import (
    ACK_ONE,
    CLAIM_BODY,
    CLAIM_ONE,
    CLAIM_RECORD,
    LIST_HEAD,
    PAIR,
    RENEW_HEAD,
    Claim,
    Event,
    IllegalTransition,
    Owner,
    Skipped,
    attempt_word,
    describe_word,
    encode_return,
    encode_skips,
    new_skipped,
)
from ._deadletter import DeadLetterSender, dead_letter_path
from ._group import GroupHandle
from ._index import ClaimIndex, record_options
from ._stats import GroupStats, group_stats
from ._grouplock import group_dir
from ._jobs import JOB_TRANSITIONS, Job, JobBatch, JobState, next_job_state
from ._journal import END, RETURNS, SEALED_MARK, Kind, entry, entry_prefix_crc
from ._outbox import Outbox, OutboxEntry, crash_point, follow_ups

__all__ = ["WorkQueue", "WaitPlan", "LIVENESS_INTERVAL"]

log = logging.getLogger(__name__)

#: How often (seconds) a claimer checks whether the workers holding claims still live.
LIVENESS_INTERVAL = 0.001
monotonic = time.monotonic
_CLAIM_ONE_WORD, _CLAIM_ONE_CRC = entry_prefix_crc(Kind.CLAIM, CLAIM_ONE.size)
_ACK_ONE_WORD, _ACK_ONE_CRC = entry_prefix_crc(Kind.ACK, ACK_ONE.size)
_CLAIM_ONE_KIND = struct.unpack("<I", _CLAIM_ONE_WORD)[0]
_ACK_ONE_KIND = struct.unpack("<I", _ACK_ONE_WORD)[0]
_HELD = JobState.HELD
_job_transition = JOB_TRANSITIONS.get
_BATCH = 4096  # records read in one C call when a claim reads ahead or skips
_ONE_BY_ONE = 4  # records read ahead one at a time before reading in batches
_PRIORITY_NAME = PRIORITY.encode("ascii")
_RUN_AT_NAME = RUN_AT.encode("ascii")
_ZEROS = itertools.repeat(0)
_NO_TIMES = itertools.repeat(0.0)
_start_of = operator.attrgetter("_start")  # of a record read in a batch (a ``_messages.MessageFields``)
_end_of = operator.attrgetter("_end")
_data_of = operator.attrgetter("data")
_first = operator.itemgetter(0)
_second = operator.itemgetter(1)


def _claimed_places(steps: list[tuple[int, Skipped | None]]) -> list[int]:
    """Return where in ``steps`` the claims are (their item is None), the search in C."""
    if len(steps) < 64:  # the common case: a claim or two, few skips
        return [place for place, step in enumerate(steps) if step[1] is None]
    items = list(map(_second, steps))
    places: list[int] = []
    place = -1
    for _ in range(items.count(None)):
        place = items.index(None, place + 1)
        places.append(place)
    return places


class WaitPlan(NamedTuple):
    """What a claimer with nothing to claim watches (``WorkQueue._wait_plan``)."""

    waiter: Waiter  # its FIFO is written by senders and by whoever gives a record back
    pidfds: list[int]  # the workers holding claims: readable when one dies
    ready: Callable[[], bool]  # True when a claim may succeed (cheap: three loads)
    wake_at: float | None  # monotonic: the next lease end or retry time, None if none


class WorkQueue(ClosedByWith):
    """Share the records of the queue at ``path`` among the workers of ``group``.

    Each record goes to one worker at a time, in send order; a claim not
    acked within ``lease`` seconds, or whose worker process died, comes back
    with its attempt count raised; after ``max_attempts`` attempts the record
    goes to the dead-letter queue ``dead_letter`` (default
    ``<path>/dead/<group>``).  ``sync`` (``"never"``, ``"always"`` or seconds)
    decides when the group's journal is flushed to stable storage; a SIGKILL
    never loses an operation that returned.  ``clock`` (default ``time.time``)
    is the wall clock leases are measured in.  A missing ``path`` raises
    ``SegqError`` unless ``create=True`` (a WorkQueue does not create a queue).

    A WorkQueue may be shared by the threads of a process; many processes may
    open the same group.

    >>> import segq, tempfile
    >>> path = tempfile.mkdtemp()
    >>> with segq.Sender(path, segment_size=1 << 16) as tx:
    ...     tx.send(b"resize photo 1")
    >>> with segq.WorkQueue(path, lease=60) as wq:
    ...     with wq.claim(timeout=1) as job:
    ...         print(job.data, job.attempt)
    b'resize photo 1' 1
    """

    def __init__(
        self,
        path: StrPath,
        group: str = "default",
        *,
        lease: float = 30.0,
        max_attempts: int = 5,
        dead_letter: StrPath | None = None,
        sync: SyncPolicy = "never",
        clock: Callable[[], float] = time.time,
        create: bool = False,
        _owner: Owner | None = None,
    ) -> None:
        self._closed = True
        self._forked = False
        self.path = check_path(path)
        self.group = check_name(group, "group name")
        if not isinstance(lease, (int, float)) or isinstance(lease, bool) or not 0 < lease < 1e9:
            raise InvalidArgument(f"lease must be a finite number of seconds > 0, not {lease!r}", name="lease")
        if not isinstance(max_attempts, int) or isinstance(max_attempts, bool) or max_attempts < 1:
            raise InvalidArgument(f"max_attempts must be an int >= 1, not {max_attempts!r}", name="max_attempts")
        self.lease = float(lease)
        self.max_attempts = max_attempts
        self.dead_letter = (
            check_path(dead_letter, "dead_letter") if dead_letter is not None else dead_letter_path(self.path, group)
        )
        self._sync_interval = parse_sync(sync)
        self._clock = clock
        self._owner: Owner = _owner if _owner is not None else my_owner()
        require_queue(self.path, create=create, who="WorkQueue")  # a typo'd path is an error, not a new queue
        self._control = Control(self.path, segment_size=CONSUMER_SEGMENT_SIZE)
        try:
            self._group = GroupHandle(self.path, group, group_dir(self.path, group), sync_interval=self._sync_interval)
        except BaseException:
            self._control.close()
            raise
        consumer = f"group {group!r}"
        self._head_reader = RecordReader(self._control, 0, consumer=consumer)
        self._reader = RecordReader(self._control, 0, consumer=consumer)
        self._scan_reader = RecordReader(self._control, 0, consumer=consumer)
        self._tail_words = self._control.words
        self._index = ClaimIndex()
        self._liveness = Liveness()
        self._waiters = threading.local()
        self._all_waiters: list[Waiter] = []
        self._waker = Waker(self._control)
        self._dead_letters = DeadLetterSender(self.path, group, self.dead_letter, sync)
        self._outbox = Outbox(self.path, self.group, sync)
        self._group_tag = group_tag(self.group)  # claimers of this group wait under it
        self._held: set[Job] = set()  # jobs handed out and not settled, given back by close()
        self._next_liveness_check = 0.0  # monotonic time of the next look at other workers' PIDs
        self._syncer: Ticker | None = None
        self._closed = False
        _open_queues.add(self)
        self._group.on_outbox = self._settle_outbox
        if self._group.state.outbox is not None:
            try:
                self._group.begin()  # finishes what a crashed ack with follow-ups left
            except BaseException:
                self._abandon()  # a target that cannot be written: this object never opened
                raise
            self._group.end()
        if self._sync_interval:
            self._syncer = Ticker(self._sync_interval, self._sync_tick, "segq-group-sync")

    def _begin(self) -> None:
        """Start a transaction (see ``GroupHandle.begin``); refuse a closed or forked WorkQueue."""
        if self._closed:
            self._raise_closed()
        self._group.begin()

    def _raise_closed(self) -> None:
        if self._forked:
            raise UsageError("a WorkQueue cannot be used across fork(): open a new one in the child")
        raise Closed(f"work queue {self.group!r} is closed")

    # -- claiming --------------------------------------------------------

    def claim(self, timeout: float | None = None) -> Job:
        """Return the next record to work on, waiting for one; ``Empty`` after ``timeout`` seconds.

        The job is held until acked or nacked, or until its lease runs out.
        """
        if timeout is not None:
            timeout = check_timeout(timeout)
        job = self._try_claim()
        if job is not None:
            return job
        deadline = None if timeout is None else monotonic() + timeout
        while True:
            if deadline is not None and monotonic() >= deadline:
                raise Empty(f"no record for group {self.group!r} in {self.path} after {timeout} s")
            self._wait(deadline)
            job = self._try_claim()
            if job is not None:
                return job

    def try_claim(self) -> Job | None:
        """Return the next record to work on if one is claimable now, else None; never blocks."""
        return self._try_claim()

    def claim_batch(self, max_count: int, timeout: float | None = None) -> JobBatch:
        """Return 1 to ``max_count`` jobs claimed in one transaction, sharing one lease.

        Waits like ``claim`` for the first; takes as many more as are claimable.
        """
        if not isinstance(max_count, int) or max_count < 1:
            raise InvalidArgument(f"claim_batch needs max_count >= 1, not {max_count!r}", name="max_count")
        if timeout is not None:
            timeout = check_timeout(timeout)
        jobs = self._claim_many(max_count)
        if jobs:
            return JobBatch(self, jobs)
        deadline = None if timeout is None else monotonic() + timeout
        while True:
            if deadline is not None and monotonic() >= deadline:
                raise Empty(f"no record for group {self.group!r} in {self.path} after {timeout} s")
            self._wait(deadline)
            jobs = self._claim_many(max_count)
            if jobs:
                return JobBatch(self, jobs)

    def __iter__(self) -> Iterator[Job]:
        """Yield jobs forever; each is acked when the loop asks for the next, nacked if the body raised."""
        while True:
            job = self.claim()
            finished = False
            try:
                yield job
                finished = True
            finally:
                if job.state is _HELD and not self._closed:
                    if finished:
                        job.ack()
                    else:
                        try:
                            job.nack(reason="the loop over the work queue was left")
                        except ClaimLost:
                            pass

    def _sweep_due(self, now: float) -> bool:
        """Tell whether a claimer must sweep: a lease may have ended or another worker may have died."""
        state = self._group.state
        owners = state.owners
        return now >= state.next_expiry or (
            (len(owners) > 1 or (bool(owners) and self._owner not in owners)) and monotonic() >= self._next_liveness_check
        )

    def _try_claim(self) -> Job | None:
        # The hot path: a plain record right at the head, in one small append.
        if self._closed:
            self._raise_closed()
        group = self._group
        woke = False
        state = group.begin()
        try:
            now = self._clock()
            owners = state.owners
            if now >= state.next_expiry or (
                (len(owners) > 1 or (owners and self._owner not in owners))
                and monotonic() >= self._next_liveness_check
            ):
                woke = self._sweep(now)
            index = self._index
            if index.state is not state or index.skips_seen != len(state.skip_log) or state.head > index.scan:
                index.follow(state)
            if self._tail_words[TAIL_INDEX] > index.scan:
                self._read_ahead(now)
            plain = index.plain
            if (
                state.waiting
                or index.in_heaps
                or index.plain_skipped
                or not plain
                or plain[0] != state.head
                or (index.future and index.future[0][0] <= now)
            ):
                jobs = self._claim_records(now, 1, [])
                if jobs:
                    self._held.add(jobs[0])
                    woke = woke or self._backlog_remains(now)
                    return jobs[0]
                return None
            start = plain.popleft()
            reader = self._head_reader
            reader.position = start
            data = reader.next()
            if data is None:
                raise self._missing(start)
            end = reader.position
            token = state.next_token
            expires = now + self.lease
            owner = self._owner
            body = CLAIM_ONE.pack(token, expires, owner[0], owner[1], 1, start, end, 1)
            group.append_small(Kind.CLAIM, _CLAIM_ONE_KIND, _CLAIM_ONE_CRC, body)
            mark = state.mark
            state.claim(token, expires, owner, start, end, 1)
            if state.mark != mark and (not same_segment(state.mark, mark) or monotonic() >= group.cursor_due):
                group.mark_moved(mark)
            woke = woke or self._backlog_remains(now)
        finally:
            group.end()
            if woke:
                self._wake_claimers()
        job = Job(self, data, start, token, 1, expires)
        self._held.add(job)
        return job

    def _claim_many(self, max_count: int) -> list[Job]:
        self._begin()
        group = self._group
        woke = False
        try:
            state = group.state
            now = self._clock()
            if self._sweep_due(now):
                woke = self._sweep(now)
            self._index.follow(state)
            if self._tail_words[TAIL_INDEX] > self._index.scan:
                self._read_ahead(now)
            jobs = self._claim_records(now, max_count, [])
            woke = woke or (bool(jobs) and self._backlog_remains(now))
        finally:
            group.end()
            if woke:
                self._wake_claimers()
        for job in jobs:
            self._held.add(job)
        return jobs

    def _read_ahead(self, now: float) -> None:
        """File every record sent since the index last looked (each is read once).  In a transaction."""
        index = self._index
        reader = self._scan_reader
        reader.position = index.scan
        index.saw(now)
        # A claimer keeping up finds a record or two: read one by one, the cheapest
        # for that; past a few, a backlog, read in batches.
        for _ in range(_ONE_BY_ONE):
            data = reader.next()
            if data is None:
                index.scan = reader.position  # past an end-of-segment marker too
                return
            end = reader.position
            start = end - HEADER_SIZE - len(data)
            # As in ``ClaimIndex.add_batch``: a byte search rules most records with headers out.
            if type(data) is Framed and (data.find(_PRIORITY_NAME) >= 0 or data.find(_RUN_AT_NAME) >= 0):
                priority, run_at = record_options(data, self.path, start)
                if priority or run_at:
                    index.add_read(start, end, priority, run_at, now)
                    continue
            index.plain.append(start)
            index.scan = end
            index.scan_ordinal += 1
        while True:
            records, framed = reader.next_messages(_BATCH, MessageFields, None)
            if not records:
                break
            index.add_batch(
                list(map(_data_of, records)),
                list(map(_start_of, records)),
                list(map(_end_of, records)),
                framed > 0,
                now,
                self.path,
            )
        # Past an end-of-segment marker too, so a claimer does not wait on it.
        index.scan = reader.position

    def _claim_records(self, now: float, limit: int, jobs: list[Job]) -> list[Job]:
        """Claim up to ``limit`` records, best first (``_index``), in one transaction.  Index up to date.

        Given-back records whose time has come go first within their
        priority.  Records a claim goes past are recorded in SKIP entries of
        the same append, so every replica keeps their turn.
        """
        state = self._group.state
        index = self._index
        taken: set[int] = set()
        records: list[tuple[int, int, int, bytes, int]] = []  # start, end, attempt, data, priority
        steps: list[tuple[int, Skipped | None]] = []  # skips, and claims at or past the head, in position order
        head = state.head  # where the claim head will be once these skips and claims apply
        while len(records) < limit:
            waiting_priority = state.ready_priority(now) if state.waiting else -1
            priority, start = index.best(now, state, taken)
            if waiting_priority < 0 and priority < 0:
                break
            if waiting_priority >= priority:
                picked = state.take_ready(now, 1, waiting_priority)
                if not picked:
                    continue
                start = picked[0]
                if start in taken:
                    # A second live heap entry for one record: it came back, was
                    # claimed elsewhere and came back again while this replica
                    # still held the entry from its first return.
                    continue
                item = state.waiting[start]
                if item.attempts >= self.max_attempts:
                    # Given back by a process with a higher max_attempts, or by recovery.
                    self._dead_letter_waiting(start, item.attempts, item.reason, now)
                    continue
                taken.add(start)
                records.append((start, item.end, item.attempts + 1, self._read_at(start), item.priority))
                continue
            index.take(priority, start)
            taken.add(start)
            if start >= head:
                data, end = self._read_skipping(head, start, steps)
                steps.append((start, None))
                head = end
            elif start >= state.head:
                # Skipped earlier in this transaction: claim it in its place instead.
                place = next(place for place, (at, _) in enumerate(steps) if at == start)
                end = steps[place][1].end  # type: ignore[union-attr]
                steps[place] = (start, None)
                data = self._read_at(start)
            else:
                data = self._read_at(start)
                end = self._reader.position
            index.forget(start)
            records.append((start, end, 1, data, priority))
        if records or steps:
            self._record_claim(now, records, jobs, steps)
        return jobs

    def _read_skipping(self, head: int, start: int, steps: list[tuple[int, Skipped | None]]) -> tuple[bytes, int]:
        """Read the record at ``start`` (at or past ``head``); add a skip step for every record before it."""
        reader = self._head_reader
        reader.position = head
        if start == head:
            data = reader.next()
            if data is None:
                raise self._missing(start)
            return data, reader.position
        options_get = self._index.options.get
        batch = 16  # grows: the record may be the next one, or a million on
        while True:
            records, framed = reader.next_messages(batch, MessageFields, None)
            if not records:
                raise self._missing(start)
            # Column by column, in C: a skip is a step of (start, Skipped), the
            # options filed when the record was read, or none for a plain one.
            starts = list(map(_start_of, records))
            try:
                place = starts.index(start)
            except ValueError:
                place = len(records)
            passed = records[:place] if place < len(records) else records
            ends = list(map(_end_of, passed))
            items: list[Skipped | None] = list(map(options_get, starts[:place])) if framed else []
            if not items:
                items = list(map(new_skipped, zip(ends, _ZEROS, _NO_TIMES)))
            elif None in items:
                for at, item in enumerate(items):
                    if item is None:
                        items[at] = new_skipped((ends[at], 0, 0.0))
            steps += zip(starts, items)
            if place < len(records):
                record = records[place]
                return record.data, record._end
            batch = min(batch * 8, _BATCH)

    def _record_claim(
        self,
        now: float,
        records: list[tuple[int, int, int, bytes, int]],
        jobs: list[Job],
        steps: list[tuple[int, Skipped | None]] | None = None,
    ) -> None:
        """Commit the claim of ``records`` (and the skips among them) in one append, then apply it.

        ``steps`` lists, in position order, the records the claim head passes:
        skipped ones with their options, claimed ones with None.  The journal
        gets them in that order (runs of skips in SKIP entries, runs of claims
        in CLAIM entries of one token), so a replay moves the head as this did.
        """
        group = self._group
        state = group.state
        token = state.next_token
        expires = now + self.lease
        owner = self._owner
        by_start = {record[0]: record for record in records}
        steps = steps or []
        placed = _claimed_places(steps)
        at_head = {steps[place][0] for place in placed}
        runs: list[tuple[bool, list[Any]]] = []  # (is a skip run, its items)
        below = [record for record in records if record[0] not in at_head]
        # Before anything is appended (``below`` grows as the runs are built).
        state.check_claim([record[0] for record in below], list(map(_first, steps)))
        if below:
            runs.append((False, below))
        if steps:
            # Few steps are claims: cut the skips between them as slices, not step by step.
            done = 0
            for place in placed:
                if place > done:
                    runs.append((True, steps[done:place]))
                if runs and not runs[-1][0]:
                    runs[-1][1].append(by_start[steps[place][0]])
                else:
                    runs.append((False, [by_start[steps[place][0]]]))
                done = place + 1
            if done < len(steps):
                runs.append((True, steps[done:]))
        entries: list[bytes] = []
        for is_skip, items in runs:
            if is_skip:
                entries.extend(encode_skips(Kind.SKIP, items))
            else:
                body = CLAIM_BODY.pack(token, expires, owner[0], owner[1], len(items)) + b"".join(
                    CLAIM_RECORD.pack(start, end, attempt_word(attempt, priority))
                    for start, end, attempt, _, priority in items
                )
                entries.append(entry(Kind.CLAIM, body))
        group.append(*entries)  # the skips and the claims commit together
        mark = state.mark
        for is_skip, items in runs:
            if is_skip:
                state.skip_run(items)
                continue
            for start, end, attempt, data, priority in items:
                state.claim(token, expires, owner, start, end, attempt, priority)
                jobs.append(Job(self, data, start, token, attempt, expires))
        group.mark_moved(mark)

    def _read_at(self, start: int) -> bytes:
        reader = self._reader
        reader.position = start
        data = reader.next()
        if data is None:
            raise self._missing(start)
        return data

    def _missing(self, start: int) -> CorruptionError:
        where = Position.from_word(start)
        return CorruptionError(
            segment_path(self.path, where.segment), where.offset, f"group {self.group!r} holds a record here"
        )

    def stats(self) -> GroupStats:
        """Return where the group's jobs are (``GroupStats``): O(1) past reading what was sent since last look."""
        self._begin()
        try:
            state = self._group.state
            now = self._clock()
            self._index.follow(state)
            if self._tail_words[TAIL_INDEX] > self._index.scan:
                self._read_ahead(now)
            return group_stats(state, self._index, now)
        finally:
            self._group.end()

    # -- sweeping back lost claims --------------------------------------

    def _sweep(self, now: float) -> bool:
        """Give back claims whose lease ended and claims of dead workers; True if any.  In a transaction."""
        state = self._group.state
        failed: list[tuple[int, Claim, str]] = []
        if now >= state.next_expiry:
            for start in state.expired(now):
                claim = state.claims[start]
                failed.append((start, claim, f"lease ran out (attempt {claim.attempt})"))
        dead: set[Owner] = set()
        if state.owners and monotonic() >= self._next_liveness_check:
            self._next_liveness_check = monotonic() + LIVENESS_INTERVAL
            dead = self._liveness.dead_among(state.owners, self._owner)
            if dead:
                seen = {start for start, _, _ in failed}
                for start, claim in sorted(state.claims.items()):
                    if claim.owner in dead and start not in seen:
                        failed.append((start, claim, f"worker PID {claim.owner[0]} died (attempt {claim.attempt})"))
        for start, claim, reason in failed:
            self._fail(start, claim, now, reason)
        if dead:
            self._liveness.forget(state.owners)
        return bool(failed)

    def _fail(self, start: int, claim: Claim, available_at: float, reason: str) -> None:
        """A claim failed: give the record back, or dead-letter it on its last attempt.  In a transaction."""
        group = self._group
        state = group.state
        if state.claims.get(start) is not claim:
            # Checked before the append: a RETURN or DEAD the replay refuses would brick the journal.
            event = Event.DEAD if claim.attempt >= self.max_attempts else Event.RETURN
            raise IllegalTransition(start, state.state_of(start), event, " (not by this claim)")
        if claim.attempt >= self.max_attempts:
            # The letter is sent before the DEAD entry commits: a crash between
            # the two leaves a duplicate letter, never a lost record.
            self._dead_letters.send(self._read_at(start), claim.attempt, reason, start, self._clock())
            group.append(entry(Kind.DEAD, LIST_HEAD.pack(1) + PAIR.pack(start, claim.token)))
            old_mark = state.mark
            state.settle(start, claim.token, dead=True)
            group.mark_moved(old_mark)
        else:
            group.append(
                encode_return(Kind.RETURN, start, claim.token, available_at, claim.attempt, reason, claim.priority)
            )
            state.give_back(start, claim.token, available_at, claim.attempt, reason)
            group.bump_returns()

    def _dead_letter_waiting(self, start: int, attempts: int, reason: str, now: float) -> None:
        # A WAITING record out of attempts: claim it for an instant, then dead-letter the claim.
        group = self._group
        state = group.state
        token = state.next_token
        owner = self._owner
        item = state.waiting[start]
        word = attempt_word(attempts, item.priority)
        group.append(
            entry(Kind.CLAIM, CLAIM_BODY.pack(token, now, owner[0], owner[1], 1) + CLAIM_RECORD.pack(start, item.end, word))
        )
        state.claim(token, now, owner, start, item.end, attempts, item.priority)
        self._fail(start, state.claims[start], now, reason)

    def _wake_claimers(self) -> None:
        """Wake one waiting claimer of this group (work came back, or a backlog remains)."""
        if self._control.bytes[DATA_WAITING]:  # the count byte a send checks too
            self._waker.wake_claimer(self._group_tag)

    def _backlog_remains(self, now: float) -> bool:
        """Tell, after a claim, whether a claimer waits and there may be more to claim.  In a transaction.

        Then the claim passes one wake-up on (``_wake``): one job wakes one
        worker, and a backlog keeps waking them one after another.  A stale
        index entry costs at most one needless wake-up.
        """
        if not self._control.bytes[DATA_WAITING]:
            return False
        index = self._index
        if self._tail_words[TAIL_INDEX] > index.scan or index.plain or index.plain_skipped or index.in_heaps:
            return True
        state = self._group.state
        return bool(state.waiting) and state.has_ready(now)

    def _pass_wake_on(self) -> None:
        """Wake another claimer if there is work: for a claimer that was woken but leaves without claiming."""
        if self._closed:
            return
        group = self._group
        group.begin()
        try:
            backlog = self._backlog_remains(self._clock())
        finally:
            group.end()
        if backlog:
            self._wake_claimers()

    # -- waiting ---------------------------------------------------------

    def _claim_waiter(self) -> Waiter:
        """Return the calling thread's Waiter (made on first use)."""
        waiter = getattr(self._waiters, "waiter", None)
        if waiter is None:
            # One per thread: a Waiter's FIFO wakes one sleeper reliably, not several.
            waiter = self._waiters.waiter = Waiter(self._control)
            self._all_waiters.append(waiter)
        return waiter

    def _wait_plan(self) -> WaitPlan:
        """Return what a claimer with nothing to claim must watch; never blocks.

        The blocking ``_wait`` polls it; ``segq.aio`` registers it with the event loop.
        """
        if self._closed:
            raise Closed(f"work queue {self.group!r} is closed")
        waiter = self._claim_waiter()
        self._begin()
        group = self._group
        try:
            state = group.state
            journal_map = group.map
            index = self._index
            index.follow(state)
            probe = index.scan
            returns = group.returns
            due = min(state.next_expiry, state.next_available(), index.next_due())
            pidfds = self._liveness.fds()
        finally:
            group.end()
        control_map = self._control.map
        wake_at = None if due == math.inf else time.monotonic() + max(0.0, due - self._clock())

        def ready() -> bool:
            try:
                if WORD.unpack_from(control_map, TAIL)[0] > probe:
                    return True
                returned: bool = WORD.unpack_from(journal_map, RETURNS)[0] != returns
                return returned or WORD.unpack_from(journal_map, END)[0] == SEALED_MARK
            except ValueError:
                return True  # the journal was replaced (and unmapped) by another thread's compaction

        return WaitPlan(waiter, pidfds, ready, wake_at)

    def _wait(self, deadline: float | None, also: Sequence[int] = ()) -> bool:
        """Sleep until a claim may succeed or ``deadline`` (monotonic) passes; False on the deadline.

        Also returns (True) when a descriptor of ``also`` becomes readable:
        ``run_worker``'s stop pipe.
        """
        waiter, pidfds, ready, due = self._wait_plan()
        wake_at = deadline if due is None else due if deadline is None else min(deadline, due)
        poller = select.poll()
        if waiter.fileno() >= 0:
            poller.register(waiter.fileno(), select.POLLIN)
        for fd in (*pidfds, *also):
            poller.register(fd, select.POLLIN)
        waiter.raise_flag(CLAIM_WAITERS, self._group_tag)
        try:
            while True:
                if ready():
                    return True
                now = time.monotonic()
                if wake_at is not None and now >= wake_at:
                    return deadline is None or now < deadline
                safety = _wake._SAFETY_SECONDS  # read each time: tests switch the safety net off
                limit = safety if wake_at is None else min(safety, wake_at - now)
                if waiter.fileno() < 0:
                    time.sleep(min(limit, 0.005))
                    continue
                events = poller.poll(limit * 1000.0)
                if any(fd != waiter.fileno() for fd, _ in events):
                    return True  # a worker holding claims died
                if events:
                    waiter.drain()
        finally:
            waiter.lower_flag(CLAIM_WAITERS)

    # -- settling --------------------------------------------------------

    def _check(self, job: Job, call: str) -> JobState:
        """Return the job's state after ``call`` (``JOB_TRANSITIONS``); raise if the call is illegal."""
        if self._closed:
            self._raise_closed()  # before the state: close gave the job back, the caller did not nack it
        if job._queue is not self:
            raise UsageError("this job was claimed through another WorkQueue")
        return next_job_state(job, call)

    def _check_all(self, jobs: list[Job], call: str) -> list[JobState]:
        """Do :meth:`_check` for each of ``jobs``; raise ``Closed`` after ``close`` even when none is left."""
        if self._closed:
            self._raise_closed()  # a batch close gave back holds nothing: settling it must not pass in silence
        return [self._check(job, call) for job in jobs]

    def _lost(self, job: Job, call: str) -> ClaimLost:
        state = self._group.state
        record_state = state.state_of(job._start)
        claim = state.claims.get(job._start)
        if claim is not None and claim.token == job._token:
            why = "its lease ran out"
        elif record_state.value == "claimed":
            why = "its lease ran out and another worker claimed it"
        else:
            why = f"its lease ran out and it is {record_state.value} now"
        job.state = next_job_state(job, "lose")
        self._held.discard(job)
        return ClaimLost(f"cannot {call} the record at {job.position} (attempt {job.attempt}): {why}")

    def _ack(self, job: Job) -> None:
        # The hot path: one small append, the JOB_TRANSITIONS lookup written out.
        following = _job_transition((job.state, "ack"))
        if following is None or job._queue is not self:
            following = self._check(job, "ack")  # raises
        if self._closed:
            self._raise_closed()
        start = job._start
        token = job._token
        group = self._group
        state = group.begin()
        try:
            claim = state.claims.get(start)
            if claim is None or claim.token != token or claim.expires <= self._clock():
                raise self._lost(job, "ack")
            group.append_small(Kind.ACK, _ACK_ONE_KIND, _ACK_ONE_CRC, ACK_ONE.pack(1, start, token))
            old_mark = state.mark
            state.settle(start, token)
            if state.mark != old_mark and (not same_segment(state.mark, old_mark) or monotonic() >= group.cursor_due):
                group.mark_moved(old_mark)
        finally:
            group.end()
        job.state = following
        self._held.discard(job)

    def _ack_with(self, job: Job, requests: Iterable[Enqueue]) -> None:
        """Ack ``job`` and enqueue ``requests`` atomically (the protocol is in ``segq._outbox``)."""
        following = self._check(job, "ack")
        if self._closed:
            self._raise_closed()
        if isinstance(requests, (Enqueue, str, bytes)) or not hasattr(requests, "__iter__"):
            raise InvalidArgument(f"ack(enqueue=...) takes a list of segq.Enqueue, not {type(requests).__name__}")
        items = follow_ups(list(requests), self._clock())
        group = self._group
        state = group.begin()
        try:
            self._outbox.check(items)  # a follow-up its queue refuses must fail before the commit
            claim = state.claims.get(job._start)
            if claim is None or claim.token != job._token or claim.expires <= self._clock():
                raise self._lost(job, "ack")
            self._outbox.set_floors(items)
            outbox = OutboxEntry(job._start, job._token, items)
            group.append(entry(Kind.OUTBOX, outbox.encode()))  # the commit point
            crash_point("after-outbox-entry")
            old_mark = state.mark
            state.settle(job._start, job._token)
            if state.mark != old_mark:
                group.mark_moved(old_mark)
            job.state = following
            self._held.discard(job)
            self._finish_outbox(outbox, fresh=True)
        finally:
            group.end()

    def _finish_outbox(self, outbox: OutboxEntry, *, fresh: bool) -> None:
        """Deliver an outbox's follow-ups (those not already in their queues), then append SENT.  In a transaction.

        ``fresh``: its acker delivering right after the commit, so nothing of
        it can be in the queues yet; otherwise the queues are scanned first.
        """
        state = self._group.state
        try:
            self._outbox.pin(outbox.items)
            delivered = set() if fresh else self._outbox.delivered(outbox)
            self._outbox.deliver(outbox, delivered)
            self._group.append(entry(Kind.SENT, PAIR.pack(outbox.start, outbox.token)))
        except BaseException:
            # The ack stands: whoever takes the lock next (this process included) finishes it.
            state.outbox = outbox.encode()
            state.outbox_sent = False
            raise
        state.outbox = None
        crash_point("after-sent")
        self._outbox.release(outbox.items)

    def _settle_outbox(self) -> None:
        """Finish the outbox left last in the journal by a dead (or failed) acker, or release its pins.

        Called by ``GroupHandle.begin`` when the replica's last entry is an OUTBOX or its SENT.
        """
        group = self._group
        state = group.state
        body = state.outbox
        assert body is not None
        try:
            outbox = OutboxEntry.decode(body)
        except (ValueError, struct.error) as error:
            raise CorruptionError(group.journal_path, 0, f"an OUTBOX entry cannot be read ({error})") from None
        if state.outbox_sent:
            state.outbox = None
            self._outbox.release(outbox.items)  # its finisher may have died before releasing them
            return
        log.warning(
            "%s: finishing the %d follow-up(s) of the ack of the record at %s (its worker stopped mid-ack)",
            group.directory,
            len(outbox.items),
            describe_word(outbox.start),
        )
        self._finish_outbox(outbox, fresh=False)

    def _held_claims(self, jobs: list[Job], call: str) -> list[Claim]:
        """Check that every job is still held; raise ClaimLost naming the first that is not.  In a transaction."""
        now = self._clock()
        claims = []
        state = self._group.state
        if len(jobs) > 1 and len({job._start for job in jobs}) != len(jobs):
            raise UsageError(f"cannot {call} the same job twice in one call")
        for job in jobs:
            claim = state.claims.get(job._start)
            if claim is None or claim.token != job._token or claim.expires <= now:
                raise self._lost(job, call)
            claims.append(claim)
        return claims

    def _ack_many(self, jobs: list[Job]) -> None:
        following = self._check_all(jobs, "ack")
        if not jobs:
            return
        self._begin()
        group = self._group
        try:
            self._held_claims(jobs, "ack")
            body = LIST_HEAD.pack(len(jobs)) + b"".join(PAIR.pack(job._start, job._token) for job in jobs)
            group.append(entry(Kind.ACK, body))
            state = group.state
            old_mark = state.mark
            for job in jobs:
                state.settle(job._start, job._token)
            group.mark_moved(old_mark)
        finally:
            group.end()
        for job, job_state in zip(jobs, following, strict=True):
            job.state = job_state
            self._held.discard(job)

    def _nack(self, jobs: list[Job], delay: float, reason: str | None) -> None:
        following = self._check_all(jobs, "nack")
        if not isinstance(delay, (int, float)) or isinstance(delay, bool) or not delay >= 0:
            raise InvalidArgument(f"nack delay must be a number of seconds >= 0, not {delay!r}", name="delay")
        if reason is not None and not isinstance(reason, str):
            raise InvalidArgument(f"nack reason must be a str or None, not {type(reason).__name__}", name="reason")
        if not jobs:
            return
        self._begin()
        try:
            claims = self._held_claims(jobs, "nack")
            now = self._clock()
            for job, claim in zip(jobs, claims, strict=True):
                text = reason if reason is not None else f"nacked (attempt {claim.attempt})"
                self._fail(job._start, claim, now + delay, text)
        finally:
            self._group.end()
        for job, job_state in zip(jobs, following, strict=True):
            job.state = job_state
            self._held.discard(job)
        self._wake_claimers()

    def _renew(self, jobs: list[Job], lease: float | None) -> None:
        self._check_all(jobs, "renew")
        if lease is None:
            lease = self.lease
        if not isinstance(lease, (int, float)) or isinstance(lease, bool) or not lease > 0:
            raise InvalidArgument(f"lease must be a number of seconds > 0, not {lease!r}", name="lease")
        if not jobs:
            return
        self._begin()
        group = self._group
        try:
            self._held_claims(jobs, "renew")
            expires = self._clock() + lease
            body = RENEW_HEAD.pack(expires, len(jobs)) + b"".join(PAIR.pack(job._start, job._token) for job in jobs)
            group.append(entry(Kind.RENEW, body))
            for job in jobs:
                group.state.renew(job._start, job._token, expires)
        finally:
            group.end()
        for job in jobs:
            job.lease_expires_at = expires

    # -- lifetime --------------------------------------------------------

    def _sync_tick(self) -> bool:
        group = self._group
        if group.dirty:
            group.dirty = False
            try:
                self._begin()
            except (Closed, UsageError):
                return False
            try:
                group.sync()
            finally:
                group.end()
        return True

    @staticmethod
    def remove(path: StrPath, group: str) -> None:
        """Unregister ``group`` so it no longer holds back segment deletion; see :func:`remove_group`.

        Its state (claims, attempts) is deleted; its dead-letter queue is kept.
        Raises ``Locked`` if a WorkQueue of the group is open in any process.
        """
        remove_group(path, group)

    @staticmethod
    def requeue_dead(path: StrPath, group: str = "default", *, dead_letter: StrPath | None = None) -> int:
        """Move every dead letter of ``group`` back into the queue; see :func:`requeue_dead`."""
        return requeue_dead(path, group, dead_letter=dead_letter)

    def close(self) -> None:
        """Give back the jobs this object still holds (counting the attempt), then release everything.

        Idempotent.
        """
        if self._closed:
            return
        if self._syncer is not None:
            self._syncer.stop()
        try:
            if not self._forked:
                group = self._group
                state = group.begin()
                try:
                    now = self._clock()
                    for job in sorted(self._held, key=lambda job: job._start):
                        start = job._start
                        claim = state.held(start, job._token)
                        if claim is not None and claim.expires > now:
                            self._fail(start, claim, now, f"worker closed its WorkQueue (attempt {claim.attempt})")
                            job.state = next_job_state(job, "nack")
                    self._held.clear()
                    group.write_cursor()
                    if self._sync_interval is not None:
                        group.sync()
                finally:
                    group.end()
                self._wake_claimers()
        finally:
            self._abandon()

    def _abandon(self) -> None:
        """Release this object's files without touching the group's state, as a killed process would."""
        self._closed = True
        for waiter in self._all_waiters:
            waiter.close()
        self._waker.close()
        self._liveness.close()
        self._head_reader.close()
        self._reader.close()
        self._dead_letters.close()
        self._outbox.close()
        self._group.close()
        self._control.close()

    def _orphan(self) -> None:
        """In a forked child: the group lock's open file is shared with the parent, so never touch it."""
        self._forked = True
        self._closed = True

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"lease={self.lease:g}s max_attempts={self.max_attempts}"
        return f"<segq.WorkQueue {self.path!r} group={self.group!r} {state}>"


# A forked child shares its parent's open files, flocks included: a WorkQueue
# copied into a child must not be used (it would hold the parent's lock).
_open_queues: "weakref.WeakSet[WorkQueue]" = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for queue in list(_open_queues):
        queue._orphan()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
