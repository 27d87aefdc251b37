"""The Sender: appends records to the queue's segments.

Theory of operation
-------------------
A send takes the append lock (a process-shared semaphore, see ``_control``),
reads the tail, copies the payload and then the record header into the
memory-mapped segment, publishes the new tail with one aligned store, and
releases the lock.  The bytes are then in the page cache, which outlives the
process: a record whose ``send`` returned survives SIGKILL.  Power-loss
durability is the ``sync`` policy's job: ``"always"`` runs a group commit
before returning (one ``fdatasync`` covers every sender's records written so
far), a number of seconds runs it from a background thread at that interval,
``"never"`` leaves it to the OS.

A plain record under 64 KiB sent with no headers, timeout, ``max_queue_bytes``
or ``sync="always"`` takes all of that in one C call (``_speedups.Appender``,
the same steps in the same order) whenever the lock is free and the record
fits in the mapped window; anything else, and every platform without the
extension or named semaphores, takes the Python path, which stays the
reference (tests/test_appender.py compares the bytes both write).

When a record does not fit, the sender creates the next segment (complete and
preallocated before anyone can see it), writes the end-of-segment marker in the
old one, and only then publishes a tail in the new one.
"""

from __future__ import annotations

import fcntl
import itertools
import mmap
import os
import threading
import time
from typing import TYPE_CHECKING, Iterable, Mapping, Union

from . import _format, _segment
from ._args import SyncPolicy, check_path, check_timeout, parse_sync
from ._control import (
    DATA_WAITERS,
    DATA_WAITING,
    OWNER_INDEX,
    ROOM_WAITERS,
    SYNCED,
    TAIL,
    TAIL_INDEX,
    Control,
    _semlock_class,
)
from ._format import END_MARKER, HEADER_SIZE, SEGMENT_HEADER_SIZE, as_payload
from ._headers import Framed, HeaderValue, frame_body
from ._flock import other_flock_holder, wait_lock
from ._fs import make_dir, open_file
from ._lifetime import ClosedByWith, Ticker, close_at_exit
from ._lock import LockFile
from ._segment import DEFAULT_SEGMENT_SIZE, MIN_SEGMENT_SIZE, SEGMENT_SIZE_LIMIT, MappedSegment, StrPath
from ._state import RELEASED_SEGMENT, Position, list_cursors, read_position, word_offset, word_segment
from ._wake import Waiter, Waker

if TYPE_CHECKING:
    from ._enqueue import DedupIndex
    from ._options import Enqueued, TimeLike
from .errors import Closed, Full, InvalidArgument, RecordTooLarge, SegqError

__all__ = ["Sender", "SyncPolicy", "parse_sync", "DEFAULT_MAX_RECORD_SIZE"]

DEFAULT_MAX_RECORD_SIZE = 8 << 20
_MAX_BATCH = SEGMENT_SIZE_LIMIT - mmap.PAGESIZE - SEGMENT_HEADER_SIZE - HEADER_SIZE  # what one segment can address
_registration_counter = itertools.count()
Headers = Mapping[str, HeaderValue]
BatchItem = Union[bytes, bytearray, memoryview, "tuple[bytes | bytearray | memoryview, Headers | None]"]
_frame_into = _format.frame_into
_frame_batch = _format.frame_batch
# Appends of this many framed bytes or more go by pwrite, smaller ones are
# copied into the memory map.  A copy into the map costs a write fault on every
# page it first touches (~1-3 us each, and ~2 ms for the first fault of a new
# 64 MiB segment, which reads ahead up to 8 MiB of zero pages); pwrite has no
# fault but a system call (~0.5 us).  Measured crossover: ~1 KiB (issue 14).
_PWRITE_FROM = 1024
# Records up to this size may take send's C path (_speedups.Appender), which
# keeps the GIL through its pwritev: then no other thread can close the
# segment's file under it.  Larger ones write with the GIL released, in Python.
_C_SEND_LIMIT = 64 << 10


class _PythonAppender:
    """Stand in for ``_speedups.Appender`` where it is missing: never sends, so ``send`` takes its Python path."""

    __slots__ = ("last_word", "size_limit")

    def __init__(self) -> None:
        self.last_word = 0
        self.size_limit = -1

    def send(self, data: object) -> int:
        return 0

    def show(self, segment_map: mmap.mmap, base_word: int, limit_word: int, fd: int, base_offset: int) -> None:
        pass

    def hide(self) -> None:
        pass

    def close(self) -> None:
        pass


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    """Write all of ``data`` at ``offset`` (pwrite may write less than asked)."""
    while data:
        written = os.pwrite(fd, data, offset)
        data = data[written:]
        offset += written


class Sender(ClosedByWith):
    """Append records to the queue at ``path``, creating it if missing.

    ``segment_size`` bounds each segment file (default 64 MiB, preallocated);
    ``max_record_size`` bounds one record (default 8 MiB);  ``sync`` is
    ``"never"``, ``"always"`` or a group-commit interval in seconds;
    ``max_queue_bytes`` makes ``send`` block while the unconsumed backlog would
    exceed it.  Many senders, in threads and processes, may share a queue.

    >>> import segq, tempfile
    >>> with segq.Sender(tempfile.mkdtemp(), segment_size=1 << 16) as tx:
    ...     tx.send(b"hello")
    ...     tx.send_batch([b"a", b"b"])
    """

    def __init__(
        self,
        path: StrPath,
        *,
        segment_size: int = DEFAULT_SEGMENT_SIZE,
        max_record_size: int = DEFAULT_MAX_RECORD_SIZE,
        sync: SyncPolicy = "never",
        max_queue_bytes: int | None = None,
        dedup_window: float = 120.0,
    ) -> None:
        self._closed = True
        self.path = check_path(path)
        if isinstance(dedup_window, bool) or not isinstance(dedup_window, (int, float)) or not 0 <= dedup_window < 1e9:
            raise InvalidArgument(f"dedup_window must be a finite number of seconds >= 0, not {dedup_window!r}")
        self.dedup_window = float(dedup_window)
        self._enqueue_lock = threading.Lock()
        self._dedup: DedupIndex | None = None
        if not isinstance(segment_size, int) or not MIN_SEGMENT_SIZE <= segment_size < SEGMENT_SIZE_LIMIT:
            raise InvalidArgument(
                f"segment_size must be an int from {MIN_SEGMENT_SIZE} bytes to 4 GiB, not {segment_size!r}"
            )
        capacity = segment_size - SEGMENT_HEADER_SIZE - 2 * HEADER_SIZE
        if max_record_size == DEFAULT_MAX_RECORD_SIZE:
            max_record_size = min(max_record_size, capacity)
        if not isinstance(max_record_size, int) or not 0 <= max_record_size <= capacity:
            raise InvalidArgument(
                f"max_record_size must be from 0 to {capacity} (what a {segment_size}-byte segment holds), "
                f"not {max_record_size!r}"
            )
        if max_queue_bytes is not None and (not isinstance(max_queue_bytes, int) or max_queue_bytes <= 0):
            raise InvalidArgument(f"max_queue_bytes must be a positive int or None, not {max_queue_bytes!r}")
        self.segment_size = segment_size
        self.max_record_size = max_record_size
        self.max_queue_bytes = max_queue_bytes
        self._sync_interval = parse_sync(sync)
        self._control = Control(self.path, segment_size=segment_size)
        try:
            self._registration = LockFile(
                os.path.join(self.path, "senders", f"{os.getpid()}-{next(_registration_counter)}.lock"),
                what="sender",
            )
            make_dir(self.path, "senders")
            self._sync_path = os.path.join(self.path, "segq.sync.lock")
            self._sync_file = os.fdopen(open_file(self._sync_path, os.O_RDWR, private=True), "r+b", buffering=0)
            try:
                self._registration.acquire()
            except BaseException:
                self._sync_file.close()
                raise
        except BaseException:
            self._control.close()
            raise
        self._waker = Waker(self._control)
        self._room_waiter: Waiter | None = None
        self._window: _segment.SegmentWindow | None = None
        self._segment_number = -1
        self._base_word = 0
        self._limit_word = 0
        self._words = self._control.words
        self._control_bytes = self._control.bytes
        self._acquire = self._control.append_lock.acquire
        self._release = self._control.append_lock.release
        self._pid = self._control.pid
        self._size_limit = max_record_size  # -1 once closed, so the hot path needs one compare
        self._sync_always = self._sync_interval == 0.0
        # The C twin of send's hot path, for plain small records; it also
        # holds last_word, the tail word after this sender's last append
        # (one home for it, whichever path appended last).
        self._appender = self._new_appender()
        self._append_small = self._appender.send
        self._fdatasyncs = 0  # fdatasync calls this sender made (benchmarks/ reports them per record)
        self._sync_fd = -1  # the tail segment, open for fdatasync (see _sync_fd_for)
        self._sync_fd_number = -1
        self._sync_thread_lock = threading.Lock()
        self._room_floor = Position.bottom(0)
        self._segment_sizes: dict[int, int] = {}  # segments grow (next_segment_size): sizes differ
        self._span = (-1, -1, 0)  # (first, last, bytes of segments first..last-1), the last one asked for
        self._closed = False
        self._background_error: BaseException | None = None
        self._syncer = Ticker(self._sync_interval, self._sync_tick, "segq-group-commit") if self._sync_interval else None
        close_at_exit(self)

    def _new_appender(self) -> "_PythonAppender":
        """Return the C Appender for this sender's small sends, or the stand-in that declines them all."""
        lock = self._control.append_lock
        semlock = _semlock_class()
        cls = _format.appender_class
        if cls is None or semlock is None or type(lock) is not semlock:  # e.g. the flock append lock
            return _PythonAppender()
        # Only what send's hot path does with nothing more to do: no room
        # waits, no group commit in the call.
        plain = not self._sync_always and self.max_queue_bytes is None
        limit = min(self.max_record_size, _C_SEND_LIMIT - 1) if plain else -1
        handle = getattr(lock, "handle")
        appender: _PythonAppender = cls(
            handle, self._control.map, TAIL_INDEX, OWNER_INDEX, DATA_WAITING, self._pid, _PWRITE_FROM, limit
        )
        return appender

    # -- sending ---------------------------------------------------------

    def send(self, data: bytes, timeout: float | None = None, headers: Headers | None = None) -> None:
        """Append one record; when this returns it survives a crash of this process.

        ``headers`` (str keys, bytes or str values) travel with the record,
        checksummed with it and counted in ``max_record_size``.  Raises
        ``RecordTooLarge`` (nothing written) past ``max_record_size``,
        ``Full`` if ``timeout`` runs out while the backlog is at
        ``max_queue_bytes``, ``Closed`` after ``close()``.
        """
        # ``headers`` is positional-or-keyword: a keyword-only default costs a
        # dict lookup on every call, and the plain path pays only this test.
        if headers is None and timeout is None:
            # The whole append in one C call when nothing is special (see
            # _speedups.c, Appender); 0 means "do it here".
            sent = self._append_small(data)
            if sent:
                if sent == 2:
                    self._waker.wake(DATA_WAITERS)
                return
        elif headers is not None:
            data = _with_headers(data, headers)
        # The Python path (the reference, and whatever the C call declined):
        # every attribute it needs is cached on self, and the segment bounds are kept as tail words so one compare checks both
        # "still the same segment" and "the record fits".
        if type(data) is not bytes and type(data) is not Framed:  # a Framed is segq's own record with headers
            data = as_payload(data)
        size = len(data)
        if size > self._size_limit:
            self._refuse(size)
        if timeout is not None:
            timeout = check_timeout(timeout)
        if self.max_queue_bytes is not None:
            self._wait_for_room(size + HEADER_SIZE, timeout)
        words = self._words
        appender = self._appender
        if not self._acquire(False):
            self._control.acquire_slow(self._zero_past_tail)
        try:
            word = words[TAIL_INDEX]
            if word != appender.last_word:
                # Someone else appended since our last send: say who holds the lock now.
                words[OWNER_INDEX] = self._pid
            end_word = word + HEADER_SIZE + size
            if end_word > self._limit_word:
                word = self._make_room(word, HEADER_SIZE + size)
                end_word = word + HEADER_SIZE + size
            if size < _PWRITE_FROM and not self._sync_always:
                _frame_into(self._segment_map, word - self._base_word, data)
            else:
                self._pwrite_framed(word_offset(word), _format.encode_batch([data]))
            words[TAIL_INDEX] = end_word
        finally:
            self._release()
        appender.last_word = end_word
        if self._control_bytes[DATA_WAITING]:
            self._waker.wake(DATA_WAITERS)
        if self._sync_always:
            self._sync_through(end_word)

    def enqueue(
        self,
        data: bytes,
        *,
        run_at: "TimeLike | None" = None,
        delay: float | None = None,
        priority: int = 0,
        dedup_key: str | None = None,
        job_id: str | None = None,
        headers: Mapping[str, HeaderValue] | None = None,
    ) -> "Enqueued":
        """Send ``data`` as a work-queue job with options; return its ``Enqueued(id, duplicate)``.

        ``run_at`` (a UTC datetime or epoch seconds) or ``delay`` (seconds):
        not claimable before then.  ``priority`` 0..9, higher first.
        ``dedup_key``: while a job with that key is pending, claimed, or was
        settled less than ``dedup_window`` seconds ago, nothing is written and
        the existing job's id comes back with ``duplicate=True``, across
        processes and crashes.  ``job_id``: the id instead of the default (the
        record's position); one in use raises ``DuplicateJobId``.  Options
        travel as reserved ``segq-`` headers beside ``headers``.  Bad options
        raise ``InvalidArgument`` and write nothing.  Safe from several threads:
        each default id is the position of that enqueue's own record.
        """
        from ._enqueue import enqueue

        return enqueue(
            self,
            data,
            run_at=run_at,
            delay=delay,
            priority=priority,
            dedup_key=dedup_key,
            job_id=job_id,
            headers=headers,
        )

    def _dedup_index(self) -> "DedupIndex":
        if self._dedup is None:
            from ._enqueue import DedupIndex

            self._dedup = DedupIndex(self._control, self.dedup_window)
        return self._dedup

    def _refuse(self, size: int) -> None:
        if self._closed:
            raise Closed("send() on a closed Sender")
        if self._background_error is not None:
            self._raise_background_error()
        raise RecordTooLarge(
            f"record of {size} bytes is over max_record_size={self.max_record_size}; nothing was written",
            size=size,
            limit=self.max_record_size,
        )

    def send_batch(self, records: Iterable[BatchItem], timeout: float | None = None) -> None:
        """Append many records as one atomic, contiguous write.

        Each item is a record's data, or a ``(data, headers)`` pair.

        A receiver sees all of them, in order, with no other sender's records
        between, or none.  A batch larger than ``segment_size`` gets a segment
        of its own, as large as it needs.  If any record is over
        ``max_record_size`` (or the batch over the 4 GiB a segment can
        address), ``RecordTooLarge`` is raised and nothing is written.  An
        empty batch writes nothing.
        """
        if self._closed:
            raise Closed("send_batch() on a closed Sender")
        if self._background_error is not None:
            self._raise_background_error()
        if timeout is not None:
            timeout = check_timeout(timeout)
        payloads: list[object] = records if type(records) is list else list(records)
        # One pass in C checks the types and sizes and frames the batch.
        framed = _frame_batch(payloads, self.max_record_size)
        if framed is None:  # not all plain bytes: convert each ((data, headers) pairs, buffers), frame in Python
            payloads = [record if type(record) is bytes else batch_payload(record) for record in payloads]
            framed = next((len(p) for p in payloads if len(p) > self.max_record_size), None)  # type: ignore[arg-type]
            if framed is None:
                framed = _format.encode_batch(payloads)  # type: ignore[arg-type]
        if isinstance(framed, int):
            raise RecordTooLarge(
                f"a record of {framed} bytes in the batch is over max_record_size="
                f"{self.max_record_size}; nothing of the batch was written",
                size=framed,
                limit=self.max_record_size,
            )
        if not framed:
            return
        blob = framed
        if len(blob) > _MAX_BATCH:  # a batch is in one segment, and offsets in a segment are 32-bit
            raise RecordTooLarge(
                f"batch of {len(payloads)} records ({len(blob)} bytes framed) is over the {_MAX_BATCH} bytes "
                "one segment can hold; nothing was written (send it in smaller batches)",
                size=len(blob),
                limit=_MAX_BATCH,
            )
        self._append_framed(blob, timeout)

    def _append_one(self, payload: bytes) -> int:
        """Append one record (already a payload, as ``send`` takes it); return its start position word.

        For ``enqueue``, whose default job id is the record's position: unlike
        reading ``_appender.last_word`` after a ``send``, this is right even while other
        threads send through the same Sender.
        """
        if self._closed:
            raise Closed("enqueue() on a closed Sender")
        if len(payload) > self._size_limit:
            self._refuse(len(payload))
        return self._append_framed(_format.encode_batch([payload]), None)

    def _append_framed(self, blob: bytes, timeout: float | None) -> int:
        """Append framed records ``blob`` as one contiguous write; return the position word it starts at."""
        if self.max_queue_bytes is not None:
            self._wait_for_room(len(blob), timeout)
        words = self._words
        appender = self._appender
        if not self._acquire(False):
            self._control.acquire_slow(self._zero_past_tail)
        try:
            word = words[TAIL_INDEX]
            if word != appender.last_word:
                words[OWNER_INDEX] = self._pid
            end_word = word + len(blob)
            if end_word > self._limit_word:
                word = self._make_room(word, len(blob))
                end_word = word + len(blob)
            if len(blob) < _PWRITE_FROM:
                offset = word - self._base_word
                segment_map = self._segment_map
                # Payloads first, the first header last: a crash mid-copy leaves a
                # batch whose first record is incomplete, which recovery drops whole.
                with memoryview(blob) as view:
                    segment_map[offset + HEADER_SIZE : offset + len(blob)] = view[HEADER_SIZE:]
                segment_map[offset : offset + HEADER_SIZE] = blob[:HEADER_SIZE]
            else:
                self._pwrite_framed(word_offset(word), blob)
            words[TAIL_INDEX] = end_word
        finally:
            self._release()
        appender.last_word = end_word
        if self._control_bytes[DATA_WAITING]:
            self._waker.wake(DATA_WAITERS)
        if self._sync_always:
            self._sync_through(end_word)
        return word

    def _pwrite_framed(self, offset: int, framed: bytes) -> None:
        """Write framed records at file ``offset`` with one ``pwrite``.  Called with the append lock held.

        The same page cache as the copy into the map, without a write fault
        per new page (see ``_PWRITE_FROM``).  One call, headers and payloads
        together: a second call to write the first header last cost ~1 us,
        a quarter of a 4 KiB send.  A process killed inside the call leaves
        a prefix of the records past the published tail: a record whose CRC
        fails, or a CONTINUES run never closed, which the next holder of the
        append lock cuts as a torn tail (docs/format.md, "Order of writes").
        """
        window = self._window
        assert window is not None
        try:
            written = os.pwrite(window.fd, framed, offset)
            if written < len(framed):  # rare (a signal, a full disk): write the rest
                with memoryview(framed) as view:
                    _pwrite_all(window.fd, view[written:], offset + written)
        except OSError as error:
            # Nothing was published: the tail still points at ``offset``, so
            # the next append overwrites whatever part of this one got there.
            raise _segment.os_error(error, "write to segment", window.path) from None

    def _make_room(self, word: int, needed: int) -> int:
        """Show the tail segment's window around ``needed`` bytes at the tail, rolling over if they do not fit.

        Called with the append lock held; returns the (possibly new) tail word.
        """
        tail = Position.from_word(word)
        number, offset = tail.segment, tail.offset
        if number != self._segment_number:
            self._open_segment(number)
        window = self._window
        assert window is not None
        if offset + needed <= window.size - HEADER_SIZE:  # room is kept for the end marker
            self._show(offset, needed)
            return word
        following = number + 1
        durable = self._sync_interval is not None
        size = _segment.next_segment_size(window.size, self.segment_size, needed)
        if not _segment.create_segment(self.path, following, size, durable=durable):
            self._clear_abandoned_segment(following)
        self._show(offset, HEADER_SIZE)
        self._segment_map[offset - window.start : offset - window.start + HEADER_SIZE] = END_MARKER
        if durable:
            # The seal reaches the disk before anything in the next segment can
            # (the kernel writes pages back in any order): after a power loss a
            # later segment never holds records behind an unsealed one.
            os.fdatasync(window.fd)
            self._fdatasyncs += 1
        self._open_segment(following)
        # Not published here: the caller publishes the tail past its record,
        # which also covers the marker (a reader never sees an empty new segment).
        # Again, because a segment left by a sender killed mid-rollover may be
        # smaller than this record: then it is sealed empty and skipped.
        return self._make_room(Position.bottom(following).word, needed)

    def _clear_abandoned_segment(self, number: int) -> None:
        # A sender died after creating this segment and before sealing the one
        # before it: nothing in it was ever published.
        self._zero_from(number, SEGMENT_HEADER_SIZE)

    def _zero_from(self, number: int, offset: int) -> None:
        """Zero whatever was written in segment ``number`` from ``offset`` on (nothing there was published)."""
        segment = MappedSegment(self.path, number, writable=True)
        try:
            dirty = _segment.dirty_end_in_file(segment.fd, offset, segment.size)
            segment.map[offset:dirty] = bytes(dirty - offset)
        finally:
            segment.close()

    def _open_segment(self, number: int) -> None:
        self._close_segment()
        try:
            self._window = _segment.SegmentWindow(self.path, number)
        except FileNotFoundError:
            raise SegqError(
                f"{_segment.segment_path(self.path, number)} is missing but the queue's tail is in it; "
                f"run `segq recover {self.path}`"
            ) from None
        self._segment_number = number

    def _show(self, offset: int, needed: int) -> None:
        window = self._window
        assert window is not None
        self._appender.hide()  # showing may unmap the window it holds
        self._segment_map: mmap.mmap = window.show(offset, needed)
        self._base_word = Position(window.number, window.start).word
        self._limit_word = Position(window.number, min(window.end, window.size - HEADER_SIZE)).word
        self._appender.show(self._segment_map, self._base_word, self._limit_word, window.fd, window.start)

    def _close_segment(self) -> None:
        self._appender.hide()
        if self._window is not None:
            self._window.close()
        self._window = None
        self._segment_number = -1
        self._base_word = 0
        self._limit_word = 0  # nothing shown: every append takes the slow path

    def _zero_past_tail(self, word: int) -> None:
        tail = Position.from_word(word)
        number = tail.segment
        self._zero_from(number, tail.offset)
        # The dead holder may have sealed this segment and written into the
        # next one without publishing it: nothing there was sent.
        if os.path.exists(_segment.segment_path(self.path, number + 1)):
            self._clear_abandoned_segment(number + 1)

    # -- backpressure ----------------------------------------------------

    def _backlog(self, refresh: bool) -> int:
        if refresh:
            self._room_floor = self._consumed_floor()
        tail = self._words[TAIL_INDEX]  # a word, not a Position: with max_queue_bytes this runs per send
        floor = self._room_floor
        return self._bytes_of_segments(floor.segment, word_segment(tail)) + word_offset(tail) - floor.offset

    def _bytes_of_segments(self, first: int, last: int) -> int:
        """Return the total size of segments ``first`` to ``last - 1``, each file's size looked up once."""
        if self._span[:2] != (first, last):
            sizes = self._segment_sizes
            for number in [number for number in sizes if number < first]:
                del sizes[number]
            total = 0
            for number in range(first, last):
                if number not in sizes:
                    try:
                        sizes[number] = os.path.getsize(_segment.segment_path(self.path, number))
                    except FileNotFoundError:
                        sizes[number] = self.segment_size  # consumed meanwhile: count it at most this large
                total += sizes[number]
            self._span = (first, last, total)
        return self._span[2]

    def _consumed_floor(self) -> Position:
        positions = []
        for _, _, path in list_cursors(self.path):
            try:
                position = read_position(path)
            except SegqError:
                continue
            if position.segment != RELEASED_SEGMENT:  # a released outbox pin holds no room
                positions.append(position)
        if positions:
            return min(positions)
        segments = _segment.list_segments(self.path)
        return Position.bottom(segments[0] if segments else 0)

    def _wait_for_room(self, size: int, timeout: float | None) -> None:
        limit = self.max_queue_bytes
        assert limit is not None
        if self._backlog(refresh=False) + size <= limit or self._has_room(size):
            return
        if size > limit:
            raise Full(f"a {size}-byte record can never fit under max_queue_bytes={limit}")
        deadline = None if timeout is None else time.monotonic() + timeout
        if not self._get_room_waiter().wait(ROOM_WAITERS, lambda: self._has_room(size), deadline):
            raise Full(f"backlog stayed over max_queue_bytes={limit} for {timeout} s; nothing was written")

    # -- for segq.aio, which waits for room on an event loop ---------------

    def _has_room(self, size: int) -> bool:
        """Tell whether ``size`` more framed bytes fit under ``max_queue_bytes`` now."""
        limit = self.max_queue_bytes
        return limit is None or self._backlog(refresh=True) + size <= limit

    def _get_room_waiter(self) -> Waiter:
        """Return this sender's room waiter (made on first use)."""
        if self._room_waiter is None:
            self._room_waiter = Waiter(self._control)
        return self._room_waiter

    # -- durability ------------------------------------------------------

    def flush(self) -> None:
        """Push buffered records to the OS: a no-op, since sends write straight to the page cache."""
        if self._closed:
            raise Closed("flush() on a closed Sender")

    def sync(self) -> None:
        """Make every record this sender sent so far survive power loss."""
        if self._closed:
            raise Closed("sync() on a closed Sender")
        if self._background_error is not None:
            self._raise_background_error()
        self._sync_through(self._appender.last_word)

    def _sync_through(self, word: int) -> None:
        """Group commit: one fdatasync covers every record below the tail it started at."""
        control = self._control
        if word == 0 or control.word(SYNCED) >= word:
            return
        with self._sync_thread_lock:
            if not self._lock_for_sync(word):
                return  # another sender's sync covered the record while we waited
            try:
                synced = control.word(SYNCED)
                if synced >= word:
                    return
                target = control.word(TAIL)
                self._fdatasync_segments(word_segment(synced), word_segment(target))
                if control.word(SYNCED) < target:
                    control.store(SYNCED, target)
            finally:
                fcntl.flock(self._sync_file.fileno(), fcntl.LOCK_UN)

    def _lock_for_sync(self, word: int) -> bool:
        """Take ``segq.sync.lock``, or return False as soon as another sender's sync covered ``word``.

        The group commit: while one sender runs the fdatasync the others
        wait, and most find their records synced when it ends.  So a waiter
        looks at the synced word every 50 us at first (a sleeping waiter is
        what lets SIGINT in and a hung holder time out: ``Locked``), and
        returns without the lock once its record is covered.
        """
        fd = self._sync_file.fileno()
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # free: one system call
            return True
        except BlockingIOError:
            pass
        control = self._control
        locked = False

        def take(seconds: float) -> bool:
            nonlocal locked
            time.sleep(seconds)
            if control.word(SYNCED) >= word:
                return True
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False
            locked = True
            return True

        wait_lock(
            take,
            self._sync_path,
            what="group commit",
            holder=lambda: other_flock_holder(fd),
            first_delay=0.00005,
            max_delay=0.001,
        )
        return locked

    def _fdatasync_segments(self, first: int, last: int) -> None:
        # Segments are opened by path, not through self._window: a send on
        # another thread may swap that while this runs (it holds only the
        # append lock, this only the sync lock).  The tail segment's
        # descriptor is kept for the next sync (held under the sync lock).
        if first >= last:
            fd = self._sync_fd_for(last)
            if fd is not None:
                os.fdatasync(fd)
                self._fdatasyncs += 1
            return
        for number in [n for n in _segment.list_segments(self.path) if first <= n <= last]:
            try:
                fd = os.open(_segment.segment_path(self.path, number), os.O_RDONLY)
            except FileNotFoundError:
                continue  # consumed and deleted: nothing left to lose
            try:
                os.fdatasync(fd)
                self._fdatasyncs += 1
            finally:
                os.close(fd)

    def _sync_fd_for(self, number: int) -> int | None:
        """Return a descriptor of segment ``number`` for fdatasync, kept open until the tail moves on."""
        if self._sync_fd_number != number:
            self._close_sync_fd()
            try:
                self._sync_fd = os.open(_segment.segment_path(self.path, number), os.O_RDONLY)
            except FileNotFoundError:
                return None  # consumed and deleted: nothing left to lose
            self._sync_fd_number = number
        return self._sync_fd

    def _close_sync_fd(self) -> None:
        if self._sync_fd >= 0:
            os.close(self._sync_fd)
        self._sync_fd = -1
        self._sync_fd_number = -1

    def _sync_tick(self) -> bool:
        try:
            self._sync_through(self._appender.last_word)
        except BaseException as error:  # noqa: BLE001 - handed to the sending thread, never lost
            if self._closed:
                return False
            # A dead thread must not leave sends believing they are durable:
            # the next call (and close) raises.  -1 sends every send down
            # the hot path's one existing compare into _refuse.
            self._background_error = error
            self._size_limit = -1
            self._appender.size_limit = -1
            return False
        return True

    def _raise_background_error(self) -> None:
        error = self._background_error
        raise SegqError(
            f"{self.path}: the group-commit thread failed ({type(error).__name__}: {error}); records sent "
            "since its last sync may not survive power loss; close this Sender and open a new one"
        ) from error

    # -- lifetime --------------------------------------------------------

    def close(self) -> None:
        """Finish: sync if the policy asks for it, then release everything.  Idempotent."""
        if self._closed:
            return
        if self._syncer is not None:
            self._syncer.stop()
        try:
            if self._background_error is not None:
                self._raise_background_error()
            if self._sync_interval is not None:
                self._sync_through(self._appender.last_word)
        finally:
            self._closed = True
            self._size_limit = -1
            self._appender.close()
            if self._room_waiter is not None:
                self._room_waiter.close()
            if self._dedup is not None:
                self._dedup.close()
            self._waker.close()
            self._close_segment()
            self._close_sync_fd()
            self._sync_file.close()
            self._registration.release()
            self._control.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<segq.Sender {self.path!r} {state}>"




def _with_headers(data: object, headers: Headers) -> bytes:
    """Return the body of a record with ``headers``: a Framed, or plain data when ``headers`` is empty."""
    payload = data if type(data) is bytes else as_payload(data)
    body = frame_body(payload, headers)  # validates, and raises the clear error for what is not a dict
    return body if headers else payload


def batch_payload(record: object) -> bytes:
    """Return the payload of a batch item: plain data, a ``(data, headers)`` pair, or a ``Framed`` body."""
    if type(record) is Framed:
        return record
    if isinstance(record, tuple):
        if len(record) != 2:
            raise SegqError(f"a batch item is data or a (data, headers) pair, not a {len(record)}-tuple")
        data, headers = record
        if headers is None or (isinstance(headers, Mapping) and not headers):
            return as_payload(data)  # no headers: not one byte more than a plain record
        return frame_body(as_payload(data), headers)
    return as_payload(record)
