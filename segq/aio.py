"""asyncio classes: the same core, waiting registered with the event loop.

Theory of operation
-------------------
``AsyncSender`` and ``AsyncReceiver`` wrap a blocking ``Sender`` and
``Receiver`` and share all their code: framing, locking, commit, rollback and
the one-pending-message rule are theirs.  What changes is *waiting*.

A blocking receiver waits in ``Waiter.wait`` (``_wake``): raise its flag,
check again, ``poll`` its FIFO, drain, lower the flag.  ``_LoopWait.until``
is that loop with the ``poll`` replaced by a future that ``loop.add_reader``
on the FIFO resolves, so a waiting receiver is one registered descriptor: no
thread, no timer firing faster than the core's 1-second safety re-check (a
lost wake-up costs latency, never a hang).  Where there is no descriptor to
watch (the 64-slot waiter table is full, or the loop has no ``add_reader``,
e.g. Windows' proactor loop) it falls back to 5 ms polls, as the core does.

Receiving tries the non-blocking call first (``try_recv``; for batches
``recv_batch(timeout=0)``) and only waits when it returns nothing.  The try
and the moment a message becomes pending are one synchronous step, and every
``await`` lies between tries, so a cancelled ``recv`` (``task.cancel()``,
``asyncio.timeout``, ``asyncio.wait_for``) leaves nothing pending, no flag
raised and no reader registered, and loses nothing: the record stays in the
queue for the next ``recv``.

Tasks may share an ``AsyncReceiver`` as threads share a ``Receiver``: one
outstanding receive at a time.  While a task waits in ``recv``, another
task's ``recv``, ``recv_batch`` or ``try_recv`` raises ``UsageError`` at
once (it would otherwise take the record the waiting task was woken for);
while a message is pending, so does any receive.  Leaving an ``async with``
settles the message only if it is still pending, in one step, even when
the commit runs on the worker thread.

What runs on the loop, and what does not
----------------------------------------
A send, a commit and a rollback are memory copies into shared maps (a few
microseconds), so they run on the loop.  So does opening, which is file
I/O of the same order as opening a socket.  Three things may take long:

* an ``fdatasync``/``msync``: ``sync="always"`` sends and commits, ``sync()``,
  and the final sync of ``close()`` under a sync policy.  They run off the
  loop: ``sync="always"`` objects own one worker thread (made on first use),
  which also keeps their sends and commits in order and never concurrent;
  the others use the loop's default executor for ``sync()``/``close()``.
* backpressure (``max_queue_bytes``): a send that finds no room waits for a
  receiver's commit on the loop, exactly as a receiver waits for data, then
  retries with ``timeout=0``.  Cancelling such a send writes nothing.
* the append lock, if its holder died holding it (taken over after a
  second).  Not worth a thread for a once-in-a-crash stall.

A send already handed to the worker thread (``sync="always"``) is not undone
by cancelling its caller: the record is sent, whole, or not at all.

Iteration
---------
``async for msg in rx`` commits each message when the loop asks for the next
one.  A message whose loop body raised or broke out is rolled back, not
committed, when the loop's iterator is dropped (at once in CPython, as a
generator is closed); ``async with`` commits on a clean exit and rolls back
on an exception, cancellation included.

Work queue
----------
``AsyncWorkQueue`` wraps ``WorkQueue`` as ``AsyncReceiver`` wraps
``Receiver``: its jobs (``AsyncJob``, ``AsyncJobBatch``) wrap ``Job`` and
``JobBatch`` with awaitable ``ack``/``nack``/``renew``.  A claim tries
without blocking (``try_claim``; for batches ``claim_batch(timeout=0)``)
and, finding nothing, asks ``WorkQueue._wait_plan`` what to wait on: the
wake FIFO, the pidfds of the workers holding claims (readable when one
dies) and the next lease end or retry time.  ``_LoopWait`` watches the FIFO
and dups of those pidfds (the originals may be closed by the queue's
liveness watch meanwhile) with ``add_reader`` and sets its timer to the
earliest of the wake-up time, the deadline and the 1-second safety
re-check; whichever comes first, the claim tries again.  As for ``recv``,
the try is one synchronous step, so a cancelled ``claim`` leaves nothing
claimed.  Many tasks may claim through one object: the first to wait
watches the descriptors, the others wait for that wait to end (for any
reason: work, a timeout, a cancellation) and then look again, so the
object takes one waiter slot however many tasks use it.

Under ``sync="always"`` claims, acks, nacks and renewals msync the group's
journal, so they run on the object's worker thread.  A claim cancelled
while it runs there cannot be undone: the job it took is nacked at once
(claimable again, its attempt counted).  ``async for job in wq`` acks each
job when the loop asks for the next one and nacks it when the body raised
or broke out; ``async with`` acks on a clean exit, nacks on an exception.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import os
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from ._args import SyncPolicy, check_timeout, parse_sync
from ._control import CLAIM_WAITERS, DATA_WAITERS, ROOM_WAITERS
from ._followups import Enqueue
from ._format import HEADER_SIZE, as_payload
from ._options import Enqueued, TimeLike
from .workqueue._jobs import Job, JobBatch, JobState, reason_of
from .workqueue._stats import GroupStats
from ._segment import DEFAULT_SEGMENT_SIZE, StrPath
from ._state import Position
from ._wake import Waiter
from .errors import ClaimLost, Closed, Empty, Full, UsageError
from .receiver import Batch, Message, Receiver
from ._headers import frame_body
from .sender import DEFAULT_MAX_RECORD_SIZE, BatchItem, Headers, Sender, batch_payload
from .workqueue import WorkQueue

__all__ = ["AsyncBatch", "AsyncJob", "AsyncJobBatch", "AsyncMessage", "AsyncReceiver", "AsyncSender", "AsyncWorkQueue"]

_T = TypeVar("_T")
if TYPE_CHECKING:  # only in annotations, which are never evaluated (Python 3.10 has no TypeVarTuple)
    from typing_extensions import TypeVarTuple, Unpack

    _Args = TypeVarTuple("_Args")
_O = TypeVar("_O")  # the async object a message, batch or job came from
_I = TypeVar("_I")  # the blocking item it wraps
_P = TypeVar("_P", bound="Message | Batch")  # a receiver's pending item
_H = TypeVar("_H", bound="Job | JobBatch")  # a work queue's held item
_R = TypeVar("_R", bound="Message | Job")  # one record
_E = TypeVar("_E")  # a batch's member
_Item = TypeVar("_Item", bound="_AsyncItem[Any, Any]")

# The same bound as the blocking waiter's: a lost wake-up costs at most this.
_SAFETY_SECONDS = 1.0
# Where no descriptor can be watched, poll as often as the blocking fallback does.
_POLL_SECONDS = 0.005


def _resolve(future: asyncio.Future[bool], extra: bool = False) -> None:
    if not future.done():
        future.set_result(extra)


class _LoopWait:
    """``Waiter.wait`` for the running event loop: one object's waits, one at a time.

    ``until`` raises the waiter's flag, re-checks ``ready``, and sleeps on a
    future resolved by ``add_reader`` on the waiter's FIFO and on any extra
    descriptors (or by a timer); whatever ends it (ready, an extra descriptor,
    the wake-up time, the deadline, cancellation, ``stop``), the readers are
    removed and the flag lowered before it returns or raises.
    """

    def __init__(self, waiter: Callable[[], Waiter], region: int, what: str, group: int = 0) -> None:
        self._get_waiter = waiter
        self._region = region
        self._group = group  # the group tag a claimer waits under (CLAIM_WAITERS)
        self._what = what  # for the error when two tasks wait at once
        self._woken: asyncio.Future[bool] | None = None
        self.active = False
        self._stopped = False

    async def until(
        self,
        ready: Callable[[], bool],
        deadline: float | None,
        *,
        fds: Sequence[int] = (),
        wake_at: float | None = None,
    ) -> bool:
        """Wait until ``ready()`` or ``deadline`` (``loop.time()``); return ``ready()``.

        Also returns True (without ``ready()``) when one of ``fds`` becomes
        readable or ``wake_at`` (``loop.time()``) comes before the deadline:
        the caller should look again.  Returns False at once after ``stop()``.
        Raises ``UsageError`` if another task is waiting on the same object.
        """
        if self.active:
            raise UsageError(f"another task is already waiting on {self._what}")
        if self._stopped:
            return False
        if ready():
            return True
        loop = asyncio.get_running_loop()
        waiter = self._get_waiter()
        self.active = True
        try:
            waiter.raise_flag(self._region, self._group)
            woken = False
            while not self._stopped:
                if ready():  # after raising the flag: a send now is sure to wake us
                    return True  # (lower_flag swallows the wake bytes)
                if woken:
                    # Woken for nothing yet: swallow the bytes, then look again
                    # before sleeping, so a send in between is not missed.
                    waiter.drain()
                    woken = False
                    continue
                now = loop.time()
                if deadline is not None and now >= deadline:
                    return False
                if wake_at is not None and now >= wake_at:
                    return True
                limit = _SAFETY_SECONDS
                for end in (deadline, wake_at):
                    if end is not None:
                        limit = min(limit, end - now)
                if await self._sleep(loop, waiter.fileno(), fds, limit):
                    return True  # an extra descriptor became readable
                woken = True
            return False
        finally:
            waiter.lower_flag(self._region)
            self.active = False

    async def _sleep(self, loop: asyncio.AbstractEventLoop, fd: int, fds: Sequence[int], limit: float) -> bool:
        """Sleep until ``fd`` or one of ``fds`` is readable or ``limit`` seconds pass; True for ``fds``."""
        woken: asyncio.Future[bool] = loop.create_future()
        watched: list[int] = []
        timer: asyncio.TimerHandle | None = None
        self._woken = woken
        try:
            try:
                if fd >= 0:
                    loop.add_reader(fd, _resolve, woken)
                    watched.append(fd)
                for extra in fds:
                    loop.add_reader(extra, _resolve, woken, True)
                    watched.append(extra)
            except NotImplementedError:
                pass  # no readers on this loop: poll
            polling = fd < 0 or not watched
            timer = loop.call_later(min(limit, _POLL_SECONDS) if polling else limit, _resolve, woken)
            return await woken
        finally:
            self._woken = None
            if timer is not None:
                timer.cancel()
            for each in watched:
                loop.remove_reader(each)

    async def stop(self) -> None:
        """End the current wait (its caller sees the object closing) and every later one."""
        self._stopped = True
        if self._woken is not None:
            _resolve(self._woken)
        while self.active:
            # The waiting task lowers its flag and removes its readers on its next step.
            await asyncio.sleep(0)


# -- what messages, batches and jobs share -----------------------------------


class _AsyncItem(Generic[_O, _I]):
    """What async messages, batches and jobs share: their owner, the blocking item they wrap, ``async with``.

    Each kind says how ``async for`` settles one: ``_done_in_loop`` when the
    loop asks for the next one (the settling to await, or None when there is
    nothing left to settle), ``_give_back_from_loop`` (synchronous: it runs in
    ``__del__``) when the loop was left with it in hand.
    """

    __slots__ = ("_item", "_owner")
    _owner: _O
    _item: _I

    def __init__(self, owner: _O, item: _I) -> None:
        self._owner = owner
        self._item = item

    async def __aenter__(self: _Item) -> _Item:
        return self

    def _done_in_loop(self) -> Awaitable[None] | None:
        raise NotImplementedError

    def _give_back_from_loop(self) -> None:
        raise NotImplementedError


class _RecordFields(Generic[_R]):
    """The fields of one record that AsyncMessage and AsyncJob pass through."""

    __slots__ = ()
    _item: _R

    @property
    def data(self) -> bytes:
        """The record's payload."""
        return self._item.data

    @property
    def headers(self) -> dict[str, bytes]:
        """The record's headers; empty when it has none."""
        return self._item.headers

    @property
    def position(self) -> Position:
        """Where the record starts in the queue."""
        return self._item.position


class _Members(Generic[_E]):
    """What AsyncBatch and AsyncJobBatch share: a sequence of their ``_members``."""

    __slots__ = ()

    @property
    def _members(self) -> list[_E]:
        raise NotImplementedError

    def __iter__(self) -> Iterator[_E]:
        return iter(self._members)

    def __len__(self) -> int:
        return len(self._members)

    def __getitem__(self, index: int) -> _E:
        return self._members[index]


class _Iteration(Generic[_Item]):
    """``async for``: settle each message or job when the next one is asked for.

    One the loop was left with (break, or its body raised) is given back when
    this iterator is dropped (at once in CPython), as the blocking classes'
    generators do on close.
    """

    def __init__(self, receive: Callable[[], Awaitable[_Item]]) -> None:
        self._receive = receive
        self._current: _Item | None = None

    def __aiter__(self) -> _Iteration[_Item]:
        return self

    async def __anext__(self) -> _Item:
        current = self._current
        if current is not None:
            settling = current._done_in_loop()
            if settling is not None:
                await settling
        self._current = None
        self._current = await self._receive()
        return self._current

    def __del__(self) -> None:
        current = self._current
        if current is not None:
            current._give_back_from_loop()


# -- messages and batches ---------------------------------------------------


class _AsyncPending(_AsyncItem["AsyncReceiver", _P]):
    """What AsyncMessage and AsyncBatch share: settle once, by hand or by ``async with``."""

    __slots__ = ()

    @property
    def pending(self) -> bool:
        """True until committed or rolled back."""
        return self._item.pending

    async def commit(self) -> None:
        """Mark it handled: it will not be delivered to this receiver name again."""
        await self._owner._run(self._item.commit)

    async def rollback(self) -> None:
        """Give it back: the next ``recv`` returns it again."""
        self._item.rollback()

    async def _settle(self, commit: bool) -> None:
        """Commit (or roll back) if still pending, in one step: another task may have settled it."""
        if not self.pending:
            return
        settle_if_pending = self._owner._receiver._settle_if_pending
        if commit:
            await self._owner._run(settle_if_pending, self._item, True)
        else:
            settle_if_pending(self._item, False)

    async def __aexit__(
        self, kind: type[BaseException] | None, value: BaseException | None, traceback: TracebackType | None
    ) -> None:
        await self._settle(kind is None)

    def _done_in_loop(self) -> Awaitable[None] | None:
        return self._settle(True)

    def _give_back_from_loop(self) -> None:
        try:
            self._owner._receiver._settle_if_pending(self._item, False)
        except Closed:
            pass  # the receiver closed meanwhile, which rolled it back


class AsyncMessage(_AsyncPending[Message], _RecordFields[Message]):
    """One received record; ``data`` is its payload.  Pending until committed.

    ``async with msg:`` commits on a clean exit and rolls back on an exception
    (cancellation included).
    """

    __slots__ = ()

    def __repr__(self) -> str:
        return f"<segq.AsyncMessage {len(self._item.data)} bytes at {self._item.position}>"


class AsyncBatch(_AsyncPending[Batch], _Members[Message]):
    """Messages received together, committed or rolled back together.

    Iterate it for the messages (read their ``data``; commit the batch, not them).
    """

    __slots__ = ()

    @property
    def messages(self) -> list[Message]:
        """The batch's messages, in queue order."""
        return self._item.messages

    @property
    def _members(self) -> list[Message]:
        return self._item.messages

    def __repr__(self) -> str:
        return f"<segq.AsyncBatch of {len(self._item.messages)} messages>"


# -- what the async objects share ------------------------------------------


class _LoopOwner:
    """An async wrapper's lifetime: its blocking object, optional worker thread and loop wait.

    Subclasses open the blocking object, then call ``_start``.
    """

    _closed: bool
    _worker: concurrent.futures.ThreadPoolExecutor | None
    _sync_on_close: bool
    _wait: _LoopWait
    _close_blocking: Callable[[], None]

    def _start(
        self, close_blocking: Callable[[], None], policy: float | None, thread_name: str, wait: _LoopWait
    ) -> None:
        """Own ``wait`` and what ``close`` ends: ``close_blocking`` (the wrapped object's ``close``), the worker.

        ``policy`` is the parsed sync policy.  Under ``sync="always"`` (0) the
        wrapped object's sends, commits or settles fdatasync or msync: one
        worker thread, named ``thread_name``, runs them off the loop, in order.
        """
        self._closed = False
        self._sync_on_close = policy is not None
        self._worker = (
            concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=thread_name) if policy == 0.0 else None
        )
        self._wait = wait
        self._close_blocking = close_blocking

    async def _run(self, call: Callable[[Unpack[_Args]], _T], *args: Unpack[_Args]) -> _T:
        """Run a blocking send, commit or settle: on the loop, or on the worker thread when it syncs."""
        if self._worker is None:
            return call(*args)  # no await first: on the loop it is one synchronous step
        return await asyncio.get_running_loop().run_in_executor(self._worker, call, *args)

    async def close(self) -> None:
        """Release everything; a waiting call raises ``Closed``.  Idempotent.

        Under a sync policy the final sync runs off the loop.
        """
        if self._closed:
            return
        self._closed = True
        await self._wait.stop()
        if self._worker is not None or self._sync_on_close:
            await asyncio.get_running_loop().run_in_executor(self._worker, self._close_blocking)
        else:
            self._close_blocking()
        if self._worker is not None:
            self._worker.shutdown(wait=False)

    async def __aenter__(self: _Owner) -> _Owner:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, value: BaseException | None, traceback: TracebackType | None
    ) -> None:
        await self.close()


_Owner = TypeVar("_Owner", bound=_LoopOwner)


# -- the receiver -----------------------------------------------------------


class AsyncReceiver(_LoopOwner):
    """Read the queue at ``path`` in send order, as consumer ``name``, from a coroutine.

    The same semantics as ``segq.Receiver`` (which it wraps): at-least-once,
    one pending message or batch at a time, one live receiver per name.
    Waiting is done by the running event loop: no thread, no busy polling.
    ``close()`` rolls back a pending message: it comes again.

    >>> import asyncio, segq, tempfile
    >>> async def main(path):
    ...     async with segq.AsyncSender(path) as tx:
    ...         await tx.send(b"job 1")
    ...     async with segq.AsyncReceiver(path) as rx:
    ...         async with await rx.recv(timeout=1) as msg:
    ...             print(msg.data)
    >>> asyncio.run(main(tempfile.mkdtemp()))
    b'job 1'
    """

    def __init__(
        self, path: StrPath, name: str = "default", *, sync: SyncPolicy = "never", create: bool = False
    ) -> None:
        policy = parse_sync(sync)
        self._receiver = Receiver(path, name, sync=sync, create=create)
        self.path = self._receiver.path
        self.name = self._receiver.name
        wait = _LoopWait(self._receiver._data_waiter, DATA_WAITERS, f"receiver {self.name!r}")
        self._start(self._receiver.close, policy, "segq-aio-commit", wait)

    # -- receiving -------------------------------------------------------

    async def recv(self, timeout: float | None = None) -> AsyncMessage:
        """Return the next message, waiting on the loop; raise ``Empty`` after ``timeout`` seconds.

        The message is pending until committed or rolled back (``async with
        await rx.recv() as msg`` does either).  Raises ``UsageError`` if one is
        already pending, or if another task is waiting on this receiver.
        Cancelling a waiting ``recv`` leaves nothing pending.
        """
        timeout = check_timeout(timeout)
        message = await self._receive(self._receiver.try_recv, timeout)
        return AsyncMessage(self, message)

    def try_recv(self) -> AsyncMessage | None:
        """Return the next message if one is ready, else None; never waits.

        A plain method, not a coroutine: it never blocks, so it needs no
        ``await`` (``await rx.try_recv()`` is a TypeError).  Raises
        ``UsageError`` if a message is pending or another task is waiting in ``recv``.
        """
        self._check_open()
        self._check_no_waiter()
        message = self._receiver.try_recv()
        return None if message is None else AsyncMessage(self, message)

    async def recv_batch(self, max_count: int, timeout: float | None = None) -> AsyncBatch:
        """Return 1 to ``max_count`` messages: as many as are ready once the first is.

        Raises ``Empty`` if none arrives within ``timeout`` seconds.
        """
        timeout = check_timeout(timeout)
        attempt = functools.partial(_none_if_empty, self._receiver.recv_batch, max_count, timeout=0)
        return AsyncBatch(self, await self._receive(attempt, timeout))

    async def _receive(self, attempt: Callable[[], _T | None], timeout: float | None) -> _T:
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        self._check_open()
        self._check_no_waiter()
        while True:
            self._check_open()
            item = attempt()  # the only step that makes something pending: no await in it
            if item is not None:
                return item
            ready = await self._wait.until(self._receiver._data_ready, deadline)
            self._check_open()
            self._receiver._raise_if_gone()
            if not ready:
                raise Empty(f"no record in {self.path} after {timeout} s")
            # Ready, yet the try may still find nothing (the tail just moved to
            # a new segment's start): try again, wait again.

    def __aiter__(self) -> _Iteration[AsyncMessage]:
        """Yield messages forever; each is committed when the loop asks for the next one.

        A message whose loop body raised (or broke out) is rolled back, not committed.
        """
        return _Iteration(self.recv)

    # -- commit and rollback ---------------------------------------------

    async def commit(self) -> None:
        """Commit the pending message or batch."""
        await self._run(self._receiver.commit)

    async def rollback(self) -> None:
        """Roll back the pending message or batch."""
        self._receiver.rollback()

    @property
    def committed_position(self) -> Position:
        """The position after the last committed message."""
        return self._receiver.committed_position

    # -- lifetime --------------------------------------------------------

    @staticmethod
    def remove(path: StrPath, name: str) -> None:
        """Unregister receiver ``name`` (see ``Receiver.remove``); raises ``Locked`` if it is open."""
        Receiver.remove(path, name)

    def _check_open(self) -> None:
        if self._closed:
            raise Closed(f"receiver {self.name!r} is closed")

    def _check_no_waiter(self) -> None:
        # One outstanding receive per receiver, as for threads on a Receiver:
        # a task that took a record while another waits would leave that one
        # woken into a UsageError.
        if self._wait.active:
            raise UsageError(
                f"another task is already waiting in recv on receiver {self.name!r}: a receiver is one consumer "
                "(for parallel consumers use segq.AsyncWorkQueue)"
            )

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"at {self.committed_position}"
        return f"<segq.AsyncReceiver {self.path!r} name={self.name!r} {state}>"


def _none_if_empty(receive: Callable[..., _T], *args: Any, **kwargs: Any) -> _T | None:
    try:
        return receive(*args, **kwargs)
    except Empty:
        return None


# -- the sender -------------------------------------------------------------


class AsyncSender(_LoopOwner):
    """Append records to the queue at ``path`` from a coroutine, creating the queue if missing.

    Takes the options of ``segq.Sender`` (which it wraps) and keeps its
    guarantees: when ``await tx.send(data)`` returns, the record survives a
    crash of this process.  Sends are memory copies and run on the loop;
    ``sync="always"`` sends run on one worker thread (the fdatasync would
    stall the loop); a send held back by ``max_queue_bytes`` waits on the loop.
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
        policy = parse_sync(sync)
        self._sender = Sender(
            path,
            segment_size=segment_size,
            max_record_size=max_record_size,
            sync=sync,
            max_queue_bytes=max_queue_bytes,
            dedup_window=dedup_window,
        )
        self.path = self._sender.path
        wait = _LoopWait(self._sender._get_room_waiter, ROOM_WAITERS, "this sender's room")
        self._start(self._sender.close, policy, "segq-aio-sync", wait)
        # One send at a time waits for room: its FIFO is watched by one task.
        self._room_turn = asyncio.Lock()
        self._enqueuer: concurrent.futures.ThreadPoolExecutor | None = None  # made by the first enqueue
        self._enqueues: set[concurrent.futures.Future[Enqueued]] = set()  # running, for close() to wait on
        self._closing = False

    @property
    def segment_size(self) -> int:
        """The size new segments grow to (``Sender.segment_size``)."""
        return self._sender.segment_size

    @property
    def max_record_size(self) -> int:
        """The largest record ``send`` accepts, headers included."""
        return self._sender.max_record_size

    @property
    def max_queue_bytes(self) -> int | None:
        """The backlog past which sends wait for room (None: no bound)."""
        return self._sender.max_queue_bytes

    @property
    def dedup_window(self) -> float:
        """Seconds a settled job's ``dedup_key`` keeps refusing duplicates."""
        return self._sender.dedup_window

    # -- sending ---------------------------------------------------------

    async def send(self, data: bytes, timeout: float | None = None, headers: Headers | None = None) -> None:
        """Append one record; when this returns it survives a crash of this process.

        ``headers`` travel with the record (see ``Sender.send``).  Raises
        ``RecordTooLarge`` (nothing written), ``Full`` if ``timeout``
        runs out while the backlog is at ``max_queue_bytes``, ``Closed`` after
        ``close()``.  Cancelling a send that waits for room writes nothing.
        """
        timeout = check_timeout(timeout)
        payload = data if type(data) is bytes else as_payload(data)
        if headers is not None:
            # Validated here, as Sender.send does; empty headers make a plain record.
            body = frame_body(payload, headers)
            payload = body if headers else payload
        await self._append(self._sender.send, payload, HEADER_SIZE + len(payload), timeout)

    async def send_batch(self, records: Iterable[BatchItem], timeout: float | None = None) -> None:
        """Append many records, each data or a ``(data, headers)`` pair, as one atomic write (see ``Sender.send_batch``)."""
        timeout = check_timeout(timeout)
        payloads = [record if type(record) is bytes else batch_payload(record) for record in records]
        framed = sum(HEADER_SIZE + len(payload) for payload in payloads)
        await self._append(self._sender.send_batch, payloads, framed, timeout)

    async def _append(
        self, write: Callable[[_T, float | None], None], records: _T, framed: int, timeout: float | None
    ) -> None:
        """Run ``write(records, timeout)``, the blocking send; never let it wait for room on the loop's thread."""
        if self._closed:
            raise Closed("send() on a closed AsyncSender")
        limit = self._sender.max_queue_bytes
        if limit is None:
            await self._run(write, records, None)
            return
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        async with self._room_turn:
            while True:
                if self._closed:
                    raise Closed("send() on a closed AsyncSender")
                try:
                    await self._run(write, records, 0)  # room now, or Full without waiting
                    return
                except Full:
                    if framed > limit:
                        raise  # it can never fit: the sender said so
                if not await self._wait.until(lambda: self._sender._has_room(framed), deadline):
                    if self._closed:
                        raise Closed("send() on a closed AsyncSender")
                    raise Full(f"backlog stayed over max_queue_bytes={limit} for {timeout} s; nothing was written")

    async def enqueue(
        self,
        data: bytes,
        *,
        run_at: TimeLike | None = None,
        delay: float | None = None,
        priority: int = 0,
        dedup_key: str | None = None,
        job_id: str | None = None,
        headers: Headers | None = None,
    ) -> Enqueued:
        """Send ``data`` as a work-queue job with options; return its ``Enqueued(id, duplicate)``.

        The options and their semantics are ``Sender.enqueue``'s.  The enqueue
        runs on a worker thread, never on the loop: the dedup index takes a
        file lock other processes share, and a full queue waits for room.  A
        cancelled enqueue may still land (whole, never half); ``close()``
        waits for the ones running.
        """
        if self._closed or self._closing:
            raise Closed("enqueue() on a closed AsyncSender")
        pool = self._worker  # sync="always": its one thread keeps sends and enqueues in order
        if pool is None:
            if self._enqueuer is None:
                self._enqueuer = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="segq-aio-enqueue")
            pool = self._enqueuer
        work = pool.submit(
            functools.partial(
                self._sender.enqueue,
                data,
                run_at=run_at,
                delay=delay,
                priority=priority,
                dedup_key=dedup_key,
                job_id=job_id,
                headers=headers,
            )
        )
        self._enqueues.add(work)
        work.add_done_callback(self._enqueues.discard)
        return await asyncio.wrap_future(work)

    # -- durability ------------------------------------------------------

    async def flush(self) -> None:
        """Push buffered records to the OS: a no-op, as for ``Sender``."""
        if self._closed:
            raise Closed("flush() on a closed AsyncSender")
        self._sender.flush()

    async def sync(self) -> None:
        """Make every record this sender sent so far survive power loss (the fdatasync runs off the loop)."""
        if self._closed:
            raise Closed("sync() on a closed AsyncSender")
        await asyncio.get_running_loop().run_in_executor(self._worker, self._sender.sync)

    # -- lifetime --------------------------------------------------------

    async def close(self) -> None:
        """Wait for the enqueues running, then release everything (see ``_LoopOwner.close``).  Idempotent."""
        self._closing = True
        if self._enqueues:
            await asyncio.wait([asyncio.wrap_future(work) for work in list(self._enqueues)])
        await super().close()
        if self._enqueuer is not None:
            self._enqueuer.shutdown(wait=False)

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<segq.AsyncSender {self.path!r} {state}>"


# -- the work queue ---------------------------------------------------------


class _AsyncHold(_AsyncItem["AsyncWorkQueue", _H]):
    """What AsyncJob and AsyncJobBatch share: awaitable ``ack``/``nack``/``renew``, and ``async with``."""

    __slots__ = ()

    def _held(self) -> bool:
        raise NotImplementedError

    async def ack(self, enqueue: Sequence[Enqueue] | None = None) -> None:
        """Mark it done for good, with ``enqueue``'s follow-ups atomically (see ``Job.ack``).

        Raises ``ClaimLost`` (and changes nothing) if the claim is gone.
        """
        if enqueue:
            if not isinstance(self._item, Job):
                raise UsageError("ack a batch's jobs one by one to give them follow-ups")
            await self._owner._run(self._item.ack, enqueue)
        else:
            await self._owner._run(self._item.ack)

    async def nack(self, delay: float = 0.0, reason: str | None = None) -> None:
        """Give it back: claimable again after ``delay`` seconds (dead-lettered on the last attempt)."""
        await self._owner._run(self._item.nack, delay, reason)

    async def renew(self, lease: float | None = None) -> None:
        """Extend the lease to ``lease`` seconds from now (default: the queue's lease)."""
        await self._owner._run(self._item.renew, lease)

    async def __aexit__(
        self, kind: type[BaseException] | None, value: BaseException | None, traceback: TracebackType | None
    ) -> None:
        if not self._held():
            return
        if kind is None:
            await self.ack()
        else:
            try:
                await self.nack(reason=reason_of(value))
            except (ClaimLost, Closed):
                pass  # the record went back anyway; the body's exception matters more

    def _done_in_loop(self) -> Awaitable[None] | None:
        return self.ack() if self._held() and not self._owner._closed else None

    def _give_back_from_loop(self) -> None:
        if self._held() and not self._owner._closed:
            self._owner._give_back(self._item, "the loop over the work queue was left")


class AsyncJob(_AsyncHold[Job], _RecordFields[Job]):
    """One claimed record (a ``segq.Job``); ``ack``, ``nack`` and ``renew`` are awaitable.

    ``async with job:`` acks on a clean exit and nacks on an exception
    (cancellation included).
    """

    __slots__ = ()

    def _held(self) -> bool:
        return self._item.state is JobState.HELD

    @property
    def id(self) -> str:
        """The job's id (see ``Job.id``)."""
        return self._item.id

    @property
    def priority(self) -> int:
        """The job's priority, 0 to 9."""
        return self._item.priority

    @property
    def run_at(self) -> float | None:
        """When the job was scheduled to run (seconds since the epoch), None if at once."""
        return self._item.run_at

    @property
    def attempt(self) -> int:
        """How many times the record was claimed, this claim included (from 1)."""
        return self._item.attempt

    @property
    def lease_expires_at(self) -> float:
        """When the lease ends, in the queue's clock (``time.time`` by default)."""
        return self._item.lease_expires_at

    @property
    def state(self) -> JobState:
        """HELD until acked, nacked or lost."""
        return self._item.state

    def __repr__(self) -> str:
        job = self._item
        return f"<segq.AsyncJob {len(job.data)} bytes at {job.position}, attempt {job.attempt}, {job.state.value}>"


class AsyncJobBatch(_AsyncHold[JobBatch], _Members[AsyncJob]):
    """Jobs claimed together by ``claim_batch``: one lease; settle them together or one by one."""

    __slots__ = ("jobs",)

    def __init__(self, owner: AsyncWorkQueue, batch: JobBatch) -> None:
        super().__init__(owner, batch)
        self.jobs = [AsyncJob(owner, job) for job in batch.jobs]

    def _held(self) -> bool:
        return any(job.state is JobState.HELD for job in self._item.jobs)

    @property
    def _members(self) -> list[AsyncJob]:
        return self.jobs

    def __repr__(self) -> str:
        return f"<segq.AsyncJobBatch of {len(self.jobs)} jobs>"


def _quietly(settle: Callable[[], None]) -> None:
    try:
        settle()
    except (ClaimLost, Closed, UsageError):
        pass  # settled or lost meanwhile, or the queue closed (which gave the job back)


class AsyncWorkQueue(_LoopOwner):
    """Share the records of the queue at ``path`` among the workers of ``group``, from coroutines.

    Takes the options of ``segq.WorkQueue`` (which it wraps) and keeps its
    semantics: leases, retries, dead letters, a dead worker's claims coming
    back at once.  Waiting for work is done by the running event loop: no
    thread, no busy polling.  Many tasks may claim through one object (one
    of them watches the wake-up descriptors, the others wait for its turn to
    end).  ``sync="always"`` claims and settles run on one worker thread
    (their msync would stall the loop).

    >>> import asyncio, segq, tempfile
    >>> async def main(path):
    ...     async with segq.AsyncSender(path) as tx:
    ...         await tx.send(b"resize photo 1")
    ...     async with segq.AsyncWorkQueue(path, lease=60) as wq:
    ...         async with await wq.claim(timeout=1) as job:
    ...             print(job.data, job.attempt)
    >>> asyncio.run(main(tempfile.mkdtemp()))
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
    ) -> None:
        policy = parse_sync(sync)
        self._queue = WorkQueue(
            path,
            group,
            lease=lease,
            max_attempts=max_attempts,
            dead_letter=dead_letter,
            sync=sync,
            clock=clock,
            create=create,
        )
        self.path = self._queue.path
        self.group = self._queue.group
        self.dead_letter = self._queue.dead_letter
        # One task at a time watches the FIFO; the others wait for its wait to end.
        wait = _LoopWait(
            self._queue._claim_waiter, CLAIM_WAITERS, f"work queue group {self.group!r}", self._queue._group_tag
        )
        self._start(self._queue.close, policy, "segq-aio-group", wait)
        self._turn_over: asyncio.Future[bool] | None = None

    @property
    def lease(self) -> float:
        """Seconds a claim is held before its record goes back."""
        return self._queue.lease

    @property
    def max_attempts(self) -> int:
        """Attempts after which a record goes to the dead-letter queue."""
        return self._queue.max_attempts

    # -- claiming --------------------------------------------------------

    def stats(self) -> "GroupStats":
        """Return where the group's jobs are (``WorkQueue.stats``; a short lock, never a wait)."""
        return self._queue.stats()

    async def claim(self, timeout: float | None = None) -> AsyncJob:
        """Return the next record to work on, waiting on the loop; ``Empty`` after ``timeout`` seconds.

        The job is held until acked or nacked, or until its lease runs out
        (``async with await wq.claim() as job`` acks or nacks it).  Cancelling
        a waiting ``claim`` leaves nothing claimed.
        """
        timeout = check_timeout(timeout)
        return AsyncJob(self, await self._claim(self._queue.try_claim, timeout))

    async def claim_batch(self, max_count: int, timeout: float | None = None) -> AsyncJobBatch:
        """Return 1 to ``max_count`` jobs claimed in one transaction, sharing one lease.

        Waits like ``claim`` for the first; takes as many more as are claimable.
        """
        timeout = check_timeout(timeout)
        attempt = functools.partial(_none_if_empty, self._queue.claim_batch, max_count, timeout=0)
        return AsyncJobBatch(self, await self._claim(attempt, timeout))

    async def try_claim(self) -> AsyncJob | None:
        """Return the next record to work on if one is claimable now, else None; never waits for one.

        A coroutine (unlike ``AsyncReceiver.try_recv``) because under
        ``sync="always"`` the claim's msync runs on the worker thread.
        """
        self._check_open()
        job = await self._try(self._queue.try_claim)
        return None if job is None else AsyncJob(self, job)

    async def _claim(self, attempt: Callable[[], _T | None], timeout: float | None) -> _T:
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while True:
            self._check_open()
            item = await self._try(attempt)
            if item is not None:
                return item
            if deadline is not None and loop.time() >= deadline:
                raise Empty(f"no record for group {self.group!r} in {self.path} after {timeout} s")
            if self._wait.active:
                # Another task of this object is waiting: its wait ending, for
                # whatever reason, is this task's cue to look again.
                if self._turn_over is None:
                    self._turn_over = loop.create_future()
                remaining = None if deadline is None else max(0.0, deadline - loop.time())
                await asyncio.wait([self._turn_over], timeout=remaining)
                continue
            plan = self._queue._wait_plan()
            wake_at = None if plan.wake_at is None else loop.time() + max(0.0, plan.wake_at - time.monotonic())
            # Watch copies of the pidfds: the originals belong to the WorkQueue's
            # liveness watch, which may close them (a holder died) while we sleep.
            pidfds: list[int] = []
            try:
                for fd in plan.pidfds:
                    pidfds.append(os.dup(fd))
                await self._wait.until(plan.ready, deadline, fds=pidfds, wake_at=wake_at)
            except asyncio.CancelledError:
                # This claimer may have been the one a job woke: pass the turn on.
                self._queue._pass_wake_on()
                raise
            finally:
                for fd in pidfds:
                    os.close(fd)
                turn_over, self._turn_over = self._turn_over, None
                if turn_over is not None:
                    _resolve(turn_over)
            # Whatever ended the wait (work, a holder's death, a lease end, a
            # retry time, the deadline, close), the next turn looks again.

    async def _try(self, attempt: Callable[[], _T | None]) -> _T | None:
        """Run one non-blocking claim attempt: on the loop, or on the worker thread when it msyncs."""
        if self._worker is None:
            return attempt()  # no await between the claim and its return to the caller
        future = asyncio.get_running_loop().run_in_executor(self._worker, attempt)
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            # The claim runs on regardless; whatever it claims has no taker: give it back.
            future.add_done_callback(self._give_back_orphan)
            raise

    def _give_back_orphan(self, future: asyncio.Future[Any]) -> None:
        if future.cancelled() or future.exception() is not None:
            return
        claimed = future.result()
        if claimed is not None:
            self._give_back(claimed, "the claiming task was cancelled")

    def _give_back(self, claimed: Job | JobBatch, reason: str) -> None:
        """Nack what no task will settle, quietly: on the worker thread if any (its msync stays off the loop)."""
        give_back = functools.partial(claimed.nack, reason=reason)
        if self._worker is not None:
            try:
                self._worker.submit(_quietly, give_back)
                return
            except RuntimeError:
                pass  # the worker is shut down: close() gave the job back, the nack below finds it closed
        _quietly(give_back)

    def __aiter__(self) -> _Iteration[AsyncJob]:
        """Yield jobs forever; each is acked when the loop asks for the next one.

        A job whose loop body raised (or broke out) is nacked, not acked.
        """
        return _Iteration(self.claim)

    # -- lifetime --------------------------------------------------------

    @staticmethod
    def remove(path: StrPath, group: str) -> None:
        """Unregister ``group`` (see ``WorkQueue.remove``); raises ``Locked`` if it is open anywhere."""
        WorkQueue.remove(path, group)

    def _check_open(self) -> None:
        if self._closed:
            raise Closed(f"work queue {self.group!r} is closed")

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"lease={self.lease:g}s max_attempts={self.max_attempts}"
        return f"<segq.AsyncWorkQueue {self.path!r} group={self.group!r} {state}>"
