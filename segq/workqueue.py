"""WorkQueue: competing consumers with leases, retries and a dead-letter queue.

Theory of operation
-------------------
A *group* is a set of workers, in any processes, sharing the records of a
queue: each record is held by at most one worker at a time.  The group's
state lives in ``groups/<group>/journal`` (``_journal``: an append-only,
memory-mapped log) and in ``cursors/g.<group>.pos`` (its low-water mark,
which holds back segment deletion like a receiver's position).  Each
``WorkQueue`` keeps a replica of the state (``_claims.GroupState``) and
changes it in short critical sections under the group lock
(``_grouplock``: a robust process-shared mutex): catch up with the journal, check, append one entry,
apply it, unlock.  The appended entry is the commit: once ``claim``, ``ack``,
``nack`` or ``renew`` returns, it survives a SIGKILL of any process.

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

import fcntl
import logging
import math
import mmap
import os
import select
import struct
import threading
import time
import weakref
import zlib
from types import TracebackType
from typing import Callable, Iterator, NamedTuple

from . import _journal
from ._args import check_path, check_timeout
from ._claims import (
    ACK_ONE,
    CLAIM_BODY,
    CLAIM_ONE,
    CLAIM_RECORD,
    LIST_HEAD,
    PAIR,
    RENEW_HEAD,
    STATE_BODY,
    TRANSITIONS,
    Claim,
    Event,
    Owner,
    RecordState,
    describe_word,
    encode_return,
    load_state,
    replay,
)
from ._control import CONSUMER_SEGMENT_SIZE, DATA_WAITERS, DATA_WAITING, TAIL, WORD, Control, require_queue
from ._deadletter import DeadLetter, dead_letter_path, dead_letter_segment_size
from ._format import HEADER_SIZE
from ._groupadmin import GROUPS_DIR, GroupRecovery, group_dir, group_info, list_groups, recover_group, requeue_dead
from ._flock import wait_flock
from ._fs import make_dir, open_file
from ._grouplock import GroupLock
from ._jobs import JOB_TRANSITIONS, Job, JobBatch, JobState
from ._journal import END, RETURNS, SEALED_MARK, Journal, Kind, entry, entry_prefix_crc
from ._liveness import Liveness, my_owner
from ._reader import RecordReader
from ._segment import StrPath, os_error, segment_path
from ._retention import delete_consumed_segments, register_cursor
from ._state import Position, check_name, cursor_path
from ._wake import Waiter, Waker
from .errors import ClaimLost, Closed, CorruptionError, Empty, InvalidArgument, Locked, SegqError, UsageError
from .sender import Sender, SyncPolicy, parse_sync

__all__ = [
    "WorkQueue",
    "Job",
    "JobBatch",
    "JobState",
    "JOB_TRANSITIONS",
    "RecordState",
    "Event",
    "TRANSITIONS",
    "DeadLetter",
    "GroupRecovery",
    "dead_letter_path",
    "list_groups",
    "group_info",
    "recover_group",
    "requeue_dead",
]

log = logging.getLogger(__name__)

#: How often (seconds) a claimer checks whether the workers holding claims still live.
LIVENESS_INTERVAL = 0.001
monotonic = time.monotonic
crc32 = zlib.crc32
_PAGE = mmap.ALLOCATIONGRANULARITY
_ENTRY_HEADER = _journal.ENTRY_HEADER
_CLAIM_ONE_WORD, _CLAIM_ONE_CRC = entry_prefix_crc(Kind.CLAIM, CLAIM_ONE.size)
_ACK_ONE_WORD, _ACK_ONE_CRC = entry_prefix_crc(Kind.ACK, ACK_ONE.size)
_CLAIM_ONE_KIND = struct.unpack("<I", _CLAIM_ONE_WORD)[0]
_ACK_ONE_KIND = struct.unpack("<I", _ACK_ONE_WORD)[0]
_HELD = JobState.HELD
_ACKED = JobState.ACKED
_NACKED = JobState.NACKED
_LOST = JobState.LOST


# -- the work queue ------------------------------------------------------


class WaitPlan(NamedTuple):
    """What a claimer with nothing to claim watches (``WorkQueue._wait_plan``)."""

    waiter: Waiter  # its FIFO is written by senders and by whoever gives a record back
    pidfds: list[int]  # the workers holding claims: readable when one dies
    ready: Callable[[], bool]  # True when a claim may succeed (cheap: three loads)
    wake_at: float | None  # monotonic: the next lease end or retry time, None if none


class WorkQueue:
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
            raise SegqError(f"max_attempts must be an int >= 1, not {max_attempts!r}")
        self.lease = float(lease)
        self.max_attempts = max_attempts
        self.dead_letter = os.fspath(dead_letter) if dead_letter is not None else dead_letter_path(path, group)
        self._sync_interval = parse_sync(sync)
        self._sync = sync
        self._clock = clock
        self._owner: Owner = _owner if _owner is not None else my_owner()
        self._group_dir = group_dir(self.path, group)
        require_queue(self.path, create=create, who="WorkQueue")  # a typo'd path is an error, not a new queue
        self._control = Control(self.path, segment_size=CONSUMER_SEGMENT_SIZE)
        self._files: list[int] = []
        try:
            make_dir(self.path, GROUPS_DIR, group)
            self._member_fd = self._open_fd(os.path.join(self._group_dir, "open.lock"))
            wait_flock(self._member_fd, os.path.join(self._group_dir, "open.lock"), shared=True, what="group membership")
            self._thread_lock = threading.Lock()
            self._group_lock = GroupLock(self._group_dir)
            self._lock_function = self._group_lock.lock_function
            self._unlock_function = self._group_lock.unlock_function
            self._lock_argument = self._group_lock.lock_argument
            self._journal: Journal | None = None
            self._applied = 0
            with self._group_lock:
                self._known_group = os.path.exists(cursor_path(self.path, "g", group))
                self._cursor = register_cursor(self.path, "g", group)
                self._open_journal()
        except BaseException:
            self._release_files()
            raise
        consumer = f"group {group!r}"
        self._head_reader = RecordReader(self._control, 0, consumer=consumer)
        self._reader = RecordReader(self._control, 0, consumer=consumer)
        self._liveness = Liveness()
        self._waiters = threading.local()
        self._all_waiters: list[Waiter] = []
        self._waker = Waker(self._control)
        self._dead_sender: Sender | None = None
        self._held: set[Job] = set()  # jobs handed out and not settled, given back by close()
        self._empty_probe = 0  # where the head reader stopped when the queue looked empty
        self._next_liveness_check = 0.0  # monotonic time of the next look at other workers' PIDs
        self._dirty = False
        self._stop_syncing = threading.Event()
        self._sync_thread: threading.Thread | None = None
        self._closed = False
        _open_queues.add(self)
        if self._sync_interval:
            self._sync_thread = threading.Thread(target=self._sync_loop, name="segq-group-sync", daemon=True)
            self._sync_thread.start()

    # -- files and the group lock ---------------------------------------

    def _open_fd(self, path: str) -> int:
        try:
            fd = open_file(path, os.O_RDWR, private=True)
        except OSError as error:
            raise os_error(error, "open", path) from None
        self._files.append(fd)
        return fd

    def _lock(self) -> None:
        self._thread_lock.acquire()
        try:
            if WORD.unpack_from(self._jmap, END)[0] != self._applied:
                self._prefetch()
            self._group_lock.acquire()
        except BaseException:
            self._thread_lock.release()
            raise

    def _unlock(self) -> None:
        self._group_lock.release()
        self._thread_lock.release()

    def _prefetch(self) -> None:
        """Replay what other processes committed, before taking the group lock.

        Entries below the end word never change, so reading them needs no
        lock; this moves most of the replay out of the serial section.  Only
        the thread lock is held (the replica is this process's).
        """
        end = WORD.unpack_from(self._jmap, END)[0]
        if end <= self._capacity:  # not sealed
            self._applied = replay(self._state, self._jmap, self._journal_path, self._applied, end, optimistic=True)

    def _enter(self) -> None:
        """Take the group lock and bring the replica up to date (the start of every transaction)."""
        if self._closed:
            self._raise_closed()
        self._lock()
        try:
            if WORD.unpack_from(self._jmap, END)[0] != self._applied:
                self._catch_up()
        except BaseException:
            self._unlock()
            raise

    def _raise_closed(self) -> None:
        if self._forked:
            raise UsageError("a WorkQueue cannot be used across fork(): open a new one in the child")
        raise Closed(f"work queue {self.group!r} is closed")

    # -- the journal -----------------------------------------------------

    def _open_journal(self) -> None:
        """Open (creating or repairing if needed) the journal and load the replica.  Lock held."""
        while True:
            try:
                journal = Journal(self._group_dir)
            except FileNotFoundError:
                self._create_journal()
                continue
            if journal.sealed:
                if not journal.is_current():
                    journal.close()
                    continue  # a newer journal replaced it: open that one
                log.warning("%s: a compaction was interrupted; keeping this journal", journal.path)
                journal.unseal()
            break
        try:
            self._state = load_state(journal)
        except BaseException:
            journal.close()
            raise
        self._set_journal(journal)
        self._reconcile_with_cursor()

    def _create_journal(self) -> None:
        position = self._cursor.reload()
        word = position.segment << 32 | position.offset
        if self._known_group:
            log.warning(
                "%s: the journal is missing; rebuilding it at the low-water mark (%s): "
                "records above it will be claimed again",
                self._group_dir,
                position,
            )
        body = entry(Kind.STATE, STATE_BODY.pack(word, word, 1, 0))
        _journal.write_journal(
            self._group_dir, 1, body, capacity=_journal.DEFAULT_CAPACITY, durable=self._sync_interval is not None
        )

    def _set_journal(self, journal: Journal) -> None:
        self._journal = journal
        self._journal_path = journal.path
        self._jmap = journal.map
        self._capacity = journal.capacity
        self._applied = journal.end

    def _catch_up(self) -> None:
        """Apply what other processes appended; follow a compaction.  Lock held."""
        journal = self._journal
        assert journal is not None
        end = journal.end
        if end == SEALED_MARK:
            if journal.is_current():
                # Its compactor died between sealing it and renaming the new one in.
                log.warning("%s: a compaction was interrupted; keeping this journal", journal.path)
                journal.unseal()
                end = journal.end
            else:
                journal.close()
                self._journal = None
                self._open_journal()
                return
        self._applied = replay(self._state, journal.map, journal.path, self._applied, end)

    def _append_small(self, kind: int, kind_word: int, kind_crc: int, body: bytes) -> None:
        """Append one fixed-size entry, straight into the map when it fits and no sync is owed.

        ``kind_word``/``kind_crc`` are the entry's precomputed header word and
        the CRC-32 state after it (``entry_prefix_crc``), so the hot path packs
        one header and runs one CRC; otherwise it goes through :meth:`_append`.
        """
        at = self._applied
        stop = at + 8 + len(body)
        if stop > self._capacity or self._sync_interval is not None:
            self._append(entry(kind, body))
            return
        jmap = self._jmap
        _ENTRY_HEADER.pack_into(jmap, at, kind_word, crc32(body, kind_crc))
        jmap[at + 8 : stop] = body
        WORD.pack_into(jmap, END, stop)
        self._applied = stop

    def _append(self, data: bytes) -> None:
        """Append framed entries (compacting first if they do not fit).  Lock held, replica current."""
        start = self._applied
        stop = start + len(data)
        if stop > self._capacity:
            self._compact(len(data))
            start = self._applied
            stop = start + len(data)
        jmap = self._jmap
        jmap[start:stop] = data
        WORD.pack_into(jmap, END, stop)
        self._applied = stop
        if self._sync_interval is not None:
            self._journal_written(start, stop)

    def _journal_written(self, start: int, stop: int) -> None:
        if self._sync_interval == 0.0:
            page = start & ~(_PAGE - 1)
            self._jmap.flush(page, stop - page)
        else:
            self._dirty = True

    def _compact(self, room: int = 0) -> None:
        """Replace the journal with a snapshot of the state.  Lock held, replica current."""
        old = self._journal
        assert old is not None
        body = self._state.snapshot()
        capacity = max(_journal.DEFAULT_CAPACITY, 2 * (len(body) + room) + _journal.HEADER_SIZE)
        temporary = _journal.prepare_journal(
            self._group_dir, old.generation + 1, body, capacity=capacity, durable=self._sync_interval is not None
        )
        # Seal first, then rename: whoever finds the old journal sealed reopens
        # the name; if we die in between, the sealed one is still the current
        # one and the next lock holder unseals it (see _journal).
        old.seal()
        _journal.install_journal(self._group_dir, temporary, durable=self._sync_interval is not None)
        old.close()
        self._set_journal(Journal(self._group_dir))
        self._write_cursor()

    def _reconcile_with_cursor(self) -> None:
        """Trust the cursor over the journal when it is ahead (a journal page lost to power failure)."""
        position = self._cursor.reload()
        floor = position.segment << 32 | position.offset
        state = self._state
        if floor <= state.mark:
            return
        log.warning(
            "%s: the low-water mark in the journal (%s) is behind the cursor (%s); moving it up",
            self._group_dir,
            describe_word(state.mark),
            position,
        )
        state.raise_mark(floor)
        self._compact()

    def _write_cursor(self) -> None:
        mark = self._state.mark
        cursor = self._cursor
        cursor.reload()
        if cursor.position != Position(mark >> 32, mark & 0xFFFF_FFFF):
            cursor.write_at(mark >> 32, mark & 0xFFFF_FFFF)
            if self._sync_interval == 0.0:
                cursor.sync()

    def _mark_left_segment(self) -> None:
        self._write_cursor()
        delete_consumed_segments(self.path)

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
            raise UsageError(f"claim_batch needs max_count >= 1, not {max_count!r}")
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

    def _try_claim(self) -> Job | None:
        # The hot path: _enter, _unlock and the journal append written out inline.
        if self._closed:
            self._raise_closed()
        lock_argument = self._lock_argument
        woke = False
        thread_lock = self._thread_lock
        thread_lock.acquire()
        try:
            if WORD.unpack_from(self._jmap, END)[0] != self._applied:
                self._prefetch()
            result = self._lock_function(lock_argument)
            if result:
                self._group_lock.recover(result)
            try:
                if WORD.unpack_from(self._jmap, END)[0] != self._applied:
                    self._catch_up()
                state = self._state
                now = self._clock()
                owners = state.owners
                if now >= state.next_expiry or (
                    (len(owners) > 1 or (owners and self._owner not in owners))
                    and monotonic() >= self._next_liveness_check
                ):
                    woke = self._sweep(now)
                if state.waiting and state.has_ready(now):
                    jobs = self._claim_waiting(now, 1, [])
                    if jobs:
                        self._held.add(jobs[0])
                        return jobs[0]
                reader = self._head_reader
                reader.position = state.head
                data = reader.next()
                if data is None:
                    self._empty_probe = reader.position
                    return None
                end = reader.position
                start = end - HEADER_SIZE - len(data)
                token = state.next_token
                expires = now + self.lease
                owner = self._owner
                body = CLAIM_ONE.pack(token, expires, owner[0], owner[1], 1, start, end, 1)
                self._append_small(Kind.CLAIM, _CLAIM_ONE_KIND, _CLAIM_ONE_CRC, body)
                mark = state.mark
                state.claim(token, expires, owner, start, end, 1)
                if state.mark != mark and (state.mark ^ mark) >> 32:
                    self._mark_left_segment()
            finally:
                self._unlock_function(lock_argument)
        finally:
            thread_lock.release()
            if woke:
                self._wake_claimers()
        job = Job(self, data, start, token, 1, expires)
        self._held.add(job)
        return job

    def _claim_many(self, max_count: int) -> list[Job]:
        self._enter()
        woke = False
        try:
            state = self._state
            now = self._clock()
            owners = state.owners
            if now >= state.next_expiry or (
                (len(owners) > 1 or (owners and self._owner not in owners))
                and monotonic() >= self._next_liveness_check
            ):
                woke = self._sweep(now)
            jobs: list[Job] = []
            if state.waiting and state.has_ready(now):
                self._claim_waiting(now, max_count, jobs)
            if len(jobs) < max_count:
                self._claim_from_head(now, max_count - len(jobs), jobs)
        finally:
            self._unlock()
            if woke:
                self._wake_claimers()
        for job in jobs:
            self._held.add(job)
        return jobs

    def _claim_waiting(self, now: float, limit: int, jobs: list[Job]) -> list[Job]:
        """Claim ready given-back records (dead-lettering any out of attempts).  Lock held."""
        state = self._state
        records = []
        picked = state.take_ready(now, limit)
        for start in picked:
            item = state.waiting[start]
            if item.attempts >= self.max_attempts:
                # Given back by a process with a higher max_attempts, or by recovery.
                self._dead_letter_waiting(start, item.attempts, item.reason, now)
                continue
            records.append((start, item.end, item.attempts + 1, self._read_at(start)))
        if records:
            self._record_claim(now, records, jobs)
        return jobs

    def _claim_from_head(self, now: float, limit: int, jobs: list[Job]) -> None:
        state = self._state
        reader = self._head_reader
        reader.position = state.head
        records: list[tuple[int, int, int, bytes]] = []
        while len(records) < limit:
            data = reader.next()
            if data is None:
                self._empty_probe = reader.position
                break
            end = reader.position
            records.append((end - HEADER_SIZE - len(data), end, 1, data))
        if records:
            self._record_claim(now, records, jobs)

    def _record_claim(self, now: float, records: list[tuple[int, int, int, bytes]], jobs: list[Job]) -> None:
        state = self._state
        token = state.next_token
        expires = now + self.lease
        owner = self._owner
        body = CLAIM_BODY.pack(token, expires, owner[0], owner[1], len(records)) + b"".join(
            CLAIM_RECORD.pack(start, end, attempt) for start, end, attempt, _ in records
        )
        self._append(entry(Kind.CLAIM, body))
        mark = state.mark
        for start, end, attempt, data in records:
            state.claim(token, expires, owner, start, end, attempt)
            jobs.append(Job(self, data, start, token, attempt, expires))
        if (state.mark ^ mark) >> 32:
            self._mark_left_segment()

    def _read_at(self, start: int) -> bytes:
        reader = self._reader
        reader.position = start
        data = reader.next()
        if data is None:
            raise CorruptionError(
                segment_path(self.path, start >> 32), start & 0xFFFF_FFFF, f"group {self.group!r} holds a record here"
            )
        return data

    # -- sweeping back lost claims --------------------------------------

    def _sweep(self, now: float) -> bool:
        """Give back claims whose lease ended and claims of dead workers; True if any.  Lock held."""
        state = self._state
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
        """A claim failed: give the record back, or dead-letter it on its last attempt.  Lock held."""
        if claim.attempt >= self.max_attempts:
            self._send_dead_letter(start, claim.attempt, reason, self._clock())
            self._append(entry(Kind.DEAD, LIST_HEAD.pack(1) + PAIR.pack(start, claim.token)))
            old_mark = self._state.mark
            self._state.settle(start, claim.token, dead=True)
            if (self._state.mark ^ old_mark) >> 32:
                self._mark_left_segment()
        else:
            self._append(encode_return(Kind.RETURN, start, claim.token, available_at, claim.attempt, reason))
            self._state.give_back(start, claim.token, available_at, claim.attempt, reason)
            WORD.pack_into(self._jmap, RETURNS, WORD.unpack_from(self._jmap, RETURNS)[0] + 1)

    def _dead_letter_waiting(self, start: int, attempts: int, reason: str, now: float) -> None:
        # A WAITING record out of attempts: claim it for an instant, then dead-letter the claim.
        state = self._state
        token = state.next_token
        owner = self._owner
        end = state.waiting[start].end
        self._append(
            entry(Kind.CLAIM, CLAIM_BODY.pack(token, now, owner[0], owner[1], 1) + CLAIM_RECORD.pack(start, end, attempts))
        )
        state.claim(token, now, owner, start, end, attempts)
        self._fail(start, state.claims[start], now, reason)

    def _send_dead_letter(self, start: int, attempts: int, reason: str, now: float) -> None:
        data = self._read_at(start)
        letter = DeadLetter(data, attempts, reason, self.group, Position(start >> 32, start & 0xFFFF_FFFF), now)
        if self._dead_sender is None:
            self._dead_sender = Sender(
                self.dead_letter, segment_size=dead_letter_segment_size(self.path), sync=self._sync
            )
        self._dead_sender.send(letter.encode())
        log.info("%s: record at %s dead-lettered after %d attempts: %s", self.group, letter.position, attempts, reason)

    def _wake_claimers(self) -> None:
        if self._control.bytes[DATA_WAITING]:  # the count byte a send checks too
            self._waker.wake(DATA_WAITERS)

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
        self._enter()
        try:
            state = self._state
            journal_map = self._jmap
            probe = max(state.head, self._empty_probe)
            returns = WORD.unpack_from(journal_map, RETURNS)[0]
            due = min(state.next_expiry, state.next_available())
            pidfds = self._liveness.fds()
        finally:
            self._unlock()
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

    def _wait(self, deadline: float | None) -> bool:
        """Sleep until a claim may succeed or ``deadline`` (monotonic) passes; False on the deadline."""
        waiter, pidfds, ready, due = self._wait_plan()
        wake_at = deadline if due is None else due if deadline is None else min(deadline, due)
        poller = select.poll()
        if waiter.fileno() >= 0:
            poller.register(waiter.fileno(), select.POLLIN)
        for fd in pidfds:
            poller.register(fd, select.POLLIN)
        waiter.raise_flag(DATA_WAITERS)
        try:
            while True:
                if ready():
                    return True
                now = time.monotonic()
                if wake_at is not None and now >= wake_at:
                    return deadline is None or now < deadline
                limit = 1.0 if wake_at is None else min(1.0, wake_at - now)
                if waiter.fileno() < 0:
                    time.sleep(min(limit, 0.005))
                    continue
                events = poller.poll(limit * 1000.0)
                if any(fd != waiter.fileno() for fd, _ in events):
                    return True  # a worker holding claims died
                if events:
                    waiter.drain()
        finally:
            waiter.lower_flag(DATA_WAITERS)

    # -- settling --------------------------------------------------------

    def _refuse(self, job: Job, call: str) -> None:
        if job._queue is not self:
            raise UsageError("this job was claimed through another WorkQueue")
        if job.state is _LOST:
            raise ClaimLost(f"the claim on the record at {job.position} was lost before; it cannot {call}")
        raise UsageError(f"cannot {call} the job at {job.position}: it is already {job.state.value}")

    def _lost(self, job: Job, call: str) -> ClaimLost:
        state = self._state.state_of(job._start)
        claim = self._state.claims.get(job._start)
        if claim is not None and claim.token == job._token:
            why = "its lease ran out"
        elif state.value == "claimed":
            why = "its lease ran out and another worker claimed it"
        else:
            why = f"its lease ran out and it is {state.value} now"
        job.state = _LOST
        self._held.discard(job)
        return ClaimLost(f"cannot {call} the record at {job.position} (attempt {job.attempt}): {why}")

    def _ack(self, job: Job) -> None:
        # The hot path, written out like _try_claim.
        if job.state is not _HELD or job._queue is not self:
            self._refuse(job, "ack")
        if self._closed:
            self._raise_closed()
        start = job._start
        token = job._token
        lock_argument = self._lock_argument
        thread_lock = self._thread_lock
        thread_lock.acquire()
        try:
            if WORD.unpack_from(self._jmap, END)[0] != self._applied:
                self._prefetch()
            result = self._lock_function(lock_argument)
            if result:
                self._group_lock.recover(result)
        except BaseException:
            thread_lock.release()
            raise
        try:
            if WORD.unpack_from(self._jmap, END)[0] != self._applied:
                self._catch_up()
            state = self._state
            claim = state.claims.get(start)
            if claim is None or claim.token != token or claim.expires <= self._clock():
                raise self._lost(job, "ack")
            body = ACK_ONE.pack(1, start, token)
            self._append_small(Kind.ACK, _ACK_ONE_KIND, _ACK_ONE_CRC, body)
            old_mark = state.mark
            state.settle(start, token)
            if (state.mark ^ old_mark) >> 32:
                self._mark_left_segment()
        finally:
            self._unlock_function(lock_argument)
            thread_lock.release()
        job.state = _ACKED  # JOB_TRANSITIONS[HELD, "ack"]
        self._held.discard(job)

    def _held_claims(self, jobs: list[Job], call: str) -> list[Claim]:
        """Check that every job is still held; raise ClaimLost naming the first that is not.  Lock held."""
        now = self._clock()
        claims = []
        for job in jobs:
            claim = self._state.claims.get(job._start)
            if claim is None or claim.token != job._token or claim.expires <= now:
                raise self._lost(job, call)
            claims.append(claim)
        return claims

    def _ack_many(self, jobs: list[Job]) -> None:
        for job in jobs:
            if job.state is not _HELD or job._queue is not self:
                self._refuse(job, "ack")
        if not jobs:
            return
        self._enter()
        try:
            self._held_claims(jobs, "ack")
            body = LIST_HEAD.pack(len(jobs)) + b"".join(PAIR.pack(job._start, job._token) for job in jobs)
            self._append(entry(Kind.ACK, body))
            state = self._state
            old_mark = state.mark
            for job in jobs:
                state.settle(job._start, job._token)
            if (state.mark ^ old_mark) >> 32:
                self._mark_left_segment()
        finally:
            self._unlock()
        for job in jobs:
            job.state = _ACKED
            self._held.discard(job)

    def _nack(self, jobs: list[Job], delay: float, reason: str | None) -> None:
        for job in jobs:
            if job.state is not _HELD or job._queue is not self:
                self._refuse(job, "nack")
        if not isinstance(delay, (int, float)) or isinstance(delay, bool) or not delay >= 0:
            raise UsageError(f"nack delay must be a number of seconds >= 0, not {delay!r}")
        if not jobs:
            return
        self._enter()
        try:
            claims = self._held_claims(jobs, "nack")
            now = self._clock()
            for job, claim in zip(jobs, claims, strict=True):
                text = reason if reason is not None else f"nacked (attempt {claim.attempt})"
                self._fail(job._start, claim, now + delay, text)
        finally:
            self._unlock()
        for job in jobs:
            job.state = _NACKED
            self._held.discard(job)
        self._wake_claimers()

    def _renew(self, jobs: list[Job], lease: float | None) -> None:
        for job in jobs:
            if job.state is not _HELD or job._queue is not self:
                self._refuse(job, "renew")
        if lease is None:
            lease = self.lease
        if not isinstance(lease, (int, float)) or isinstance(lease, bool) or not lease > 0:
            raise UsageError(f"lease must be a number of seconds > 0, not {lease!r}")
        if not jobs:
            return
        self._enter()
        try:
            self._held_claims(jobs, "renew")
            expires = self._clock() + lease
            body = RENEW_HEAD.pack(expires, len(jobs)) + b"".join(PAIR.pack(job._start, job._token) for job in jobs)
            self._append(entry(Kind.RENEW, body))
            for job in jobs:
                self._state.renew(job._start, job._token, expires)
        finally:
            self._unlock()
        for job in jobs:
            job.lease_expires_at = expires

    # -- lifetime --------------------------------------------------------

    def _sync_loop(self) -> None:
        interval = self._sync_interval
        assert interval
        while not self._stop_syncing.wait(interval):
            if self._dirty:
                self._dirty = False
                try:
                    self._enter()
                except (Closed, UsageError):
                    return
                try:
                    if self._journal is not None:
                        self._journal.sync()
                finally:
                    self._unlock()

    @staticmethod
    def remove(path: StrPath, group: str) -> None:
        """Unregister ``group`` so it no longer holds back segment deletion.

        Its state (claims, attempts) is deleted; its dead-letter queue is kept.
        Raises ``Locked`` if a WorkQueue of the group is open in any process.
        """
        import shutil

        check_name(group, "group name")
        directory = group_dir(path, group)
        member = os.path.join(directory, "open.lock")
        try:
            fd = open_file(member, os.O_RDWR, private=True, create=False)
        except FileNotFoundError:
            fd = -1
        try:
            if fd >= 0:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    raise Locked(
                        f"group {group!r} of {os.fspath(path)} is open in a live process; close it first",
                        path=member,
                        pid=None,
                    ) from None
            try:
                os.unlink(cursor_path(path, "g", group))
            except FileNotFoundError:
                pass
            shutil.rmtree(directory, ignore_errors=True)
            delete_consumed_segments(path)
        finally:
            if fd >= 0:
                os.close(fd)

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
        if self._sync_thread is not None:
            self._stop_syncing.set()
            self._sync_thread.join()
        try:
            if not self._forked:
                self._enter()
                try:
                    now = self._clock()
                    for job in sorted(self._held, key=lambda job: job._start):
                        start = job._start
                        claim = self._state.held(start, job._token)
                        if claim is not None and claim.expires > now:
                            self._fail(start, claim, now, f"worker closed its WorkQueue (attempt {claim.attempt})")
                            job.state = _NACKED
                    self._held.clear()
                    self._write_cursor()
                    if self._sync_interval is not None and self._journal is not None:
                        self._journal.sync()
                        self._cursor.sync()
                finally:
                    self._unlock()
                self._wake_claimers()
        finally:
            self._closed = True
            for waiter in self._all_waiters:
                waiter.close()
            self._waker.close()
            self._liveness.close()
            self._head_reader.close()
            self._reader.close()
            if self._dead_sender is not None:
                self._dead_sender.close()
            self._cursor.close()
            self._release_files()

    def _release_files(self) -> None:
        journal = getattr(self, "_journal", None)
        if journal is not None:
            journal.close()
            self._journal = None
        group_lock = getattr(self, "_group_lock", None)
        if group_lock is not None:
            group_lock.close()
        for fd in self._files:
            os.close(fd)
        self._files = []
        self._control.close()

    def _orphan(self) -> None:
        """In a forked child: the group lock's open file is shared with the parent, so never touch it."""
        self._forked = True
        self._closed = True

    def __enter__(self) -> "WorkQueue":
        return self

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.close()

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
