"""Waiting for an ``flock`` held by another process: bounded, interruptible, naming the holder.

Theory of operation
-------------------
A blocking ``flock`` waits as long as the holder likes: a hung or stopped
process holding ``segq.ctl`` exclusively (a rebuild, a ``segq recover``)
would hang every opener with no word of why.  :func:`wait_flock` tries the
lock without blocking, which is all an uncontended lock costs, and only then
polls with growing sleeps up to a deadline (``SEGQ_LOCK_TIMEOUT`` seconds,
60 by default).  Sleeping in Python lets signal handlers run, so SIGINT
and SIGTERM end the wait.  At the deadline it raises :class:`Locked` naming
the holder's PID, read from ``/proc/locks`` (Linux; elsewhere the PID is
unknown).

The loop itself is :func:`wait_lock`, shared with the locks that are not
``flock`` locks (the work-queue group's robust mutex): it offers each attempt
a growing wait, which an ``flock`` spends sleeping before it tries again,
while a mutex blocks in timed locks of a fixed 50 ms instead (its release
ends one at once, and a shorter one costs a timer).
"""

from __future__ import annotations

import fcntl
import os
import time
from typing import Callable

from .errors import InvalidArgument, Locked

__all__ = ["wait_flock", "wait_lock", "flock_holders", "other_flock_holder", "lock_timeout"]

_DEFAULT_TIMEOUT = 60.0


def lock_timeout() -> float:
    """Return how long to wait for another process's lock: ``SEGQ_LOCK_TIMEOUT`` seconds, else 60."""
    text = os.environ.get("SEGQ_LOCK_TIMEOUT")
    if not text:
        return _DEFAULT_TIMEOUT
    try:
        seconds = float(text)
    except ValueError:
        seconds = float("nan")
    if not 0 <= seconds < 1e9:
        raise InvalidArgument(f"SEGQ_LOCK_TIMEOUT={text!r}: give a number of seconds >= 0", name="SEGQ_LOCK_TIMEOUT")
    return seconds


def flock_holders(fd: int) -> list[int]:
    """Return the PIDs holding an ``flock`` on the file open at ``fd`` (empty where unknown)."""
    info = os.fstat(fd)
    device = f"{os.major(info.st_dev):02x}:{os.minor(info.st_dev):02x}:{info.st_ino}"
    holders = []
    try:
        with open("/proc/locks", encoding="ascii", errors="replace") as table:
            for line in table:
                fields = line.split()
                # "1: FLOCK ADVISORY WRITE <pid> <maj:min:inode> 0 EOF"; waiters have "->" after the number.
                if len(fields) >= 6 and fields[1] == "FLOCK" and fields[5] == device:
                    holders.append(int(fields[4]))
    except (OSError, ValueError):
        return []
    return holders


def wait_lock(
    take: Callable[[float], bool],
    path: str,
    *,
    what: str,
    holder: Callable[[], int | None],
    timeout: float | None = None,
    first_delay: float = 0.0005,
    max_delay: float = 0.05,
) -> None:
    """Call ``take(seconds)`` until it reports the lock taken, for at most ``timeout`` seconds.

    ``take`` tries the lock once, spending about ``seconds`` on it
    (``first_delay`` at first, doubling up to ``max_delay``), and returns
    whether it got it; the caller has already tried without waiting.
    At the deadline (default :func:`lock_timeout`) raises :class:`Locked`
    naming ``holder()``'s PID, or when that returns None, how to find it.
    """
    limit = lock_timeout() if timeout is None else timeout
    deadline = time.monotonic() + limit
    delay = first_delay
    while not take(delay):
        if time.monotonic() >= deadline:
            pid = holder()
            who = f"another process (one of those `fuser -v {path}` lists)" if pid is None else f"PID {pid}"
            raise Locked(
                f"{path} ({what}) stayed locked by {who} for {limit:g} s; if that process hangs, stop it "
                "(SEGQ_LOCK_TIMEOUT sets how long to wait)",
                path=path,
                pid=pid,
            )
        delay = min(delay * 2, max_delay)


def wait_flock(fd: int, path: str, *, shared: bool = False, what: str = "lock", timeout: float | None = None) -> None:
    """Take an ``flock`` on ``fd``, waiting at most ``timeout`` seconds (default :func:`lock_timeout`).

    Raises :class:`Locked` naming the holder's PID when it runs out.
    """
    operation = (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB
    try:
        fcntl.flock(fd, operation)
        return
    except BlockingIOError:
        pass

    def take(seconds: float) -> bool:
        time.sleep(seconds)
        try:
            fcntl.flock(fd, operation)
            return True
        except BlockingIOError:
            return False

    wait_lock(take, path, what=what, holder=lambda: other_flock_holder(fd), timeout=timeout)


def other_flock_holder(fd: int) -> int | None:
    """Return the PID of another process holding an ``flock`` on the file open at ``fd`` (None if unknown)."""
    others = [pid for pid in flock_holders(fd) if pid != os.getpid()]
    return others[0] if others else None
