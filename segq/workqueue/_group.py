"""One process's handle on a work-queue group: the group transaction.

Theory of operation
-------------------
A group's state is the replay of its journal (``_journal``); each process
keeps a replica (``_claims.GroupState``) and changes it only inside a
*transaction* run by this module, the one place the sequence is written:

1. ``begin``: take the thread lock, replay lock-free what is already
   committed (entries below the end word never change), take the group lock
   (``_grouplock``), replay the rest, following a compaction if the journal
   was sealed;
2. the caller checks its operation against the replica and calls ``append``
   with one or more framed entries: they are copied past the end and
   published by one aligned store of the new end word, the commit point (a
   journal that is full is compacted first);
3. the caller applies the entries to the replica (the same ``GroupState``
   methods a replay calls) and reports a moved low-water mark with
   ``mark_moved``, which saves the cursor when the mark enters a new segment
   and deletes the segments every consumer has passed;
4. ``end``: drop both locks.

A SIGKILL at any instant leaves the old end word or the new one: an
operation that returned is never lost, none is half applied.  Power loss is
the ``sync`` policy's business: ``0.0`` (``"always"``) msyncs the pages an
append touched before it returns; a positive interval marks the handle dirty
for the owner's sync thread; ``None`` (``"never"``) leaves it to the OS.
"""

from __future__ import annotations

import logging
import mmap
import os
import threading
import time
import zlib
from typing import Callable

from .._flock import wait_flock
from .._fs import make_dir, open_file
from .._segment import StrPath, os_error
from .._retention import delete_consumed_segments, register_cursor
from .._state import ConsumerKind, CursorFile, cursor_path, same_segment
from . import _journal
from ._claims import STATE_BODY, GroupState, describe_word, load_state, replay
from ._grouplock import GROUPS_DIR, GroupLock
from ._journal import END, RETURNS, SEALED_MARK, WORD, Journal, Kind, entry

__all__ = ["GroupHandle", "CURSOR_INTERVAL", "membership_lock_path"]

#: How often (seconds) a group saves its low-water mark while it moves within one segment.
CURSOR_INTERVAL = 0.1
monotonic = time.monotonic

log = logging.getLogger(__name__)

_PAGE = mmap.ALLOCATIONGRANULARITY
_ENTRY_HEADER = _journal.ENTRY_HEADER
crc32 = zlib.crc32


def membership_lock_path(directory: str) -> str:
    """Return the file a group's open handles hold shared (``directory`` is the group's), which removal needs free."""
    return os.path.join(directory, "open.lock")


class GroupHandle:
    """Open group ``group`` of the queue at ``path`` in this process and run transactions on it.

    ``directory`` is the group's directory (created if missing); while the
    handle is open it holds ``open.lock`` shared, which ``WorkQueue.remove``
    needs free.  ``sync_interval`` is a parsed ``sync`` policy.  A handle may
    be shared by threads: ``begin`` excludes the other threads as well as the
    other processes.
    """

    def __init__(self, path: StrPath, group: str, directory: str, *, sync_interval: float | None) -> None:
        self.path = os.fspath(path)
        self.group = group
        self.directory = directory
        self.sync_interval = sync_interval
        self.dirty = False  # appended since the last sync (for a sync thread)
        self._member_fd = -1
        self._journal: Journal | None = None
        self._group_lock: GroupLock | None = None
        self._cursor: CursorFile | None = None
        self._applied = 0
        # Called in a transaction when the journal ends with an unfinished (or
        # just finished) ack with follow-ups: the owner finishes it (segq._outbox).
        self.on_outbox: Callable[[], None] | None = None
        self.cursor_due = 0.0  # monotonic time the cursor may next be saved within a segment (mark_moved)
        try:
            make_dir(self.path, GROUPS_DIR, group)
            member = membership_lock_path(directory)
            try:
                self._member_fd = open_file(member, os.O_RDWR, private=True)
            except OSError as error:
                raise os_error(error, "open", member) from None
            wait_flock(self._member_fd, member, shared=True, what="group membership")
            self._thread_lock = threading.Lock()
            group_lock = self._group_lock = GroupLock(directory)
            self._lock_function = group_lock.lock_function
            self._unlock_function = group_lock.unlock_function
            self._lock_argument = group_lock.lock_argument
            with group_lock:
                self._known_group = os.path.exists(cursor_path(self.path, ConsumerKind.GROUP, group))
                self._cursor = register_cursor(self.path, ConsumerKind.GROUP, group)
                self._open_journal()
        except BaseException:
            self.close()
            raise

    # -- the transaction -------------------------------------------------

    def begin(self) -> GroupState:
        """Take the locks and bring the replica up to date; return it.  Pair with ``end``."""
        thread_lock = self._thread_lock
        thread_lock.acquire()
        try:
            if WORD.unpack_from(self.map, END)[0] != self._applied:
                self._prefetch()
            result = self._lock_function(self._lock_argument)
            if result:
                assert self._group_lock is not None
                self._group_lock.recover(result)
        except BaseException:
            thread_lock.release()
            raise
        try:
            if WORD.unpack_from(self.map, END)[0] != self._applied:
                self._catch_up()
            if self.state.outbox is not None and self.on_outbox is not None:
                self.on_outbox()
        except BaseException:
            self.end()
            raise
        return self.state

    def end(self) -> None:
        """Drop the locks ``begin`` took."""
        self._unlock_function(self._lock_argument)
        self._thread_lock.release()

    def __enter__(self) -> GroupState:
        return self.begin()

    def __exit__(self, *exc_info: object) -> None:
        self.end()

    def append(self, *entries: bytes) -> None:
        """Commit framed ``entries`` (``_journal.entry``) with one store of the end word.  In a transaction.

        Several entries appended in one call land together or not at all.
        """
        data = entries[0] if len(entries) == 1 else b"".join(entries)
        start = self._applied
        stop = start + len(data)
        if stop > self.capacity:
            self.compact(len(data))
            start = self._applied
            stop = start + len(data)
        journal_map = self.map
        journal_map[start:stop] = data
        WORD.pack_into(journal_map, END, stop)
        self._applied = stop
        if self.sync_interval is not None:
            self._written(start, stop)

    def append_small(self, kind: int, kind_word: int, kind_crc: int, body: bytes) -> None:
        """Append one entry straight into the map when it fits and no sync is owed.  In a transaction.

        ``kind_word``/``kind_crc`` are the entry's precomputed header word and
        the CRC-32 state after it (``_journal.entry_prefix_crc``): the claim
        and ack fast paths pack one header and run one CRC.
        """
        at = self._applied
        stop = at + 8 + len(body)
        if stop > self.capacity or self.sync_interval is not None:
            self.append(entry(kind, body))
            return
        journal_map = self.map
        _ENTRY_HEADER.pack_into(journal_map, at, kind_word, crc32(body, kind_crc))
        journal_map[at + 8 : stop] = body
        WORD.pack_into(journal_map, END, stop)
        self._applied = stop

    def mark_moved(self, old_mark: int) -> None:
        """Save the cursor as the mark moves; delete consumed segments if it entered a new one.  In a transaction.

        Within a segment the cursor is saved at most every
        ``CURSOR_INTERVAL`` seconds: it delays no deletion there, and a
        reader of positions (``Sender.enqueue``'s dedup window) sees acks
        that late at most.
        """
        if not same_segment(self.state.mark, old_mark):
            self.write_cursor()
            delete_consumed_segments(self.path)
        elif self.state.mark != old_mark:
            now = monotonic()
            if now >= self.cursor_due:
                self.cursor_due = now + CURSOR_INTERVAL
                self.write_cursor()

    def bump_returns(self) -> None:
        """Count a record made claimable again (waiting claimers watch the word).  In a transaction."""
        WORD.pack_into(self.map, RETURNS, WORD.unpack_from(self.map, RETURNS)[0] + 1)

    def write_cursor(self) -> None:
        """Save the exact low-water mark in the group's cursor file.  In a transaction."""
        mark = self.state.mark
        cursor = self._cursor
        assert cursor is not None
        cursor.reload()
        if cursor.position.word != mark:
            cursor.write_word(mark)
            if self.sync_interval == 0.0:
                cursor.sync()

    def sync(self) -> None:
        """Make the journal and the cursor survive power loss.  In a transaction."""
        if self._journal is not None:
            self._journal.sync()
        if self._cursor is not None:
            self._cursor.sync()

    def compact(self, room: int = 0) -> None:
        """Replace the journal with a snapshot of the state, with ``room`` to spare.  In a transaction."""
        old = self._journal
        assert old is not None
        body = self.state.snapshot()
        capacity = max(_journal.DEFAULT_CAPACITY, 2 * (len(body) + room) + _journal.HEADER_SIZE)
        durable = self.sync_interval is not None
        temporary = _journal.prepare_journal(self.directory, old.generation + 1, body, capacity=capacity, durable=durable)
        # Seal first, then rename: whoever finds the old journal sealed reopens
        # the name; if we die in between, the sealed one is still the current
        # one and the next lock holder unseals it (see _journal).
        old.seal()
        _journal.install_journal(self.directory, temporary, durable=durable)
        old.close()
        self._set_journal(Journal(self.directory))
        self.write_cursor()

    @property
    def returns(self) -> int:
        """The returns counter (no lock needed: a cache word)."""
        value: int = WORD.unpack_from(self.map, RETURNS)[0]
        return value

    # -- the journal's life ----------------------------------------------

    def _prefetch(self) -> None:
        """Replay what other processes committed, before taking the group lock.

        Entries below the end word never change, so reading them needs no
        lock; this moves most of the replay out of the serial section.  Only
        the thread lock is held (the replica is this process's).
        """
        end = WORD.unpack_from(self.map, END)[0]
        if end <= self.capacity:  # not sealed
            self._applied = replay(self.state, self.map, self.journal_path, self._applied, end, optimistic=True)

    def _catch_up(self) -> None:
        """Apply what other processes appended; follow a compaction.  Group lock held."""
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
        self._applied = replay(self.state, journal.map, journal.path, self._applied, end)

    def _open_journal(self) -> None:
        """Open (creating or repairing if needed) the journal and load the replica.  Group lock held."""
        while True:
            try:
                journal = Journal(self.directory)
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
            self.state = load_state(journal)
        except BaseException:
            journal.close()
            raise
        self._set_journal(journal)
        self._reconcile_with_cursor()

    def _create_journal(self) -> None:
        assert self._cursor is not None
        position = self._cursor.reload()
        word = position.word
        if self._known_group:
            log.warning(
                "%s: the journal is missing; rebuilding it at the low-water mark (%s): "
                "records above it will be claimed again",
                self.directory,
                position,
            )
        body = entry(Kind.STATE, STATE_BODY.pack(word, word, 1, 0, 0))
        _journal.write_journal(
            self.directory, 1, body, capacity=_journal.DEFAULT_CAPACITY, durable=self.sync_interval is not None
        )

    def _set_journal(self, journal: Journal) -> None:
        self._journal = journal
        self.journal_path = journal.path
        self.map = journal.map
        self.capacity = journal.capacity
        self._applied = journal.end

    def _reconcile_with_cursor(self) -> None:
        """Trust the cursor over the journal when it is ahead (a journal page lost to power failure)."""
        assert self._cursor is not None
        position = self._cursor.reload()
        floor = position.word
        state = self.state
        if floor <= state.mark:
            return
        log.warning(
            "%s: the low-water mark in the journal (%s) is behind the cursor (%s); moving it up",
            self.directory,
            describe_word(state.mark),
            position,
        )
        state.raise_mark(floor)
        self.compact()

    def _written(self, start: int, stop: int) -> None:
        if self.sync_interval == 0.0:
            page = start & ~(_PAGE - 1)
            self.map.flush(page, stop - page)
        else:
            self.dirty = True

    # -- lifetime --------------------------------------------------------

    def close(self) -> None:
        """Unmap the journal and release every file; safe to call twice (and on a half-open handle)."""
        if self._journal is not None:
            self._journal.close()
            self._journal = None
        if self._cursor is not None:
            self._cursor.close()
            self._cursor = None
        if self._group_lock is not None:
            self._group_lock.close()
            self._group_lock = None
        if self._member_fd >= 0:
            os.close(self._member_fd)
            self._member_fd = -1
