"""The Receiver: reads records in order and commits its position.

Theory of operation
-------------------
A receiver reads with a ``RecordReader`` (``_reader``).  A message stays
*pending* until committed; committing writes the
position after it to the receiver's cursor file (``_state``), one memory copy.
Rolling back moves the read position back to the committed one.  When a
commit leaves a segment behind, segments every consumer is past are deleted.
"""

from __future__ import annotations

import os
import threading
import time
from types import TracebackType
from typing import Iterator

from ._control import DATA_WAITERS, ROOM_WAITERS, ROOM_WAITING, TAIL_INDEX, Control
from ._format import HEADER_SIZE
from ._headers import split_body
from ._lifetime import close_at_exit
from ._lock import LockFile
from ._reader import RecordReader
from ._segment import StrPath
from ._state import ConsumerKind, Position, check_name, cursor_path, delete_consumed_segments, register_cursor
from ._wake import Waiter, Waker
from .errors import Closed, CorruptionError, Empty, UsageError
from .sender import SyncPolicy, parse_sync

__all__ = ["Receiver", "Message", "Batch"]



class Message:
    """One received record.  ``data`` is its payload, ``headers`` its headers; it is pending until committed."""

    __slots__ = ("data", "_headers", "_receiver", "_start", "_end")

    def __init__(self, receiver: "Receiver", data: bytes, start: int, end: int) -> None:
        if type(data) is not bytes:  # a Framed body: the record has headers
            data, self._headers = split_body(data, receiver.path, start)
        self.data = data
        self._receiver = receiver
        self._start = start
        self._end = end

    @property
    def headers(self) -> dict[str, bytes]:
        """The record's headers, name to value; empty when it has none."""
        try:
            return self._headers
        except AttributeError:  # a plain record: nothing was stored, nothing was parsed
            return {}

    @property
    def position(self) -> Position:
        """Where the record starts in the queue."""
        return Position(self._start >> 32, self._start & 0xFFFF_FFFF)

    @property
    def pending(self) -> bool:
        """True until the message is committed or rolled back."""
        return self._receiver._pending is self

    def commit(self) -> None:
        """Mark the message handled: it will not be delivered to this receiver name again."""
        self._receiver._commit(self, self._end)

    def rollback(self) -> None:
        """Give the message back: the next ``recv`` returns it again."""
        self._receiver._rollback(self, self._start)

    def __enter__(self) -> "Message":
        return self

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, traceback: TracebackType | None
    ) -> None:
        if not self.pending:
            return
        if kind is None:
            self.commit()
        else:
            self.rollback()

    def __repr__(self) -> str:
        return f"<segq.Message {len(self.data)} bytes at {self.position}>"


class Batch:
    """Messages received together; committed or rolled back together."""

    __slots__ = ("messages", "_receiver", "_start", "_end")

    def __init__(self, receiver: "Receiver", messages: list[Message], start: int, end: int) -> None:
        self.messages = messages
        self._receiver = receiver
        self._start = start
        self._end = end

    def __iter__(self) -> Iterator[Message]:
        return iter(self.messages)

    def __len__(self) -> int:
        return len(self.messages)

    def __getitem__(self, index: int) -> Message:
        return self.messages[index]

    @property
    def pending(self) -> bool:
        return self._receiver._pending is self

    def commit(self) -> None:
        """Mark every message of the batch handled."""
        self._receiver._commit(self, self._end)

    def rollback(self) -> None:
        """Give every message of the batch back."""
        self._receiver._rollback(self, self._start)

    def __enter__(self) -> "Batch":
        return self

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, traceback: TracebackType | None
    ) -> None:
        if not self.pending:
            return
        if kind is None:
            self.commit()
        else:
            self.rollback()

    def __repr__(self) -> str:
        return f"<segq.Batch of {len(self.messages)} messages>"


class _InBatch:
    """Stands in for the receiver of a message that belongs to a batch."""

    _pending = None

    def __init__(self, path: str) -> None:
        self.path = path  # the queue's, for errors in a message's headers

    def _commit(self, item: Message, position: int) -> None:
        raise UsageError("this message belongs to a batch: commit or roll back the batch")

    _rollback = _commit



class Receiver:
    """Read the queue at ``path`` in send order, as consumer ``name``.

    Each name has its own position and sees every record; only one live
    Receiver per name may exist (a second raises ``Locked`` naming the PID).
    A new name starts at the oldest retained record.  ``sync`` applies to
    commits: ``"never"``, ``"always"`` (msync before ``commit`` returns) or an
    interval in seconds.

    >>> import segq, tempfile
    >>> path = tempfile.mkdtemp()
    >>> with segq.Sender(path, segment_size=1 << 16) as tx:
    ...     tx.send(b"job 1")
    >>> with segq.Receiver(path) as rx:
    ...     with rx.recv(timeout=1) as msg:
    ...         print(msg.data)
    b'job 1'
    """

    def __init__(self, path: StrPath, name: str = "default", *, sync: SyncPolicy = "never") -> None:
        self._closed = True
        self.path = os.fspath(path)
        self.name = check_name(name)
        self._sync_interval = parse_sync(sync)
        self._control = Control(self.path)
        self._lock = LockFile(cursor_path(self.path, ConsumerKind.RECEIVER, name)[: -len(".pos")] + ".lock", what=f"receiver {name!r}")
        try:
            os.makedirs(os.path.dirname(self._lock.path), exist_ok=True)
            self._lock.acquire()
            self._cursor = register_cursor(self.path, ConsumerKind.RECEIVER, name)
            position = self._cursor.position
            if position.segment << 32 | position.offset > self._control.words[TAIL_INDEX]:
                self._cursor.close()
                raise CorruptionError(
                    self._cursor.path,
                    0,
                    f"position {position} is past the end of the queue ({Position(*self._control.tail())})",
                )
        except BaseException:
            self._lock.release()
            self._control.close()
            raise
        self._committed = position.segment << 32 | position.offset
        self._reader = RecordReader(self._control, self._committed, consumer=f"receiver {name!r}")
        self._next_record = self._reader.next
        self._pending: Message | Batch | None = None
        self._waiter: Waiter | None = None
        self._waker = Waker(self._control)
        self._dirty = False
        self._closed = False
        self._stop_syncing = threading.Event()
        self._sync_thread: threading.Thread | None = None
        if self._sync_interval:
            self._sync_thread = threading.Thread(target=self._sync_loop, name="segq-commit-sync", daemon=True)
            self._sync_thread.start()
        close_at_exit(self)

    def _wait_for_record(self, timeout: float | None, *, peek: bool = False) -> bytes:
        """Block until a record is readable and return it (``peek``: leave it unread); ``Empty`` at the deadline."""
        deadline = None if timeout is None else time.monotonic() + timeout
        waiter = self._data_waiter()
        while True:
            # "Available" can precede "readable" by a moment (the tail moved
            # onto an end-of-segment marker), so wait until a read succeeds.
            # The flag stays up on return: a receiver that waits for every
            # record (a slow stream) keeps it up and pays no syscalls for it.
            if not waiter.wait(DATA_WAITERS, self._reader.available, deadline, keep_raised=True):
                raise Empty(f"no record in {self.path} after {timeout} s")
            position = self._reader.position
            data = self._next_record()
            if data is not None:
                if peek:
                    self._reader.position = position
                return data

    # -- for segq.aio, which waits on an event loop instead of in poll() --

    def _data_waiter(self) -> Waiter:
        """Return this receiver's waiter (made on first use); its ``fileno()`` turns readable on a wake-up."""
        if self._waiter is None:
            self._waiter = Waiter(self._control)
        return self._waiter

    def _data_ready(self) -> bool:
        """Tell, without blocking, whether a record lies past the read position."""
        return self._reader.available()

    def _check_ready(self) -> None:
        if self._closed:
            raise Closed(f"receiver {self.name!r} is closed")
        if self._pending is not None:
            raise UsageError(
                f"receiver {self.name!r} already has a pending {type(self._pending).__name__.lower()}: "
                "commit or roll it back first"
            )

    # -- the public reading calls ----------------------------------------

    def recv(self, timeout: float | None = None) -> Message:
        """Return the next message, waiting for one; raise ``Empty`` after ``timeout`` seconds.

        The message is pending until you commit or roll it back (or leave its
        ``with`` block).  Raises ``UsageError`` if one is already pending.
        """
        if self._pending is not None or self._closed:
            self._check_ready()
        data = self._next_record()
        if data is None:
            data = self._wait_for_record(timeout)
        elif self._waiter is not None and self._waiter.raised:
            self._waiter.lower_flag(DATA_WAITERS)  # busy now: sends need not wake us
        end = self._reader.position
        message = Message(self, data, end - HEADER_SIZE - len(data), end)
        self._pending = message
        return message

    def try_recv(self) -> Message | None:
        """Return the next message if one is ready, else None; never blocks."""
        self._check_ready()
        data = self._next_record()
        if data is None:
            return None
        message = Message(self, data, self._reader.position - HEADER_SIZE - len(data), self._reader.position)
        self._pending = message
        return message

    def recv_batch(self, max_count: int, timeout: float | None = None) -> Batch:
        """Return 1 to ``max_count`` messages: as many as are ready once the first is.

        Raises ``Empty`` if none arrives within ``timeout`` seconds.
        """
        self._check_ready()
        if max_count < 1:
            raise UsageError(f"recv_batch needs max_count >= 1, not {max_count}")
        records, runs = self._reader.next_many(max_count)
        if not records:
            self._wait_for_record(timeout, peek=True)
            records, runs = self._reader.next_many(max_count)
        elif self._waiter is not None and self._waiter.raised:
            self._waiter.lower_flag(DATA_WAITERS)  # busy now: sends need not wake us
        messages: list[Message] = []
        append = messages.append
        in_batch = _InBatch(self.path)
        runs.append((len(records), 0))
        for (first, position), (following, _) in zip(runs, runs[1:]):
            for data in records[first:following]:
                end = position + HEADER_SIZE + len(data)
                append(Message(in_batch, data, position, end))  # type: ignore[arg-type]
                position = end
        batch = Batch(self, messages, runs[0][1], self._reader.position)
        self._pending = batch
        return batch

    def __iter__(self) -> Iterator[Message]:
        """Yield messages forever; each is committed when the loop asks for the next one.

        A message whose loop body raised (or broke out) is rolled back, not committed.
        """
        while True:
            message = self.recv()
            finished = False
            try:
                yield message
                finished = True
            finally:
                if message.pending and not self._closed:
                    if finished:
                        message.commit()
                    else:
                        message.rollback()

    # -- commit and rollback ---------------------------------------------

    def _commit(self, item: Message | Batch, end: int) -> None:
        if self._pending is not item:
            raise UsageError("this message is not pending: it was already committed or rolled back")
        self._pending = None
        previous_segment = self._committed >> 32
        self._committed = end
        self._cursor.write_at(end >> 32, end & 0xFFFF_FFFF)
        if self._sync_interval == 0.0:
            self._cursor.sync()
        else:
            self._dirty = True
        if end >> 32 != previous_segment:
            delete_consumed_segments(self.path)
        if self._control.bytes[ROOM_WAITING]:
            self._waker.wake(ROOM_WAITERS)

    def _rollback(self, item: Message | Batch, start: int) -> None:
        if self._pending is not item:
            raise UsageError("this message is not pending: it was already committed or rolled back")
        self._pending = None
        self._reader.position = start

    def commit(self) -> None:
        """Commit the pending message or batch."""
        if self._pending is None:
            raise UsageError(f"receiver {self.name!r} has nothing pending to commit")
        self._pending.commit()

    def rollback(self) -> None:
        """Roll back the pending message or batch."""
        if self._pending is None:
            raise UsageError(f"receiver {self.name!r} has nothing pending to roll back")
        self._pending.rollback()

    @property
    def committed_position(self) -> Position:
        """The position after the last committed message."""
        return Position(self._committed >> 32, self._committed & 0xFFFF_FFFF)

    # -- lifetime --------------------------------------------------------

    def _sync_loop(self) -> None:
        interval = self._sync_interval
        assert interval
        while not self._stop_syncing.wait(interval):
            if self._dirty and not self._closed:
                self._dirty = False
                self._cursor.sync()

    @staticmethod
    def remove(path: StrPath, name: str) -> None:
        """Unregister receiver ``name`` so it no longer holds back segment deletion.

        Raises ``Locked`` if a live Receiver of that name is open.
        """
        check_name(name)
        lock = LockFile(cursor_path(path, ConsumerKind.RECEIVER, name)[: -len(".pos")] + ".lock", what=f"receiver {name!r}")
        lock.acquire()
        try:
            try:
                os.unlink(cursor_path(path, ConsumerKind.RECEIVER, name))
            except FileNotFoundError:
                return
            delete_consumed_segments(path)
        finally:
            lock.release()

    def close(self) -> None:
        """Release the receiver: a pending message is rolled back (it will come again).  Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._pending = None
        if self._sync_thread is not None:
            self._stop_syncing.set()
            self._sync_thread.join()
        if self._sync_interval is not None:
            self._cursor.sync()
        if self._waiter is not None:
            self._waiter.close()
        self._waker.close()
        self._reader.close()
        self._cursor.close()
        self._lock.release()
        self._control.close()

    def __enter__(self) -> "Receiver":
        return self

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"at {self.committed_position}"
        return f"<segq.Receiver {self.path!r} name={self.name!r} {state}>"
