"""Workers: run a handler over the jobs of a work-queue group until told to stop.

Theory of operation
-------------------
:func:`run_worker` owns one ``WorkQueue`` and ``concurrency`` handler threads
(with ``concurrency=1`` the calling thread runs the handler itself).  Its
claiming loop takes as many jobs as there are idle threads, in one claim
transaction (``claim_batch``), and hands them out; when nothing is claimable
it sleeps where a claimer sleeps (the queue's wake-up FIFO, the pidfds of the
workers holding claims, the next lease end) plus a *stop pipe*.  The loop
itself never blocks anywhere else, so one pipe byte reaches it whatever it
waits for: a thread that finishes a job while the loop waits for an idle
thread, a stop.

A thread settles its job as soon as the handler returns: an ack, with the
follow-ups the handler returned (``Job.ack(enqueue=...)``, atomic with the
ack), or, when the handler raised, a nack whose reason is the exception.  A
settlement that fails is logged (``ClaimLost`` at WARNING as a lost claim,
anything else at ERROR) and the loop goes on: the job went back to the group
or will, and another attempt settles it.

Stopping: the ``stop`` event set, or, with no ``stop`` and called from the
main thread, the first SIGTERM or SIGINT (the handlers are put back at once,
so a second one acts as usual: a second Ctrl-C raises KeyboardInterrupt).
The loop stops claiming, waits for the running jobs until the latest of
their lease ends, then closes the ``WorkQueue``, which gives back every job
still held.  A handler still running after its lease is abandoned: its
claim is lost anyway, and its late settlement is refused.

:func:`arun_worker` is the same on asyncio: ``concurrency`` tasks instead of
threads, an ``asyncio.Event`` (or the loop's signal handlers) to stop.
"""

from __future__ import annotations

import asyncio
import logging
import os
import queue
import select
import signal
import threading
import time
from types import FrameType
from typing import Any, Awaitable, Callable, NamedTuple, Optional, Sequence

from ._args import SyncPolicy
from ._followups import Enqueue
from .workqueue._jobs import Job, JobState, reason_of
from ._segment import StrPath
from .aio import AsyncJob, AsyncWorkQueue
from .errors import ClaimLost, Empty, InvalidArgument, SegqError
from .workqueue import WorkQueue

__all__ = ["run_worker", "arun_worker", "serve", "Handler", "AsyncHandler", "log_failed_settlement"]

log = logging.getLogger(__name__)

#: ``handler(job)``: return None (ack) or a list of follow-ups (ack with them); raise to nack.
Handler = Callable[[Job], Optional[Sequence[Enqueue]]]
#: The coroutine form, for :func:`arun_worker`.
AsyncHandler = Callable[[AsyncJob], Awaitable[Optional[Sequence[Enqueue]]]]

_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def _check_worker(handler: object, concurrency: object) -> int:
    """Return ``concurrency`` if it is an int >= 1 and ``handler`` is callable; raise InvalidArgument if not."""
    if not isinstance(concurrency, int) or isinstance(concurrency, bool) or concurrency < 1:
        raise InvalidArgument(f"concurrency must be an int >= 1, not {concurrency!r}")
    if not callable(handler):
        raise InvalidArgument(f"handler must be callable, not {type(handler).__name__}")
    return concurrency


def log_failed_settlement(job: Job | AsyncJob, call: str, error: SegqError) -> None:
    """Log a settlement that failed: a lost claim at WARNING, saying so; anything else at ERROR."""
    if isinstance(error, ClaimLost):
        log.warning("lost claim: could not %s the job at %s (attempt %d): %s", call, job.position, job.attempt, error)
    else:
        log.error("could not %s the job at %s (attempt %d): %s", call, job.position, job.attempt, error)


class _Settlement(NamedTuple):
    """One way to settle a job: ``call`` "ack" (with ``followups``) or "nack" (with ``reason``).

    The sync and async workers decide with :func:`_settlement` and
    :meth:`after_failure`; each only makes the calls, blocking or awaited.
    """

    call: str
    followups: list[Enqueue]
    reason: str | None

    def apply(self, job: Job) -> None:
        if self.call == "ack":
            job.ack(enqueue=self.followups)
        else:
            job.nack(reason=self.reason)

    async def apply_async(self, job: AsyncJob) -> None:
        if self.call == "ack":
            await job.ack(enqueue=self.followups)
        else:
            await job.nack(reason=self.reason)

    def after_failure(self, job: Job | AsyncJob, failure: SegqError) -> _Settlement | None:
        """Log that this settlement failed; return the one to try instead, or None."""
        log_failed_settlement(job, self.call, failure)
        if self.call == "ack" and job.state is JobState.HELD and not isinstance(failure, ClaimLost):
            # Refused before anything was written (a bad or too large follow-up): give
            # the job back with the reason, so it ends in the dead-letter queue, not in a loop of leases.
            return _Settlement("nack", [], f"follow-ups refused: {failure}")
        return None


def _settlement(job: Job | AsyncJob, result: object, error: BaseException | None) -> _Settlement | None:
    """Decide how to settle ``job`` after its handler returned ``result`` or raised ``error``.

    | handler                                  | settlement                              |
    |------------------------------------------|-----------------------------------------|
    | settled the job itself                   | none                                    |
    | returned None, or a list of Enqueue      | ack, with those follow-ups              |
    | returned anything else                   | nack (logged at ERROR)                  |
    | raised                                   | nack, the exception as reason (WARNING) |
    """
    if job.state is not JobState.HELD:
        return None  # the handler settled it itself
    if error is not None:
        reason = reason_of(error)
        log.warning("job at %s failed (attempt %d): %s", job.position, job.attempt, reason)
        return _Settlement("nack", [], reason)
    if result is None:
        return _Settlement("ack", [], None)
    if isinstance(result, (list, tuple)) and all(isinstance(item, Enqueue) for item in result):
        return _Settlement("ack", list(result), None)
    log.error(
        "handler returned %s for the job at %s; it must return None or a list of segq.Enqueue",
        type(result).__name__,
        job.position,
    )
    return _Settlement("nack", [], f"handler returned {type(result).__name__}, not None or a list of segq.Enqueue")


def _settle(job: Job, result: object, error: BaseException | None) -> None:
    """Ack ``job`` with the handler's follow-ups, or nack it with ``error``; log a settlement that fails."""
    settlement = _settlement(job, result, error)
    while settlement is not None:
        try:
            settlement.apply(job)
            return
        except SegqError as failure:
            settlement = settlement.after_failure(job, failure)


def _run_job(handler: Handler, job: Job) -> None:
    try:
        result = handler(job)
    except Exception as error:  # noqa: BLE001 - any handler failure nacks the job
        _settle(job, None, error)
    except BaseException as error:
        _settle(job, None, error)
        raise
    else:
        _settle(job, result, None)


class _StopPipe:
    """One pipe the claiming loop sleeps on: written on stop and when a thread frees up."""

    def __init__(self, stop: threading.Event | None) -> None:
        self.read_fd, self._write_fd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._stopped = False
        self.signal: int | None = None  # the signal that stopped the worker, if one did
        self._lock = threading.Lock()
        self._closed = False
        self._previous: dict[int, Any] = {}
        self._event = stop
        if stop is not None:
            if not (hasattr(stop, "wait") and hasattr(stop, "is_set")):
                raise InvalidArgument(f"stop must be a threading.Event, not {type(stop).__name__}")
            # Event has no callback: a thread blocks on it (no CPU, no timed polls).
            threading.Thread(target=self._watch, args=(stop,), name="segq-worker-stop", daemon=True).start()
        elif threading.current_thread() is threading.main_thread():
            for signum in _STOP_SIGNALS:
                self._previous[signum] = signal.signal(signum, self._on_signal)

    @property
    def stopped(self) -> bool:
        # The event itself too: its watcher thread may not have run yet.
        return self._stopped or (self._event is not None and self._event.is_set())

    def _watch(self, stop: threading.Event) -> None:
        stop.wait()
        self.stop()

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self._restore_signals()  # a second signal acts as it did before us
        self.signal = signum
        self._stopped = True
        self.poke()

    def _restore_signals(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def stop(self) -> None:
        self._stopped = True
        self.poke()

    def poke(self) -> None:
        """Wake the claiming loop (safe from a signal handler and any thread)."""
        if self._closed:
            return
        try:
            os.write(self._write_fd, b"\x01")
        except (BlockingIOError, OSError):
            pass  # full: it is awake anyway

    def drain(self) -> None:
        try:
            while os.read(self.read_fd, 4096):
                pass
        except (BlockingIOError, OSError):
            pass

    def sleep(self, timeout: float | None) -> None:
        """Block until the pipe is written or ``timeout`` seconds pass."""
        poller = select.poll()
        poller.register(self.read_fd, select.POLLIN)
        poller.poll(None if timeout is None else max(0.0, timeout) * 1000.0)
        self.drain()

    def close(self) -> None:
        if threading.current_thread() is threading.main_thread():
            self._restore_signals()
        with self._lock:
            self._closed = True
            os.close(self._write_fd)
            os.close(self.read_fd)


class _ThreadPool:
    """``concurrency`` handler threads fed through a queue; counts the idle ones."""

    def __init__(self, handler: Handler, concurrency: int, pipe: _StopPipe) -> None:
        self._handler = handler
        self._pipe = pipe
        self._lock = threading.Lock()
        self._idle = concurrency
        self._size = concurrency
        self._want_idle = False  # the loop sleeps until a thread frees up
        self.poke_always = False  # wake the loop after every job, not only when it waits for a thread
        self._running: set[Job] = set()
        self._inbox: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self._threads = [
            threading.Thread(target=self._serve, name=f"segq-worker-{number}", daemon=True)
            for number in range(concurrency)
        ]
        for thread in self._threads:
            thread.start()

    def idle(self) -> int:
        """Return how many threads are idle; 0 means the loop should ``wait_idle``."""
        with self._lock:
            if not self._idle:
                self._want_idle = True
            return self._idle

    def submit(self, jobs: list[Job]) -> None:
        with self._lock:
            self._idle -= len(jobs)
            self._running.update(jobs)
        for job in jobs:
            self._inbox.put(job)

    def _serve(self) -> None:
        while True:
            job = self._inbox.get()
            if job is None:
                return
            try:
                _run_job(self._handler, job)
            except BaseException:  # noqa: BLE001 - a thread has nowhere to raise to; logged
                log.exception("handler thread stopped by an exception")
            finally:
                with self._lock:
                    self._idle += 1
                    self._running.discard(job)
                    poke = self._want_idle or self.poke_always
                    self._want_idle = False
                if poke:
                    self._pipe.poke()

    def finish(self) -> None:
        """Wait for the running jobs until the latest of their lease ends; abandon any still running then."""
        while True:
            with self._lock:
                if self._idle == self._size:
                    break
                self._want_idle = True
                lease_end = max(job.lease_expires_at for job in self._running) if self._running else time.time()
            remaining = lease_end - time.time()
            if remaining <= 0:
                log.warning("%d handler(s) still running past their lease; abandoning them", self._size - self._idle)
                break
            self._pipe.sleep(remaining)
        for _ in self._threads:
            self._inbox.put(None)


def run_worker(
    path: StrPath,
    handler: Handler,
    *,
    group: str = "default",
    concurrency: int = 1,
    lease: float = 30.0,
    max_attempts: int = 5,
    stop: threading.Event | None = None,
    dead_letter: StrPath | None = None,
    sync: SyncPolicy = "never",
    create: bool = False,
) -> None:
    """Run ``handler`` on each job of ``group`` in the queue at ``path`` until stopped.

    ``handler(job)`` returns None (the job is acked) or a list of
    ``segq.Enqueue`` follow-ups (acked with them, atomically); an exception
    nacks the job with the exception as its reason (after ``max_attempts``
    the job goes to the dead-letter queue).  Up to ``concurrency`` jobs run
    at once, on threads; claims are batched to the free threads.  A
    settlement that fails (``ClaimLost`` included) is logged and the loop
    goes on.

    ``stop``: a ``threading.Event``; when it is set the worker stops
    claiming, lets the running jobs finish within their lease, gives back
    the rest and returns.  Without one, called from the main thread, SIGTERM
    and SIGINT do the same (a second signal acts as usual).  Threads suit
    handlers that wait (I/O, subprocesses); for CPU-bound handlers run one
    worker per core, each in its own process (see docs/workqueue.md).
    ``dead_letter``, ``sync`` and ``create`` are passed to the ``WorkQueue``.

    >>> import segq, tempfile, threading
    >>> path = tempfile.mkdtemp()
    >>> with segq.Sender(path, segment_size=1 << 16) as tx:
    ...     tx.send(b"resize photo-1.jpg")
    >>> done = threading.Event()
    >>> def resize(job):
    ...     print(job.data)
    ...     done.set()
    >>> segq.run_worker(path, resize, lease=60, stop=done)
    b'resize photo-1.jpg'
    """
    serve(
        path,
        handler,
        group=group,
        concurrency=concurrency,
        lease=lease,
        max_attempts=max_attempts,
        stop=stop,
        dead_letter=dead_letter,
        sync=sync,
        create=create,
    )


def serve(
    path: StrPath,
    handler: Handler,
    *,
    group: str,
    concurrency: int,
    lease: float,
    max_attempts: int,
    stop: threading.Event | None,
    dead_letter: StrPath | None,
    sync: SyncPolicy,
    drain: bool = False,
    create: bool = False,
) -> int | None:
    """Do what ``run_worker`` does; return the signal that stopped it (None for ``stop``).

    ``drain``: also stop once nothing is claimable and no job is running
    (``segq work --drain``).
    """
    concurrency = _check_worker(handler, concurrency)
    pipe = _StopPipe(stop)
    try:
        with WorkQueue(
            path, group, lease=lease, max_attempts=max_attempts, dead_letter=dead_letter, sync=sync, create=create
        ) as work_queue:
            if concurrency == 1:
                _serve_inline(work_queue, handler, pipe, drain)
            else:
                _serve_threads(work_queue, handler, concurrency, pipe, drain)
    finally:
        pipe.close()
    return pipe.signal


def _claim(
    work_queue: WorkQueue, count: int, pipe: _StopPipe, drained: Callable[[], bool] | None = None
) -> list[Job]:
    """Claim 1..count jobs in one transaction, sleeping until there are some; [] once stopped.

    ``drained``: called when nothing is claimable; True stops the worker.
    """
    while not pipe.stopped:
        try:
            return work_queue.claim_batch(count, timeout=0).jobs
        except Empty:
            pass
        if drained is not None and drained():
            pipe.stop()
            break
        work_queue._wait(None, also=(pipe.read_fd,))
        pipe.drain()
    work_queue._pass_wake_on()  # this worker may have been the one a job woke
    return []


def _serve_inline(work_queue: WorkQueue, handler: Handler, pipe: _StopPipe, drain: bool) -> None:
    drained = (lambda: True) if drain else None
    while not pipe.stopped:
        for job in _claim(work_queue, 1, pipe, drained):
            _run_job(handler, job)


def _serve_threads(
    work_queue: WorkQueue, handler: Handler, concurrency: int, pipe: _StopPipe, drain: bool
) -> None:
    pool = _ThreadPool(handler, concurrency, pipe)
    pool.poke_always = drain  # a finished job may be the last: the loop must look again
    drained = (lambda: pool.idle() == concurrency) if drain else None
    try:
        while not pipe.stopped:
            idle = pool.idle()
            if not idle:
                pipe.sleep(None)
                continue
            pool.submit(_claim(work_queue, idle, pipe, drained))
    finally:
        pool.finish()


# -- asyncio ---------------------------------------------------------------


async def _settle_async(job: AsyncJob, result: object, error: BaseException | None) -> None:
    """Do what :func:`_settle` does, awaiting the ack or nack."""
    settlement = _settlement(job, result, error)
    while settlement is not None:
        try:
            await settlement.apply_async(job)
            return
        except SegqError as failure:
            settlement = settlement.after_failure(job, failure)


async def _run_async_job(handler: AsyncHandler, job: AsyncJob) -> None:
    try:
        result = await handler(job)
    except Exception as error:  # noqa: BLE001 - any handler failure nacks the job
        await _settle_async(job, None, error)
    except asyncio.CancelledError as error:
        await _settle_async(job, None, error)
        raise
    else:
        await _settle_async(job, result, None)


async def arun_worker(
    path: StrPath,
    handler: AsyncHandler,
    *,
    group: str = "default",
    concurrency: int = 1,
    lease: float = 30.0,
    max_attempts: int = 5,
    stop: asyncio.Event | None = None,
    dead_letter: StrPath | None = None,
    sync: SyncPolicy = "never",
    create: bool = False,
) -> None:
    """Run the coroutine ``handler`` on each job of ``group`` until stopped: ``run_worker`` on asyncio.

    Up to ``concurrency`` jobs run at once, as tasks; claims are batched to
    the free slots and waited for on the event loop.  ``stop`` is an
    ``asyncio.Event``; without one, in the main thread, SIGTERM and SIGINT
    stop the worker.  Handlers still running when their lease ends after a
    stop are cancelled (their claim is lost anyway).
    """
    concurrency = _check_worker(handler, concurrency)
    loop = asyncio.get_running_loop()
    stopping = stop if stop is not None else asyncio.Event()
    installed: list[int] = []
    if stop is None and threading.current_thread() is threading.main_thread():
        for signum in _STOP_SIGNALS:
            try:
                loop.add_signal_handler(signum, _stop_once, loop, stopping, installed)
            except (NotImplementedError, RuntimeError):
                break
            installed.append(signum)
    running: dict[asyncio.Task[None], AsyncJob] = {}
    stopped = asyncio.ensure_future(stopping.wait())
    try:
        async with AsyncWorkQueue(
            path, group, lease=lease, max_attempts=max_attempts, dead_letter=dead_letter, sync=sync, create=create
        ) as work_queue:
            while not stopping.is_set():
                idle = concurrency - len(running)
                if not idle:
                    await asyncio.wait({*running, stopped}, return_when=asyncio.FIRST_COMPLETED)
                    continue
                claiming = asyncio.ensure_future(work_queue.claim_batch(idle))
                await asyncio.wait({claiming, stopped}, return_when=asyncio.FIRST_COMPLETED)
                if not claiming.done():
                    claiming.cancel()  # a cancelled waiting claim leaves nothing claimed
                try:
                    batch = await claiming
                except asyncio.CancelledError:
                    if not stopping.is_set():
                        raise
                    break
                if stopping.is_set():
                    break  # claimed as the stop came: close() gives them back
                for job in batch:
                    task = asyncio.ensure_future(_run_async_job(handler, job))
                    running[task] = job
                    task.add_done_callback(running.pop)
            await _finish_async(running)
    finally:
        stopped.cancel()
        for installed_signal in installed:
            loop.remove_signal_handler(installed_signal)


def _stop_once(loop: asyncio.AbstractEventLoop, stopping: asyncio.Event, installed: list[int]) -> None:
    for signum in installed:
        loop.remove_signal_handler(signum)  # a second signal acts as usual
    installed.clear()
    stopping.set()


async def _finish_async(running: dict[asyncio.Task[None], AsyncJob]) -> None:
    """Let the running handlers finish until the latest of their lease ends; cancel the rest."""
    if not running:
        return
    lease_end = max(job.lease_expires_at for job in running.values())
    _, late = await asyncio.wait(set(running), timeout=max(0.0, lease_end - time.time()))
    if late:
        log.warning("%d handler(s) still running past their lease; cancelling them", len(late))
        for task in late:
            task.cancel()
        await asyncio.wait(late)
