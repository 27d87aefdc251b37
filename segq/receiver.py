"""The Receiver: reads records in order and commits its position.

Theory of operation
-------------------
A receiver reads with a ``RecordReader`` (``_reader``).  A message stays
*pending* until committed; committing writes the
position after it to the receiver's cursor file (``_state``), one memory copy.
Rolling back moves the read position back to the committed one.  When a
commit leaves a segment behind, segments every consumer is past are deleted.

Threads
-------
One Receiver may be shared by threads, but it serves one consumer: it holds
at most one *outstanding* receive, a pending message or batch, or a ``recv``
still waiting for one.  Every call runs under the receiver's lock (an
``RLock``, so a signal handler that closes the receiver cannot deadlock), so
each is atomic: a message is committed once, the committed position only
moves forward, and a ``recv``/``try_recv``/``recv_batch`` made while another
is outstanding raises ``UsageError`` at once, whatever the thread.  Parallel
consumers use a ``WorkQueue``.

| state      | recv, try_recv, recv_batch          | commit, rollback | close                    |
|------------|-------------------------------------|------------------|--------------------------|
| idle       | a record: *pending*; none: *waiting* | ``UsageError``   | release now              |
| waiting    | ``UsageError``                      | ``UsageError``   | wake the waiter, which releases and raises ``Closed`` |
| pending    | ``UsageError``                      | *idle*           | roll back, release now   |

A waiting ``recv`` sleeps without the lock: no other call touches the read
position meanwhile (the table above), so the lock is not needed for it, and
it is taken again to make the record pending in the same step that ends the
wait.  A wait that ends without a record (timeout, signal) puts the read
position back where the wait began, so nothing read in it is skipped.

While waiting, a receiver checks once a second that its queue directory is
still the one it opened (it holds a descriptor on it, so the inode cannot be
reused): a queue deleted, or deleted and created again, raises ``SegqError``
instead of waiting forever on files no sender will write again.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any, Iterator

from ._args import SyncPolicy, check_path, check_timeout, parse_sync
from ._control import (
    CONSUMER_SEGMENT_SIZE,
    DATA_WAITERS,
    ROOM_WAITERS,
    ROOM_WAITING,
    TAIL_INDEX,
    Control,
    existing_queue,
    require_queue,
)
from ._format import HEADER_SIZE, read_record as _read_record
from ._headers import split_body
from ._messages import MessageFields, new_message
from ._fs import make_dir
from ._lifetime import ClosedByWith, Ticker, WithBlock, close_at_exit
from ._lock import LockFile
from ._reader import RecordReader
from ._segment import StrPath
from ._retention import delete_consumed_segments, register_cursor
from ._state import CURSOR_DIR, ConsumerKind, Position, check_name, cursor_path, receiver_lock_path
from ._wake import Waiter, Waker
from .errors import Closed, CorruptionError, Empty, InvalidArgument, SegqError, UsageError

__all__ = ["Receiver", "Message", "Batch"]

# How often a waiting receiver checks that its queue directory is still there.
_IDENTITY_CHECK_SECONDS = 1.0


class _Settles(WithBlock):
    """What a message and a batch share: they are settled, once, through the receiver that gave them.

    ``commit`` moves the receiver's position to ``_end``, ``rollback`` back to
    ``_start``; leaving a ``with`` block commits, or rolls back on an exception.
    """

    __slots__ = ()
    _receiver: Any
    _start: int
    _end: int

    @property
    def pending(self) -> bool:
        """True until committed or rolled back."""
        return self._receiver._pending is self

    def commit(self) -> None:
        """Mark it handled: it will not be delivered to this receiver name again."""
        self._receiver._commit(self, self._end)

    def rollback(self) -> None:
        """Give it back: the next ``recv`` returns it again."""
        self._receiver._rollback(self, self._start)

    def _leave(self, error: BaseException | None) -> None:
        self._receiver._settle_if_pending(self, error is None)


class Message(_Settles, MessageFields):
    """One received record.  ``data`` is its payload, ``headers`` its headers; it is pending until committed."""

    # The fields (data, _headers, _receiver, _start, _end) are MessageFields':
    # a C type with the speedups, so a batch's messages are built in C.
    __slots__ = ()

    def _split_headers(self, path: str) -> None:
        """Split a Framed body (a record with headers) into ``data`` and ``_headers``."""
        self.data, self._headers = split_body(self.data, path, self._start)

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
        return Position.from_word(self._start)

    def __repr__(self) -> str:
        return f"<segq.Message {len(self.data)} bytes at {self.position}>"


class Batch(_Settles):
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

    def _settle_if_pending(self, item: Message | Batch, commit: bool) -> None:
        """A batch's message is never pending by itself: leaving its ``with`` block settles nothing."""



class Receiver(ClosedByWith):
    """Read the queue at ``path`` in send order, as consumer ``name``.

    Each name has its own position and sees every record; only one live
    Receiver per name may exist (a second raises ``Locked`` naming the PID).
    A new name starts at the oldest retained record.  ``sync`` applies to
    commits: ``"never"``, ``"always"`` (msync before ``commit`` returns) or an
    interval in seconds.

    A Receiver does not create a queue: a missing ``path`` (or a directory
    of other files) raises ``SegqError``, unless ``create=True`` (for a
    consumer that starts before its producers), which creates the directory
    with a small first segment.

    Threads may share a Receiver, but it is one consumer: it holds one
    pending message or batch (or one waiting ``recv``) at a time, and a
    receive made meanwhile, from any thread, raises ``UsageError``.  For
    parallel consumers use ``segq.WorkQueue``.

    >>> import segq, tempfile
    >>> path = tempfile.mkdtemp()
    >>> with segq.Sender(path, segment_size=1 << 16) as tx:
    ...     tx.send(b"job 1")
    >>> with segq.Receiver(path) as rx:
    ...     with rx.recv(timeout=1) as msg:
    ...         print(msg.data)
    b'job 1'
    """

    def __init__(
        self, path: StrPath, name: str = "default", *, sync: SyncPolicy = "never", create: bool = False
    ) -> None:
        self._closed = True
        self.path = check_path(path)
        self.name = check_name(name)
        self._sync_interval = parse_sync(sync)
        require_queue(self.path, create=create, who="Receiver")
        self._control = Control(self.path, segment_size=CONSUMER_SEGMENT_SIZE)
        self._lock = LockFile(receiver_lock_path(self.path, name), what=f"receiver {name!r}")
        self._directory_fd = -1
        try:
            self._directory_fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY)
            make_dir(self.path, os.path.basename(os.path.dirname(self._lock.path)))
            self._lock.acquire()
            self._cursor = register_cursor(self.path, ConsumerKind.RECEIVER, name)
            position = self._cursor.position
            if position.word > self._control.words[TAIL_INDEX]:
                self._cursor.close()
                raise CorruptionError(
                    self._cursor.path,
                    0,
                    f"position {position} is past the end of the queue ({self._control.tail()})",
                )
        except BaseException:
            self._lock.release()
            self._control.close()
            if self._directory_fd >= 0:
                os.close(self._directory_fd)
            raise
        # Holding the directory open keeps its inode from being reused, so a
        # queue deleted and made again at the same path has another identity.
        directory = os.fstat(self._directory_fd)
        self._identity = (directory.st_dev, directory.st_ino)
        self._next_identity_check = 0.0
        self._gone: str | None = None  # why the queue is no longer there, once noticed
        self._committed = position.word
        self._reader = RecordReader(self._control, self._committed, consumer=f"receiver {name!r}")
        self._next_record = self._reader.next
        self._words = self._control.words
        self._in_batch = _InBatch(self.path)  # the stateless stand-in every batch's messages share
        self._control_bytes = self._control.bytes
        self._write_cursor = self._cursor.write_word
        self._pending: Message | Batch | None = None
        self._waiting = 0  # the thread id of a recv waiting outside the lock, 0 for none
        self._released = threading.Event()
        self._mutex = threading.RLock()
        self._waiter: Waiter | None = None
        self._waker = Waker(self._control)
        self._dirty = False
        self._closed = False
        self._syncer = Ticker(self._sync_interval, self._sync_tick, "segq-commit-sync") if self._sync_interval else None
        close_at_exit(self)

    # -- waiting (outside the lock; see "Threads" above) --------------------

    def _begin_wait(self) -> int:
        """Mark a wait outstanding (hold the lock); return the read position to put back if it fails."""
        self._waiting = threading.get_ident()
        return self._reader.position

    def _end_wait(self, start: int, pending: Message | Batch | None) -> None:
        """End the wait (hold the lock): make ``pending`` pending, or put the read position back."""
        self._waiting = 0
        if self._closed:
            self._reader.position = start
            self._release()  # close() left it to us
            raise Closed(f"receiver {self.name!r} was closed while waiting")
        if pending is None:
            self._reader.position = start
        else:
            self._pending = pending

    def _wait_ready(self) -> bool:
        """Tell whether a waiting recv should stop waiting: a record, ``close``, or the queue gone."""
        return self._reader.available() or self._closed or self._queue_gone()

    def _wait_for_record(self, timeout: float | None, *, peek: bool = False) -> bytes:
        """Block until a record is readable and return it (``peek``: leave it unread); ``Empty`` at the deadline.

        Runs without the lock, with ``_waiting`` set (no other call moves the reader meanwhile).
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        waiter = self._data_waiter()
        while True:
            # "Available" can precede "readable" by a moment (the tail moved
            # onto an end-of-segment marker), so wait until a read succeeds.
            # The flag stays up on return: a receiver that waits for every
            # record (a slow stream) keeps it up and pays no syscalls for it.
            ready = waiter.wait(DATA_WAITERS, self._wait_ready, deadline, keep_raised=True)
            if self._closed:
                raise Closed(f"receiver {self.name!r} was closed while waiting")
            self._raise_if_gone()
            if not ready:
                raise Empty(f"no record in {self.path} after {timeout} s")
            position = self._reader.position
            data = self._next_record()
            if data is not None:
                if peek:
                    self._reader.position = position
                return data

    def _queue_gone(self) -> bool:
        """Tell whether the queue directory was deleted or replaced (looks at most once a second)."""
        if self._gone is not None:
            return True
        now = time.monotonic()
        if now < self._next_identity_check:
            return False
        self._next_identity_check = now + _IDENTITY_CHECK_SECONDS
        try:
            found = os.stat(self.path)
        except FileNotFoundError:
            self._gone = "was deleted"
            return True
        except OSError:
            return False  # not a verdict: look again next time
        if (found.st_dev, found.st_ino) != self._identity:
            self._gone = "was deleted and another directory took its place"
            return True
        return False

    def _raise_if_gone(self) -> None:
        if self._gone is not None:
            raise SegqError(
                f"the queue at {self.path} {self._gone} while receiver {self.name!r} waited: "
                "no record can arrive in the old one; open a new Receiver to read the queue there now"
            )

    # -- for segq.aio, which waits on an event loop instead of in poll() --

    def _data_waiter(self) -> Waiter:
        """Return this receiver's waiter (made on first use); its ``fileno()`` turns readable on a wake-up."""
        if self._waiter is None:
            self._waiter = Waiter(self._control)
        return self._waiter

    def _data_ready(self) -> bool:
        """Tell, without blocking, whether a record lies past the read position (or the queue is gone)."""
        return self._reader.available() or self._queue_gone()

    def _check_ready(self) -> None:
        if self._closed:
            raise Closed(f"receiver {self.name!r} is closed")
        if self._pending is not None:
            raise UsageError(
                f"receiver {self.name!r} already has a pending {type(self._pending).__name__.lower()}: "
                "commit or roll it back first (for parallel consumers use segq.WorkQueue)"
            )
        if self._waiting:
            raise UsageError(
                f"another thread is already waiting in recv on receiver {self.name!r}: a Receiver is one consumer "
                "(for parallel consumers use segq.WorkQueue)"
            )

    # -- the public reading calls ----------------------------------------

    def recv(self, timeout: float | None = None) -> Message:
        """Return the next message, waiting for one; raise ``Empty`` after ``timeout`` seconds.

        The message is pending until you commit or roll it back (or leave its
        ``with`` block).  Raises ``UsageError`` if one is already pending, or
        if another thread is waiting in ``recv`` on this receiver; ``Closed``
        if the receiver is closed meanwhile; ``SegqError`` if the queue
        directory is deleted (or replaced) while waiting.
        """
        if timeout is not None:
            timeout = check_timeout(timeout)
        # acquire/release, not ``with``: half the cost on the hot paths.
        self._mutex.acquire()
        try:
            if self._pending is not None or self._closed or self._waiting:
                self._check_ready()
            # RecordReader.next written out (a Python call less per record):
            # the record from the read buffer if it is whole there, else the slow path.
            reader = self._reader
            read = reader.position
            data = None
            if read < self._words[TAIL_INDEX]:
                data = _read_record(reader._buffer, read - reader._buffer_word)
                if data is None:
                    data = reader._next_slow()
                else:
                    reader.position = read + HEADER_SIZE + len(data)
            if data is not None:
                if self._waiter is not None and self._waiter.raised:
                    self._waiter.lower_flag(DATA_WAITERS)  # busy now: sends need not wake us
                # _message written out: a Python call less per record.
                end = self._reader.position
                message: Message = new_message(Message, self, data, end - HEADER_SIZE - len(data), end)
                if type(data) is not bytes:  # a Framed body: the record has headers
                    message._split_headers(self.path)
                self._pending = message
                return message
            start = self._begin_wait()
        finally:
            self._mutex.release()
        try:
            message = self._message(self._wait_for_record(timeout))
        except BaseException:
            with self._mutex:
                self._end_wait(start, None)
            raise
        with self._mutex:
            self._end_wait(start, message)
        return message

    def try_recv(self) -> Message | None:
        """Return the next message if one is ready, else None; never blocks."""
        self._mutex.acquire()
        try:
            if self._pending is not None or self._closed or self._waiting:
                self._check_ready()
            reader = self._reader  # RecordReader.next written out, as in recv
            read = reader.position
            if read >= self._words[TAIL_INDEX]:
                return None
            data = _read_record(reader._buffer, read - reader._buffer_word)
            if data is None:
                data = reader._next_slow()
                if data is None:
                    return None
            else:
                reader.position = read + HEADER_SIZE + len(data)
            end = reader.position
            message: Message = new_message(Message, self, data, end - HEADER_SIZE - len(data), end)
            if type(data) is not bytes:  # a Framed body: the record has headers
                message._split_headers(self.path)
            self._pending = message
            return message
        finally:
            self._mutex.release()

    def recv_batch(self, max_count: int, timeout: float | None = None) -> Batch:
        """Return 1 to ``max_count`` messages: as many as are ready once the first is.

        Raises ``Empty`` if none arrives within ``timeout`` seconds, and
        ``UsageError`` as ``recv`` does.
        """
        if timeout is not None:
            timeout = check_timeout(timeout)
        if isinstance(max_count, bool) or not isinstance(max_count, int):
            raise InvalidArgument(f"max_count must be an int, not {max_count!r}", name="max_count")
        self._mutex.acquire()
        try:
            if self._pending is not None or self._closed or self._waiting:
                self._check_ready()
            if max_count < 1:
                raise InvalidArgument(f"recv_batch needs max_count >= 1, not {max_count}", name="max_count")
            start = self._reader.position
            messages = self._next_messages(max_count)
            if messages:
                if self._waiter is not None and self._waiter.raised:
                    self._waiter.lower_flag(DATA_WAITERS)  # busy now: sends need not wake us
                batch = Batch(self, messages, start, self._reader.position)
                self._pending = batch
                return batch
            start = self._begin_wait()
        finally:
            self._mutex.release()
        try:
            self._wait_for_record(timeout, peek=True)
            batch = Batch(self, self._next_messages(max_count), start, self._reader.position)
        except BaseException:
            with self._mutex:
                self._end_wait(start, None)
            raise
        with self._mutex:
            self._end_wait(start, batch)
        return batch

    def _message(self, data: bytes) -> Message:
        """Return the message of the record just read (``data``, ending at the read position)."""
        end = self._reader.position
        message: Message = new_message(Message, self, data, end - HEADER_SIZE - len(data), end)
        if type(data) is not bytes:  # a Framed body: the record has headers
            message._split_headers(self.path)
        return message

    def _next_messages(self, max_count: int) -> list[Message]:
        """Read up to ``max_count`` records that are there now, as messages of one batch."""
        messages, framed = self._reader.next_messages(max_count, Message, self._in_batch)
        if framed:
            for message in messages:
                if type(message.data) is not bytes:
                    message._split_headers(self.path)
        return messages

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
                self._settle_if_pending(message, finished)

    # -- commit and rollback ---------------------------------------------

    def _commit(self, item: Message | Batch, end: int) -> None:
        self._mutex.acquire()
        try:
            if self._pending is not item:
                self._not_pending()
            self._pending = None
            self._committed = end
            left_a_segment = self._write_cursor(end)
            if self._sync_interval == 0.0:
                self._cursor.sync()
            else:
                self._dirty = True
            if left_a_segment:
                delete_consumed_segments(self.path)
            if self._control_bytes[ROOM_WAITING]:
                self._waker.wake(ROOM_WAITERS)
        finally:
            self._mutex.release()

    def _rollback(self, item: Message | Batch, start: int) -> None:
        with self._mutex:
            if self._pending is not item:
                self._not_pending()
            self._pending = None
            self._reader.position = start

    def _not_pending(self) -> None:
        if self._closed:
            raise Closed(f"receiver {self.name!r} is closed (closing rolled back what was pending)")
        raise UsageError("this message is not pending: it was already committed or rolled back")

    def _settle_if_pending(self, item: Message | Batch, commit: bool) -> None:
        """Commit (or roll back) ``item`` if it is still pending; else do nothing.  One atomic step."""
        with self._mutex:
            if self._pending is not item:
                return
            if commit:
                self._commit(item, item._end)
            else:
                self._rollback(item, item._start)

    def commit(self) -> None:
        """Commit the pending message or batch."""
        with self._mutex:
            self._the_pending("commit").commit()

    def rollback(self) -> None:
        """Roll back the pending message or batch."""
        with self._mutex:
            self._the_pending("roll back").rollback()

    def _the_pending(self, verb: str) -> Message | Batch:
        """Return the pending message or batch; raise if there is none to ``verb``."""
        if self._pending is None:
            if self._closed:
                self._not_pending()
            raise UsageError(f"receiver {self.name!r} has nothing pending to {verb}")
        return self._pending

    @property
    def committed_position(self) -> Position:
        """The position after the last committed message."""
        committed = self._committed  # one load: a concurrent commit changes it whole
        return Position.from_word(committed)

    # -- lifetime --------------------------------------------------------

    def _sync_tick(self) -> bool:
        if self._dirty and not self._closed:
            self._dirty = False
            self._cursor.sync()
        return True

    @staticmethod
    def remove(path: StrPath, name: str) -> None:
        """Unregister receiver ``name`` so it no longer holds back segment deletion.

        Raises ``Locked`` if a live Receiver of that name is open, and
        ``SegqError`` if ``path`` is not a queue; a name that is not
        registered is left as it is.
        """
        check_name(name)
        path = existing_queue(path)
        if not os.path.isdir(os.path.join(path, CURSOR_DIR)):
            return  # no receiver ever opened this queue: nothing to unregister
        lock = LockFile(receiver_lock_path(path, name), what=f"receiver {name!r}")
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
        """Release the receiver: a pending message is rolled back (it will come again).  Idempotent.

        A ``recv`` waiting in another thread is woken and raises ``Closed``;
        ``close`` returns once it has let go of the files.
        """
        with self._mutex:
            if self._closed:
                return
            self._closed = True
            self._pending = None
            waiting = self._waiting
            if not waiting:
                self._release()
                return
            waiter = self._waiter
        # A recv is waiting: wake it; it releases everything as its wait ends.
        if waiter is not None and waiter.fd >= 0:
            try:
                os.write(waiter.fd, b"\x01")
            except OSError:
                pass  # its FIFO is full of wake-ups: it is awake anyway
        if waiting != threading.get_ident():  # not a signal handler interrupting that very wait
            self._released.wait()

    def _release(self) -> None:
        """Let go of every file and thread (hold the lock; nobody waits)."""
        try:
            if self._syncer is not None:
                self._syncer.stop()
            if self._sync_interval is not None:
                self._cursor.sync()
            if self._waiter is not None:
                self._waiter.close()
            self._waker.close()
            self._reader.close()
            self._cursor.close()
            self._lock.release()
            self._control.close()
            os.close(self._directory_fd)
        finally:
            self._released.set()  # a close() in another thread waits for this, whatever happened

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"at {self.committed_position}"
        return f"<segq.Receiver {self.path!r} name={self.name!r} {state}>"
