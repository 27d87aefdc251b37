"""Lock files: an OS lock held for life, plus the owner's PID and start time inside.

Theory of operation
-------------------
The OS lock (``flock`` through portalocker) is what excludes: the kernel drops
it when its process dies, so a dead owner never blocks anyone.  The file's
text, ``"<pid> <start time>\\n"``, is what *tells*: which process holds the
lock (for error messages, ``segq info``) and whether that process is still
the same one (a PID reused by a newer process has a different start time).
A lock file is removed by its owner on release; a file left by a dead owner is
taken over by the next opener or removed by ``segq.recovery.unlock``.

Removing a lock file races with a process that opened it just before: after
taking the OS lock we check that the path still names the file we locked,
and start again if it does not.
"""

from __future__ import annotations

import errno
import logging
import os
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING

from ._fs import open_file, open_to_read
from ._segment import StrPath, os_error
from .errors import Locked, SegqError

if TYPE_CHECKING:
    import portalocker

__all__ = ["LockOwner", "read_owner", "process_is_alive", "process_start_time", "LockFile", "unlock"]

# portalocker and psutil are imported where used, not here: `import segq`
# stays cheap (issue 14), and an import already done costs a dict lookup.


def _exclusive() -> portalocker.LockFlags:
    import portalocker

    return portalocker.LockFlags.EXCLUSIVE | portalocker.LockFlags.NON_BLOCKING


def process_start_time(pid: int) -> float | None:
    """Return when process ``pid`` started (seconds since the epoch); None if unknown (no such process, no access)."""
    import psutil

    try:
        return float(psutil.Process(pid).create_time())
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess, ValueError):
        return None


def process_is_alive(pid: int, start_time: float | None) -> bool:
    """Tell whether ``pid`` runs and is the process that started at ``start_time``.

    A zombie counts as dead.  With ``start_time`` None only the PID is checked.
    """
    if pid <= 0:
        return False
    import psutil

    try:
        process = psutil.Process(pid)
        if process.status() == psutil.STATUS_ZOMBIE:
            return False
        if start_time is None:
            return True
        return bool(abs(process.create_time() - start_time) < 0.01)
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return False
    except psutil.AccessDenied:
        return True


_MY_START_TIME: dict[int, float | None] = {}


def _my_identity() -> str:
    pid = os.getpid()
    if pid not in _MY_START_TIME:
        _MY_START_TIME[pid] = process_start_time(pid)
    return f"{pid} {_MY_START_TIME[pid]!r}\n"


@dataclass(frozen=True)
class LockOwner:
    """Who a lock file says holds it, and whether that process lives."""

    path: str
    pid: int | None
    start_time: float | None
    alive: bool

    def describe(self) -> str:
        if self.pid is None:
            return "an unknown process"
        return f"PID {self.pid}" + ("" if self.alive else " (dead)")


def _parse_owner(text: str) -> tuple[int | None, float | None]:
    parts = text.split()
    try:
        pid = int(parts[0])
        start_time = float(parts[1]) if len(parts) > 1 and parts[1] != "None" else None
    except (IndexError, ValueError):
        return None, None
    return pid, start_time


def _open_for_reading(path: str) -> IO[bytes]:
    """Open a lock file to read or probe it, never through a link."""
    return os.fdopen(open_to_read(path), "rb")


def _os_lock_is_free(path: str) -> bool | None:
    """Probe the OS lock; None if the file vanished."""
    import portalocker

    try:
        with _open_for_reading(path) as handle:
            try:
                portalocker.lock(handle, _exclusive())
            except portalocker.LockException:
                return False
            portalocker.unlock(handle)
            return True
    except FileNotFoundError:
        return None


def read_owner(path: StrPath) -> LockOwner | None:
    """Return who holds the lock file at ``path``, or None if there is none.

    ``alive`` is true when the OS lock is held (the holder may be this very
    process) or when the recorded process still runs with its recorded start
    time.
    """
    path = os.fspath(path)
    try:
        with _open_for_reading(path) as handle:
            text = handle.read(200).decode("ascii", "replace")
    except FileNotFoundError:
        return None
    except PermissionError:
        # Lock files are private to those who may write the queue (so a
        # reader cannot lock them): a reader cannot tell who holds one.
        return LockOwner(path, None, None, True)
    except OSError as error:
        raise os_error(error, "read lock file", path) from None
    pid, start_time = _parse_owner(text)
    free = _os_lock_is_free(path)
    if free is None:
        return None
    alive = not free or (pid is not None and process_is_alive(pid, start_time) and start_time is not None)
    return LockOwner(path, pid, start_time, alive)


class LockFile:
    """An exclusive lock file held for the life of an object (a Receiver, a Sender, ...)."""

    def __init__(self, path: StrPath, *, what: str) -> None:
        self.path = os.fspath(path)
        self.what = what
        self._handle: IO[bytes] | None = None

    def acquire(self) -> None:
        """Take the lock or raise :class:`Locked` naming the live holder's PID."""
        import portalocker

        while True:
            try:
                handle = os.fdopen(open_file(self.path, os.O_RDWR, private=True), "r+b", buffering=0)
            except FileNotFoundError:
                raise SegqError(f"cannot create lock file {self.path}: its directory is missing") from None
            except OSError as error:
                raise os_error(error, "create lock file", self.path) from None
            try:
                portalocker.lock(handle, _exclusive())
            except portalocker.LockException:
                handle.close()
                owner = read_owner(self.path)
                if owner is None:
                    continue  # released and removed meanwhile: try again
                raise Locked(
                    f"{self.what} is locked by {owner.describe()} ({self.path}); "
                    "only one may be open at a time",
                    path=self.path,
                    pid=owner.pid,
                ) from None
            try:
                same_file = os.stat(self.path).st_ino == os.fstat(handle.fileno()).st_ino
            except FileNotFoundError:
                same_file = False
            if not same_file:
                handle.close()
                continue
            # A lock file is removed on release, so one that still names a
            # process was left by an owner that died: say whose lock this is.
            previous, _ = _parse_owner(os.pread(handle.fileno(), 200, 0).decode("ascii", "replace"))
            if previous is not None:
                logging.getLogger(__name__).warning(
                    "%s: %s was held by PID %d, which is dead; taken over", self.path, self.what, previous
                )
            try:
                # Unbuffered, so a full disk fails here and not again in close().
                # Truncated only if something is there: on ext4 a truncation to
                # zero marks the file for a data flush when it is closed
                # (auto_da_alloc), ~1 ms on every release of a fresh lock file.
                if previous is not None or os.fstat(handle.fileno()).st_size:
                    os.ftruncate(handle.fileno(), 0)
                os.write(handle.fileno(), _my_identity().encode("ascii"))
            except OSError as error:
                if error.errno not in (errno.ENOSPC, errno.EDQUOT):
                    handle.close()
                    raise os_error(error, "write lock file", self.path) from None
                # The flock is what excludes, the text only tells who: on a full
                # disk hold the lock nameless, so a consumer can still open and
                # drain the queue, which is what frees space.
                logging.getLogger(__name__).warning("%s: disk full, lock held without the owner's PID", self.path)
            self._handle = handle
            return

    def release(self) -> None:
        """Remove the lock file and drop the OS lock; safe to call twice."""
        handle, self._handle = self._handle, None
        if handle is None:
            return
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        finally:
            handle.close()

    @property
    def held(self) -> bool:
        return self._handle is not None


def unlock(lock_path: StrPath) -> bool:
    """Remove the lock file at ``lock_path`` if its owner is dead; return whether one was removed.

    No-op (False) if the file is absent.  Raises :class:`Locked` if the owner
    is alive, including when the owner is this process.  The file is removed
    while holding its OS lock, so a process taking it over at that moment is
    never robbed of it.
    """
    import portalocker

    path = os.fspath(lock_path)
    try:
        handle = _open_for_reading(path)
    except FileNotFoundError:
        return False
    except IsADirectoryError:
        raise SegqError(f"{path} is a directory, not a lock file") from None
    except OSError as error:
        raise os_error(error, "open lock file", path) from None
    with handle:
        try:
            portalocker.lock(handle, _exclusive())
        except portalocker.LockException:
            owner = read_owner(path)
            pid = owner.pid if owner is not None else None
            raise Locked(
                f"{path} is held by live {owner.describe() if owner else 'an unknown process'}; stop that process first",
                path=path,
                pid=pid,
            ) from None
        pid, start_time = _parse_owner(handle.read(200).decode("ascii", "replace"))
        if pid is not None and start_time is not None and process_is_alive(pid, start_time):
            raise Locked(f"{path} is held by live PID {pid}; stop that process first", path=path, pid=pid)
        try:
            if os.stat(path).st_ino != os.fstat(handle.fileno()).st_ino:
                return False  # replaced meanwhile by a new owner's file
            os.unlink(path)
        except FileNotFoundError:
            return False
        except OSError as error:
            raise os_error(error, "remove lock file", path) from None
    return True
