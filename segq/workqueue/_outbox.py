"""Follow-ups enqueued atomically with an ack: the outbox in the group journal.

Theory of operation
-------------------
``job.ack(enqueue=[...])`` is one transaction under the group lock
(``workqueue``), in this order:

1. check that the claim is still held (if not: ``ClaimLost``, nothing written);
2. read each target queue's tail word (``floor``: every follow-up delivered
   from now on lands at or above it);
3. append an OUTBOX journal entry holding the ack of the claim *and* every
   follow-up (its bytes, options, target queue and floor).  Storing the
   journal's end word commits the ack and the follow-ups together: this is
   the commit point;
4. *pin* each target queue other than the job's own at its floor
   (``cursors/o.<source>.pos`` there: a cursor, so the target keeps its
   segments from the floor on while it holds);
5. deliver the follow-ups in order: each is sent into its queue carrying the
   reserved header ``segq-from: <source>:<token>:<index>``, where
   ``<source>`` names the (queue, group) and ``<token>`` the claim;
6. append SENT; 7. release the pins (park them past any position); unlock.

A SIGKILL before 3 leaves the claim held (it comes back like any dead
worker's) and no follow-up.  From 3 on the ack stands and the follow-ups
must all land: the group lock is still held by the dead process, so the
next process to take it (the robust mutex tells it the holder died) replays
the journal and finds the OUTBOX entry *last*.  Before doing anything else
it finishes it: pins the targets, scans each target from the floor for
records carrying this outbox's markers, delivers the follow-ups it did not
find, appends SENT and releases the pins.  Finishers work under the group
lock, one at a time; the floor bounds the scan from below and the pin keeps
everything above the floor on disk until SENT, so a follow-up delivered
before the crash is always found: each lands exactly once.  A SENT last in
the journal tells the next lock holder to release the pins again (the
releaser may have died between 6 and 7); releasing twice is harmless.

The job's own queue needs no pin: the group's own low-water mark is below
the floor, so the queue keeps those segments anyway.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import random
import signal
import struct
from dataclasses import dataclass, field

from .._followups import Enqueue
from .._headers import Framed, frame_body, split_body
from .._options import JobOptions, check_options, check_user_headers, encode_options
from .._reader import RecordReader
from .._retention import register_cursor
from .._segment import list_segments, os_error, queue_segment_size
from .._state import RELEASED_SEGMENT, ConsumerKind, CursorFile, Position
from ..errors import DuplicateJobId, InvalidArgument, RecordTooLarge
from .._args import SyncPolicy
from ..sender import Sender
from ._claims import OUTBOX_HEAD

log = logging.getLogger(__name__)

__all__ = [
    "FollowUp",
    "OutboxEntry",
    "Outbox",
    "FROM_HEADER",
    "PIN_KIND",
    "PIN_RELEASED",
    "source_id",
    "follow_ups",
    "crash_point",
]

#: The reserved header each delivered follow-up carries: ``<source>:<token>:<index>``.
FROM_HEADER = "segq-from"
#: Pins are cursors of this kind in the target queue.
PIN_KIND = ConsumerKind.PIN
#: A released pin's segment number: past any real one, and skipped by retention.
PIN_RELEASED = RELEASED_SEGMENT

_HEAD = OUTBOX_HEAD  # acked record's start, claim token, follow-up count

# Tests only: SEGQ_TEST_CRASH_AT="<point>:<probability>" makes crash_point(<point>)
# SIGKILL this process with that probability (the kill-loop proof in
# tests/test_chains_crash.py).  Read once, at import; unset, a check is one compare.
_CRASH_POINT, _, _CRASH_ODDS = (os.environ.get("SEGQ_TEST_CRASH_AT") or "").partition(":")
# target path length, floor word, run_at (NaN: none), priority, dedup key length,
# job id length, header count, data length
_ITEM = struct.Struct("<HQdBHHHI")
_HEADER_ITEM = struct.Struct("<HI")  # key length, value length


@dataclass
class FollowUp:
    """One follow-up as the journal keeps it: resolved target, absolute time, bytes."""

    target: str  # "" for the acked job's own queue
    data: bytes
    run_at: float | None = None
    priority: int = 0
    dedup_key: str | None = None
    job_id: str | None = None
    headers: dict[str, bytes] = field(default_factory=dict)
    floor: int = 0  # the target's tail word when the ack committed


@dataclass
class OutboxEntry:
    """An OUTBOX journal entry: the ack of (``start``, ``token``) and its follow-ups."""

    start: int
    token: int
    items: list[FollowUp]

    def encode(self) -> bytes:
        parts = [_HEAD.pack(self.start, self.token, len(self.items))]
        for item in self.items:
            target = item.target.encode("utf-8")
            dedup = (item.dedup_key or "").encode("utf-8")
            job_id = (item.job_id or "").encode("utf-8")
            run_at = math.nan if item.run_at is None else item.run_at
            parts.append(
                _ITEM.pack(
                    len(target), item.floor, run_at, item.priority, len(dedup), len(job_id),
                    len(item.headers), len(item.data),
                )
            )
            parts += [target, dedup, job_id]
            for key, value in item.headers.items():
                name = key.encode("utf-8")
                parts += [_HEADER_ITEM.pack(len(name), len(value)), name, value]
            parts.append(item.data)
        return b"".join(parts)

    @classmethod
    def decode(cls, body: bytes) -> "OutboxEntry":
        """Parse an OUTBOX body; ValueError (or struct.error) on a malformed one."""
        start, token, count = _HEAD.unpack_from(body, 0)
        at = _HEAD.size
        items = []
        for _ in range(count):
            target_size, floor, run_at, priority, dedup_size, id_size, header_count, data_size = _ITEM.unpack_from(
                body, at
            )
            at += _ITEM.size
            target = body[at : at + target_size].decode("utf-8")
            at += target_size
            dedup = body[at : at + dedup_size].decode("utf-8")
            at += dedup_size
            job_id = body[at : at + id_size].decode("utf-8")
            at += id_size
            headers = {}
            for _ in range(header_count):
                name_size, value_size = _HEADER_ITEM.unpack_from(body, at)
                at += _HEADER_ITEM.size
                name = body[at : at + name_size].decode("utf-8")
                at += name_size
                headers[name] = body[at : at + value_size]
                at += value_size
            data = body[at : at + data_size]
            at += data_size
            if len(data) != data_size:
                raise ValueError("OUTBOX entry ends inside a follow-up")
            items.append(
                FollowUp(
                    target, data, None if math.isnan(run_at) else run_at, priority, dedup or None, job_id or None,
                    headers, floor,
                )
            )
        if at != len(body):
            raise ValueError("OUTBOX entry has bytes past its last follow-up")
        return cls(start, token, items)

    @staticmethod
    def claim_of(body: bytes) -> tuple[int, int]:
        """Return the (start, token) an OUTBOX body acks."""
        start, token, _ = _HEAD.unpack_from(body, 0)
        return start, token


def crash_point(name: str) -> None:
    """Die here (SIGKILL) if the test environment asks for it; see ``SEGQ_TEST_CRASH_AT``."""
    if _CRASH_POINT == name and random.random() < float(_CRASH_ODDS or 1):
        os.kill(os.getpid(), signal.SIGKILL)


def source_id(queue_path: str, group: str) -> str:
    """Name the (queue, group) follow-ups come from: 16 hex digits, the same from every process."""
    key = os.path.realpath(queue_path).encode("utf-8", "surrogateescape") + b"\0" + group.encode("utf-8")
    return hashlib.blake2b(key, digest_size=8).hexdigest()


def follow_ups(requests: list[Enqueue], now: float) -> list[FollowUp]:
    """Resolve what ``ack(enqueue=...)`` was given: check it as ``Sender.enqueue`` would, make times absolute.

    Raises ``InvalidArgument`` (nothing written) on a bad follow-up.
    """
    items = []
    for request in requests:
        if not isinstance(request, Enqueue):
            raise InvalidArgument(f"ack(enqueue=...) takes a list of segq.Enqueue, not {type(request).__name__}")
        options = check_options(
            run_at=request.run_at,
            delay=request.delay,
            priority=request.priority,
            dedup_key=request.dedup_key,
            job_id=request.job_id,
            now=now,
        )
        headers = check_user_headers(request.headers)
        target = "" if request.queue is None else os.fspath(request.queue)
        items.append(
            FollowUp(
                target, request.data, options.run_at or None, options.priority, options.dedup_key, options.job_id,
                headers,
            )
        )
    return items


class Outbox:
    """A WorkQueue's side of delivering follow-ups: target senders, pins, delivery and the crash scan."""

    def __init__(self, queue_path: str, group: str, sync: SyncPolicy) -> None:
        self._queue_path = queue_path
        self.source = source_id(queue_path, group)
        self._sync = sync
        self._senders: dict[str, Sender] = {}
        self._pins: dict[str, CursorFile] = {}
        self._foreign: dict[str, bool] = {}  # target as given -> is it another queue than ours?

    def _is_foreign(self, target: str) -> bool:
        """Tell whether ``target`` names a queue other than the job's own (cached: realpath costs syscalls)."""
        foreign = self._foreign.get(target)
        if foreign is None:
            foreign = self._foreign[target] = bool(target) and os.path.realpath(target) != os.path.realpath(
                self._queue_path
            )
        return foreign

    def path_of(self, item: FollowUp) -> str:
        return item.target or self._queue_path

    def sender(self, path: str) -> Sender:
        """Return the (cached) Sender for a target queue, creating the queue if missing."""
        sender = self._senders.get(path)
        if sender is None:
            try:
                # Sized as segq send sizes a queue it was given without a segment size.
                sender = Sender(path, segment_size=queue_segment_size(path), sync=self._sync)
            except OSError as error:
                raise os_error(error, "open the follow-up queue", path) from None
            self._senders[path] = sender
        return sender

    def check(self, items: list[FollowUp]) -> None:
        """Refuse, before anything is written, a follow-up its target could never take."""
        for item in items:
            sender = self.sender(self.path_of(item))
            if len(item.data) > sender.max_record_size:
                raise RecordTooLarge(
                    f"a follow-up of {len(item.data)} bytes is larger than {self.path_of(item)} accepts "
                    f"({sender.max_record_size} bytes); nothing was acked",
                    size=len(item.data),
                    limit=sender.max_record_size,
                )

    def set_floors(self, items: list[FollowUp]) -> None:
        """Record each target's tail word now: deliveries from here on land at or above it."""
        for item in items:
            item.floor = self.sender(self.path_of(item))._control.tail().word

    def _pin(self, path: str) -> CursorFile:
        pin = self._pins.get(path)
        if pin is None:
            try:
                pin = self._pins[path] = register_cursor(path, PIN_KIND, self.source)
            except OSError as error:
                raise os_error(error, "pin the follow-up queue", path) from None
        return pin

    def pin(self, items: list[FollowUp]) -> None:
        """Hold every target but the own queue at its lowest floor (its segments from there are kept)."""
        floors: dict[str, int] = {}
        for item in items:
            if self._is_foreign(item.target):
                path = self.path_of(item)
                floors[path] = min(floors.get(path, item.floor), item.floor)
        for path, floor in floors.items():
            # Every process of the group writes this file (under the group lock): write over the newest slot.
            where = Position.from_word(floor)
            self._pin(path).write_over(where.segment, where.offset)

    def release(self, items: list[FollowUp]) -> None:
        """Park the pins past every position: they hold nothing back any more."""
        for item in items:
            if self._is_foreign(item.target):
                self._pin(self.path_of(item)).write_over(PIN_RELEASED, 0)

    def marker(self, token: int, index: int) -> bytes:
        return f"{self.source}:{token}:{index}".encode()

    def deliver(self, entry: OutboxEntry, skip: set[int]) -> None:
        """Send every follow-up of ``entry`` not in ``skip`` into its queue, in order, with its marker."""
        for index, item in enumerate(entry.items):
            if index in skip:
                continue
            if index:
                crash_point("between-follow-ups")
            headers = dict(item.headers)
            headers[FROM_HEADER] = self.marker(entry.token, index)
            _send(self.sender(self.path_of(item)), item, headers)
        crash_point("before-sent")

    def delivered(self, entry: OutboxEntry) -> set[int]:
        """Return the indices of ``entry``'s follow-ups already in their queues (scanning up from the floors)."""
        found: set[int] = set()
        prefix = f"{self.source}:{entry.token}:".encode()
        floors: dict[str, int] = {}
        for item in entry.items:
            path = self.path_of(item)
            floors[path] = min(floors.get(path, item.floor), item.floor)
        for path, floor in floors.items():
            for marker in _markers_from(self.sender(path), floor):
                if marker.startswith(prefix):
                    try:
                        found.add(int(marker[len(prefix) :]))
                    except ValueError:
                        continue
        return found

    def close(self) -> None:
        for sender in self._senders.values():
            sender.close()
        self._senders.clear()
        for pin in self._pins.values():
            pin.close()
        self._pins.clear()


def _send(sender: Sender, item: FollowUp, headers: dict[str, bytes]) -> None:
    """Send one follow-up with its options (reserved headers, as ``Sender.enqueue`` writes them) and headers.

    A follow-up with a dedup key or a job id goes through the queue's dedup
    index: a key that matches writes nothing (as ``enqueue`` would); an id
    taken since the ack committed cannot be refused any more, so the
    follow-up is dropped with a warning.
    """
    options = JobOptions(item.priority, item.run_at or 0.0, item.dedup_key, item.job_id)
    body = frame_body(item.data, {**headers, **encode_options(options)}, allow_reserved=True)
    if options.dedup_key is None and options.job_id is None:
        sender.send(body)
        return
    try:
        sender._dedup_index().enqueue(sender, body, options)
    except DuplicateJobId as error:
        log.warning("%s: a follow-up was dropped: %s", sender.path, error)


def _markers_from(sender: Sender, floor: int) -> list[bytes]:
    """Return the ``segq-from`` header of every record of the sender's queue from ``floor`` on.

    Starts at the oldest segment instead when the floor's is gone (nothing of
    ours was in it: our deliveries come after the pin that keeps it).
    """
    path = sender.path
    segments = list_segments(path)
    if not segments:
        return []
    position = max(floor, Position.bottom(segments[0]).word)
    reader = RecordReader(sender._control, position, consumer="follow-up recovery")
    markers = []
    try:
        while True:
            start = reader.position
            body = reader.next()
            if body is None:
                break
            if type(body) is Framed:
                _, headers = split_body(body, path, start)
                marker = headers.get(FROM_HEADER)
                if marker is not None:
                    markers.append(marker)
    finally:
        reader.close()
    return markers
