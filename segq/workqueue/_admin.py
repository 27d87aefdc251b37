"""Work-queue groups from the outside: list, inspect, recover, requeue dead letters, remove.

Theory of operation
-------------------
These functions run in a process that has no WorkQueue open (``segq info``,
``segq recover``, ``segq requeue-dead``), maybe while workers run; the CLI
only renders what they return.  They take
the group lock, read the journal into a state (``_claims.load_state``), and
release it.  ``recover_group`` writes a repaired state back as a fresh,
compacted journal and seals the old one, exactly as a compaction does, so
live workers reload it at their next operation.
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from itertools import accumulate
from typing import Any, Iterator

from . import _journal
from ._claims import GroupState, describe_word, load_state
from ._deadletter import DeadLetter, dead_letter_path
from .._format import HEADER_SIZE, SEGMENT_HEADER_SIZE, RecordStatus, decode_record, decode_run
from .._fs import make_dir, open_file, open_to_read
from .._control import existing_queue
from .._headers import Framed
from ._group import membership_lock_path
from ._grouplock import GROUPS_DIR, GroupLock, group_dir
from ._index import ClaimIndex
from ._stats import GroupStats, group_stats
from ._journal import Journal
from .._lock import process_is_alive
from .._segment import MappedSegment, StrPath, list_segments, queue_segment_size, scan_records
from .._state import (
    CURSOR_DIR,
    ConsumerKind,
    CursorFile,
    Position,
    check_name,
    cursor_path,
    read_position,
)
from .._retention import delete_consumed_segments
from ..errors import CorruptionError, Empty, Locked, SegqError

__all__ = [
    "GROUPS_DIR",
    "group_dir",
    "group_lock",
    "list_groups",
    "group_info",
    "read_group_stats",
    "GroupRecovery",
    "recover_group",
    "recover_groups",
    "requeue_dead",
    "remove_group",
]

log = logging.getLogger(__name__)

_RUN = 1 << 14  # records decoded in one C call by the read-only index of ``_stats_of``

@contextmanager
def group_lock(directory: str) -> Iterator[None]:
    """Hold the group lock (the one every WorkQueue transaction takes)."""
    lock = GroupLock(directory)
    try:
        with lock:
            yield
    finally:
        lock.close()


def _position(word: int) -> dict[str, int]:
    position = Position.from_word(word)
    return {"segment": position.segment, "offset": position.offset}


def list_groups(path: StrPath) -> list[str]:
    """Return the names of the work-queue groups registered in the queue at ``path``."""
    names = set()
    try:
        for file_name in os.listdir(os.path.join(path, CURSOR_DIR)):
            if file_name.startswith("g.") and file_name.endswith(".pos"):
                names.add(file_name[2:-4])
    except FileNotFoundError:
        pass
    try:
        names.update(os.listdir(os.path.join(path, GROUPS_DIR)))
    except FileNotFoundError:
        pass
    return sorted(names)


def _require_group(path: StrPath, group: str) -> str:
    directory = group_dir(path, group)
    if not os.path.isdir(directory):
        raise SegqError(f"{os.fspath(path)} has no work-queue group {group!r} (no {directory})")
    return directory


def _count_records(queue_dir: str) -> int:
    """Count the records a queue's "default" receiver has not committed (read-only scan)."""
    segments = list_segments(queue_dir)
    if not segments:
        return 0
    try:
        start = read_position(cursor_path(queue_dir, ConsumerKind.RECEIVER, "default"))
    except SegqError:
        start = Position.bottom(segments[0])
    segments_read = _segments_from(queue_dir, start)
    return sum(scan_records(segment.map, offset, segment.size).records for segment, offset in segments_read)


def _segments_from(queue_dir: str, start: Position) -> Iterator[tuple[MappedSegment, int]]:
    """Yield each segment from ``start`` on, mapped read-only, with the offset to read it from.

    Each is closed when the loop moves on; one consumed and deleted meanwhile is skipped.
    """
    for number in list_segments(queue_dir):
        if number < start.segment:
            continue
        try:
            segment = MappedSegment(queue_dir, number, writable=False)
        except FileNotFoundError:
            continue
        try:
            yield segment, start.offset if number == start.segment else SEGMENT_HEADER_SIZE
        finally:
            segment.close()


def _is_open(directory: str) -> bool:
    try:
        fd = open_to_read(membership_lock_path(directory))
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def group_info(path: StrPath, group: str = "default", *, dead_letter: StrPath | None = None) -> dict[str, Any]:
    """Return a JSON-ready description of ``group``: mark, head, claims in flight, waiting records, dead letters.

    ``claims`` lists each claim's position, owner PID (and whether it lives),
    lease end (seconds since the epoch) and attempt; ``waiting`` the records
    given back, with their attempts so far, when they may go again and why
    they came back.  A group whose first worker is still opening it (no
    journal yet) is reported with ``opening`` true, nothing claimed.
    """
    directory = _require_group(path, group)
    with group_lock(directory):
        try:
            journal: Journal | None = Journal(directory)
        except FileNotFoundError:
            journal = None  # a worker is opening the group: it writes the journal under this lock
        if journal is None:
            state = _opening_state(path, group)
            end = generation = capacity = 0
        else:
            try:
                if journal.sealed and journal.is_current():
                    end = journal.word(_journal.SEALED)
                else:
                    end = journal.end
                state = load_state(journal, end)
                generation, capacity = journal.generation, journal.capacity
            finally:
                journal.close()
    now = time.time()
    claims = []
    for start, claim in sorted(state.claims.items()):
        pid, started = claim.owner
        claims.append(
            {
                "position": _position(start),
                "owner_pid": pid,
                "owner_alive": process_is_alive(pid, started),
                "lease_expires_at": claim.expires,
                "lease_left": round(claim.expires - now, 3),
                "attempt": claim.attempt,
            }
        )
    waiting = [
        {
            "position": _position(start),
            "attempts": item.attempts,
            "available_at": item.available_at,
            "reason": item.reason,
        }
        for start, item in sorted(state.waiting.items())
    ]
    dead_dir = os.fspath(dead_letter) if dead_letter is not None else dead_letter_path(path, group)
    stats = _stats_of(os.fspath(path), state, now)
    return {
        "group": group,
        "low_water_mark": _position(state.mark),
        "claim_head": _position(state.head),
        "claims": claims,
        "waiting": waiting,
        "done_above_mark": len(state.done),
        "dead_lettered_total": state.dead_total,
        "dead_letter_queue": dead_dir,
        "dead_letters_pending": _count_records(dead_dir) if os.path.isdir(dead_dir) else 0,
        "journal": {"bytes": end, "capacity": capacity, "generation": generation},
        "stats": stats.to_dict(),
        "open": _is_open(directory),
        "opening": journal is None,  # no journal yet: nothing claimed, everything past the cursor pending
    }


def _opening_state(path: StrPath, group: str) -> GroupState:
    """Return the state a group's first journal starts from: nothing claimed, head and mark at its cursor."""
    try:
        position = read_position(cursor_path(path, ConsumerKind.GROUP, group))
    except SegqError:  # not registered yet (or being written): the group starts at the oldest record
        segments = list_segments(path)
        position = Position.bottom(segments[0]) if segments else Position.bottom(0)
    return GroupState(position.word, position.word)


def _stats_of(path: str, state: GroupState, now: float) -> GroupStats:
    """Index, read-only, the records past the state's head and return the group's stats."""
    index = ClaimIndex()
    index.follow(state)
    index.saw(now)
    for segment, offset in _segments_from(path, Position.from_word(state.head)):
        base = Position(segment.number, 0).word  # a record's word is base + its offset: no Position per record
        while True:
            # Runs of intact records in one C call each; decode_record has the last word on where they end.
            payloads, end = decode_run(segment.map, offset, _RUN)  # type: ignore[arg-type]  # C reads any buffer
            if payloads:
                # One run lies in one segment: each record ends where the next starts.
                positions = list(accumulate(map(HEADER_SIZE.__add__, map(len, payloads)), initial=base + offset))
                index.add_batch(payloads, positions[:-1], positions[1:], Framed in set(map(type, payloads)), now, path)
                offset = end
                continue
            record = decode_record(segment.map, offset, segment.size)
            if record.status is not RecordStatus.OK:
                break  # the end of what is written (or damage, which `segq verify` reports)
            start = base + offset
            data = segment.map[record.start : record.end]
            payload = Framed(data) if record.headed else data
            index.add_batch([payload], [start], [base + record.end], record.headed, now, path)
            offset = record.end
    return group_stats(state, index, now)


def read_group_stats(path: StrPath, group: str = "default") -> GroupStats:
    """Return ``group``'s GroupStats without opening a WorkQueue (``segq info``, the metrics collector)."""
    directory = _require_group(path, group)
    with group_lock(directory):
        journal = Journal(directory)
        try:
            end = journal.word(_journal.SEALED) if journal.sealed and journal.is_current() else journal.end
            state = load_state(journal, end)
        finally:
            journal.close()
    return _stats_of(os.fspath(path), state, time.time())


@dataclass
class GroupRecovery:
    """What ``recover_group`` found and did (or, with ``dry_run``, would do)."""

    group: str
    dry_run: bool
    repairs: list[str] = field(default_factory=list)  # each also logged at WARNING
    returned: list[dict[str, Any]] = field(default_factory=list)  # claims of dead workers given back

    def to_dict(self) -> dict[str, Any]:
        return {"group": self.group, "dry_run": self.dry_run, "repairs": self.repairs, "returned": self.returned}


def _valid_prefix(journal: Journal, end: int) -> tuple[GroupState | None, int, str]:
    """Replay entry by entry; return the state of the longest valid prefix, its end, and what stopped it."""
    try:
        return load_state(journal, end), end, ""
    except CorruptionError as error:
        bad, problem = error.offset, error.problem
    if bad <= _journal.HEADER_SIZE:
        return None, _journal.HEADER_SIZE, problem
    state = load_state(journal, bad)
    return state, bad, problem


def recover_group(path: StrPath, group: str = "default", *, dry_run: bool = False) -> GroupRecovery:
    """Repair ``group``'s state and give back the claims of dead workers; replay strategy.

    Removes leftovers of interrupted compactions, keeps the valid prefix of a
    damaged journal (dropped entries mean records delivered again, never
    records lost), rebuilds a missing or unreadable journal at the low-water
    mark, moves the mark above deleted segments, and gives back every claim
    whose worker process is dead (its attempt counts).  Safe while workers
    run.  ``dry_run`` reports without changing anything.
    """
    path = os.fspath(path)
    check_name(group, "group name")
    directory = group_dir(path, group)
    if not os.path.isdir(directory) and not os.path.exists(cursor_path(path, ConsumerKind.GROUP, group)):
        raise SegqError(f"{path} has no work-queue group {group!r}")
    report = GroupRecovery(group, dry_run)

    def repair(message: str) -> None:
        report.repairs.append(message)
        if not dry_run:
            log.warning("%s: %s", directory, message)

    make_dir(path, GROUPS_DIR, group)
    with group_lock(directory):
        if dry_run:
            leftovers = [name for name in os.listdir(directory) if name.startswith("journal.") and name.endswith(".tmp")]
        else:
            leftovers = _journal.remove_leftovers(directory)
        for name in leftovers:
            repair(f"removed {os.path.basename(name)}, left by an interrupted compaction")
        cursor_file = cursor_path(path, ConsumerKind.GROUP, group)
        try:
            cursor: Position | None = read_position(cursor_file)
        except SegqError:
            cursor = None
            repair(f"cursor {cursor_file} is missing or damaged; rewriting it from the journal")
        segments = list_segments(path)
        state, old, rewrite = _recover_journal(directory, cursor, segments, repair)
        floor = cursor.word if cursor is not None else 0
        if segments:
            floor = max(floor, Position.bottom(segments[0]).word)
        if floor > state.mark:
            repair(f"moved the low-water mark from {describe_word(state.mark)} to {describe_word(floor)}")
            state.raise_mark(floor)
            rewrite = True
        now = time.time()
        for start, claim in sorted(state.claims.items()):
            pid, started = claim.owner
            if not process_is_alive(pid, started):
                report.returned.append({"position": _position(start), "owner_pid": pid, "attempt": claim.attempt})
                state.give_back(start, claim.token, now, claim.attempt, f"worker PID {pid} died (given back by recovery)")
                rewrite = True
        if report.returned:
            repair(f"gave back {len(report.returned)} claims of dead workers")
        if rewrite and not dry_run:
            _install_state(directory, state, old)
        if (cursor is None or rewrite) and not dry_run:
            position = Position.from_word(state.mark)
            cursor_state = CursorFile(cursor_file, initial=position)
            try:
                if cursor_state.position != position:
                    cursor_state.write(position)
                cursor_state.sync()
            finally:
                cursor_state.close()
        if old is not None:
            old.close()
    return report


def recover_groups(path: StrPath, *, dry_run: bool = False) -> list[GroupRecovery]:
    """Run :func:`recover_group` on every group of the queue at ``path``; return their reports."""
    return [recover_group(path, group, dry_run=dry_run) for group in list_groups(path)]


def _recover_journal(
    directory: str, cursor: Position | None, segments: list[int], repair: Any
) -> tuple[GroupState, Journal | None, bool]:
    """Return the best state the journal gives, the open journal (or None), and whether to rewrite it."""
    try:
        journal: Journal | None = Journal(directory)
    except FileNotFoundError:
        journal = None
        repair("the journal is missing; rebuilt it at the low-water mark (records above it will be claimed again)")
    except CorruptionError as error:
        journal = None
        repair(f"the journal is unreadable ({error.problem}); rebuilt it at the low-water mark")
    if journal is None:
        word = (cursor if cursor is not None else Position.bottom(segments[0] if segments else 0)).word
        return GroupState(word, word), None, True
    rewrite = False
    end = journal.end
    if journal.sealed:
        end = journal.word(_journal.SEALED)
        repair("the journal was sealed by a compaction that did not finish; kept it")
        rewrite = True
    state, good, problem = _valid_prefix(journal, end)
    if state is None:
        repair(f"the journal's first entry is damaged ({problem}); rebuilt it at the low-water mark")
        word = (cursor if cursor is not None else Position.bottom(0)).word
        return GroupState(word, word), journal, True
    if good < end:
        repair(
            f"cut the journal at offset {good} ({problem}): {end - good} bytes of later operations are lost, "
            "so some records will be claimed again"
        )
        rewrite = True
    return state, journal, rewrite


def _install_state(directory: str, state: GroupState, old: Journal | None) -> None:
    """Write ``state`` as a fresh journal, sealing the old one so live workers reload."""
    body = state.snapshot()
    generation = (old.generation + 1) if old is not None else 1
    capacity = max(_journal.DEFAULT_CAPACITY, 2 * len(body) + _journal.HEADER_SIZE)
    temporary = _journal.prepare_journal(directory, generation, body, capacity=capacity, durable=True)
    if old is not None and not old.sealed:
        old.seal()
    _journal.install_journal(directory, temporary, durable=True)


def requeue_dead(
    path: StrPath, group: str = "default", *, dead_letter: StrPath | None = None, limit: int | None = None
) -> int:
    """Move dead letters of ``group`` back into the queue at ``path`` as new records; return how many.

    The dead-letter queue is read with its "default" receiver (so ``Locked``
    if one is open); each record's original payload is sent again, with fresh
    attempts, and the dead letter committed.  A crash mid-way can requeue a
    letter twice, never lose one.
    """
    from ..receiver import Receiver
    from ..sender import Sender

    dead_dir = os.fspath(dead_letter) if dead_letter is not None else dead_letter_path(path, group)
    if not list_segments(dead_dir):
        return 0
    segment_size = queue_segment_size(path)  # as `segq send` would write to it
    moved = 0
    sender = None
    try:
        with Receiver(dead_dir) as receiver:
            while limit is None or moved < limit:
                count = 1000 if limit is None else min(1000, limit - moved)
                try:
                    batch = receiver.recv_batch(count, timeout=0)
                except Empty:
                    break
                letters = [DeadLetter.decode(message.data, message.headers) for message in batch]
                if sender is None:
                    sender = Sender(path, segment_size=segment_size)
                for letter in letters:
                    sender.send(letter.original())
                batch.commit()
                moved += len(letters)
    finally:
        if sender is not None:
            sender.close()
    if moved:
        log.info("%s: requeued %d dead letters of group %r", os.fspath(path), moved, group)
    return moved



def remove_group(path: StrPath, group: str) -> None:
    """Unregister ``group`` so it no longer holds back segment deletion.

    Its state (claims, attempts) is deleted; its dead-letter queue is kept.
    Raises ``Locked`` if a WorkQueue of the group is open in any process.
    """
    check_name(group, "group name")
    path = existing_queue(path)
    directory = group_dir(path, group)
    member = membership_lock_path(directory)
    fd = -1
    if os.path.isdir(directory):  # else the group never opened here: nothing to lock, maybe a cursor to drop
        try:
            fd = open_file(member, os.O_RDWR, private=True, create=False)
        except FileNotFoundError:
            pass
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
            os.unlink(cursor_path(path, ConsumerKind.GROUP, group))
        except FileNotFoundError:
            pass
        shutil.rmtree(directory, ignore_errors=True)
        delete_consumed_segments(path)
    finally:
        if fd >= 0:
            os.close(fd)
