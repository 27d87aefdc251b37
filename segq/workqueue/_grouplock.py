"""The group lock: one short critical section at a time per work-queue group, across processes.

Theory of operation
-------------------
Every transaction on a group (claim, ack, nack, renew, compaction, recovery)
holds this lock.  It must exclude threads and processes, cost next to nothing
when free (a claim+ack takes it twice), and never stay held by a dead process.

On Linux it is a process-shared, *robust* pthread mutex living in a 4 KiB
memory-mapped file, ``groups/<group>/mutex``, called from the C speedups
(``mutex_lock``/``mutex_unlock``: ~80 ns a lock+unlock pair) or, without
them, through ctypes (~430 ns, mostly argument conversion).  Taking a free
mutex is an atomic instruction in user space: no system call (measured in
the claim+ack loop: 5.9 us per claim+ack, against 8.3 us with an ``flock``
pair per transaction, whose system calls cost far more in a busy loop than in
a micro-benchmark).  When a holder dies, the kernel marks the mutex and the
next locker gets ``EOWNERDEAD``: it declares the mutex consistent and goes on,
because the state the lock protects is a journal whose uncommitted tail is
ignored (``_journal``).  The mutex is also error-checking: a thread that
relocks it gets an error, not a deadlock.

A *live* holder that stops (SIGSTOP, a debugger, a handler stuck in the
transaction) is not a dead one: nobody gets ``EOWNERDEAD``.  So a busy
mutex is waited for with timed locks, in slices of 50 ms (a release
wakes the waiter at once; shorter slices arm a timer for nearly every
contended wait, which cost four workers 18 % of their claim+acks at 0.5 ms):
the first inside ``mutex_lock``, the next ones from
:meth:`GroupLock.recover`, up to ``SEGQ_LOCK_TIMEOUT`` seconds
(``segq._flock.wait_lock``, the loop every lock wait shares), which then
raises :class:`~segq.errors.Locked` naming the holder:
the futex word of a robust mutex holds its owner's thread id (the kernel's
robust-futex ABI; glibc keeps it in the mutex's first word), and
``/proc/<tid>/status`` names its process.  A free mutex still costs one
``trylock``.

Taking no mutex at all while one process has the group open (an
"exclusive" grant revoked by a second opener) was measured before being
built: with every lock and unlock call replaced by a no-op, a claim+ack
took 5.55 us against 5.68 us with the C calls (2 %, before the cost of the
per-transaction check such a grant needs), so the grant, and the revocation
protocol it would need to be safe against SIGKILL, are not worth having.

The file starts with a header (magic, version, a tag naming the C library
and machine that laid the mutex out) and holds the mutex at offset 64.  It
is initialised once, by the first process to find no header, under an
``flock`` on ``groups/<group>/lock``; the header is written after the mutex,
so a half-initialised file is initialised again.

Where robust mutexes are missing (macOS), the lock is an ``flock`` on
``groups/<group>/lock`` plus a thread lock (an ``flock`` is held per open
file, so it does not exclude the threads sharing one), waited for by
``segq._flock.wait_flock`` with the same bound.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import logging
import mmap
import os
import platform
import struct
import threading
import time
from typing import Any, Callable

from .._flock import wait_flock, wait_lock
from .._fs import open_file
from .._segment import StrPath, os_error
from .._state import check_name
from ..errors import SegqError, UnsupportedFormat

__all__ = ["GROUPS_DIR", "group_dir", "GroupLock", "robust_mutexes_available"]

log = logging.getLogger(__name__)

GROUPS_DIR = "groups"


def group_dir(path: StrPath, group: str) -> str:
    """Return the directory holding ``group``'s journal and locks: ``<path>/groups/<group>``."""
    return os.path.join(path, GROUPS_DIR, check_name(group, "group name"))

_MUTEX_FILE = "mutex"
_FLOCK_FILE = "lock"
_FILE_SIZE = 4096
_MAGIC = b"segq\x00mtx"
_VERSION = 1
_HEADER = struct.Struct("<8sI4x32s")  # magic, version, layout tag
_MUTEX_OFFSET = 64
_PTHREAD_PROCESS_SHARED = 1
_PTHREAD_MUTEX_ROBUST = 1
_PTHREAD_MUTEX_ERRORCHECK = 2
_FUTEX_WORD = struct.Struct("=I")  # glibc's __lock: the owner's thread id while locked
_FUTEX_TID_MASK = 0x3FFFFFFF  # the bits above flag waiters and a dead owner
_STILL_BUSY = (errno.EBUSY, errno.ETIMEDOUT)  # trylock's and a timed wait's "held by someone else"
_SLICE = 0.05  # seconds of one timed wait for the mutex (FIRST_WAIT in _speedups.c)


class _Deadline(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]

_libc: Any = None


def _load_libc() -> Any:
    """Return libc with the robust-mutex functions typed, or None where they are missing."""
    global _libc
    if _libc is None:
        _libc = False
        if platform.system() == "Linux":
            try:
                libc = ctypes.CDLL(None, use_errno=True)
                for name in ("pthread_mutex_trylock", "pthread_mutex_unlock", "pthread_mutex_consistent"):
                    function = getattr(libc, name)
                    function.argtypes = [ctypes.c_void_p]
                    function.restype = ctypes.c_int
                libc.pthread_mutex_timedlock.argtypes = [ctypes.c_void_p, ctypes.POINTER(_Deadline)]
                libc.pthread_mutex_timedlock.restype = ctypes.c_int
                if hasattr(libc, "pthread_mutex_clocklock"):  # glibc 2.30: a wait the wall clock cannot stretch
                    libc.pthread_mutex_clocklock.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.POINTER(_Deadline)]
                    libc.pthread_mutex_clocklock.restype = ctypes.c_int
                libc.pthread_mutexattr_setrobust  # noqa: B018 - probe
                _libc = libc
            except (OSError, AttributeError):
                pass
    return _libc or None


def _speedups() -> Any:
    """Return the C extension if it is built and allowed (it calls the pthread functions without ctypes)."""
    if os.environ.get("SEGQ_PURE_PYTHON"):
        return None
    try:
        from .. import _speedups as speedups
    except ImportError:
        return None
    # A build without mutex_timedlock is older and waits for a busy mutex without a bound.
    return speedups if hasattr(speedups, "mutex_timedlock") else None


def robust_mutexes_available() -> bool:
    """Tell whether this platform gives the group lock as a robust mutex (else flock)."""
    return _load_libc() is not None


def _layout_tag() -> bytes:
    libc_name = platform.libc_ver()[0] or "other"
    return f"{libc_name}/{platform.machine()}/{ctypes.sizeof(ctypes.c_void_p)}".encode()[:32].ljust(32, b"\0")


class GroupLock:
    """The lock of one group directory, held by ``acquire()`` until ``release()``.

    ``acquire`` and ``release`` are also exposed raw, for the hot path, as
    ``lock_function(lock_argument)`` (returns non-zero when the lock needs
    :meth:`recover`: it is busy, or its holder died) and
    ``unlock_function(lock_argument)``.
    """

    def __init__(self, group_dir: str) -> None:
        self.group_dir = group_dir
        self._flock_fd = -1
        self._mutex_fd = -1
        self._map: mmap.mmap | None = None
        self._window: Any = None
        self._view: memoryview | None = None
        self._thread_lock = threading.Lock()
        try:
            self._flock_fd = open_file(os.path.join(group_dir, _FLOCK_FILE), os.O_RDWR, private=True)
        except OSError as error:
            raise os_error(error, "open group lock in", group_dir) from None
        libc = _load_libc()
        if libc is None:
            self.robust = False
            self.lock_function: Callable[[Any], int | None] = self._flock_acquire
            self.unlock_function: Callable[[Any], int | None] = self._flock_release
            self.lock_argument: Any = None
            return
        self.robust = True
        try:
            self._open_mutex(libc)
        except BaseException:
            self.close()
            raise
        self._libc = libc
        self.lock_function = libc.pthread_mutex_trylock
        self.unlock_function = libc.pthread_mutex_unlock
        self._timed_lock: Callable[[Any, float], int] = self._ctypes_timed_lock
        self._consistent = libc.pthread_mutex_consistent
        speedups = _speedups()
        if speedups is not None:
            # The same pthread calls from C: a lock+unlock pair costs ~60 ns
            # instead of ~430 ns through ctypes (two pairs per claim+ack).
            # The argument is a view of the mutex's bytes, released by close().
            assert self._map is not None
            self._view = memoryview(self._map)[_MUTEX_OFFSET:]
            self.lock_argument = self._view
            self.lock_function = speedups.mutex_lock
            self.unlock_function = speedups.mutex_unlock
            self._timed_lock = speedups.mutex_timedlock

    def _open_mutex(self, libc: Any) -> None:
        path = os.path.join(self.group_dir, _MUTEX_FILE)
        try:
            self._mutex_fd = open_file(path, os.O_RDWR, private=True)
            if os.fstat(self._mutex_fd).st_size < _FILE_SIZE:
                os.ftruncate(self._mutex_fd, _FILE_SIZE)
        except OSError as error:
            raise os_error(error, "open group mutex", path) from None
        self._map = mmap.mmap(self._mutex_fd, _FILE_SIZE)
        self._window = (ctypes.c_char * _FILE_SIZE).from_buffer(self._map)
        self._mutex_pointer = ctypes.c_void_p(ctypes.addressof(self._window) + _MUTEX_OFFSET)
        self.lock_argument = self._mutex_pointer
        tag = _layout_tag()
        wait_flock(self._flock_fd, os.path.join(self.group_dir, _FLOCK_FILE), what="group mutex set-up")
        try:
            magic, version, found_tag = _HEADER.unpack_from(self._map, 0)
            if magic == _MAGIC:
                if version != _VERSION:
                    raise UnsupportedFormat(f"{path}: group mutex version {version}, this segq reads {_VERSION}")
                if found_tag != tag:
                    raise UnsupportedFormat(
                        f"{path}: the group mutex was laid out by {found_tag.rstrip(bytes(1)).decode(errors='replace')}, "
                        f"this process is {tag.rstrip(bytes(1)).decode()}; all workers of a group must share one C library"
                    )
                return
            attributes = ctypes.create_string_buffer(64)
            checks = (
                libc.pthread_mutexattr_init(attributes),
                libc.pthread_mutexattr_setpshared(attributes, _PTHREAD_PROCESS_SHARED),
                libc.pthread_mutexattr_setrobust(attributes, _PTHREAD_MUTEX_ROBUST),
                libc.pthread_mutexattr_settype(attributes, _PTHREAD_MUTEX_ERRORCHECK),
                libc.pthread_mutex_init(self._mutex_pointer, attributes),
            )
            libc.pthread_mutexattr_destroy(attributes)
            if any(checks):
                raise SegqError(f"cannot initialise the group mutex {path}: {os.strerror(max(checks))}")
            _HEADER.pack_into(self._map, 0, _MAGIC, _VERSION, tag)
        finally:
            fcntl.flock(self._flock_fd, fcntl.LOCK_UN)

    # -- flock fallback --------------------------------------------------

    def _flock_acquire(self, _: Any) -> int:
        self._thread_lock.acquire()
        try:
            wait_flock(self._flock_fd, os.path.join(self.group_dir, _FLOCK_FILE), what="group lock")
        except BaseException:
            self._thread_lock.release()
            raise
        return 0

    def _flock_release(self, _: Any) -> int:
        fcntl.flock(self._flock_fd, fcntl.LOCK_UN)
        self._thread_lock.release()
        return 0

    # -- the lock --------------------------------------------------------

    def acquire(self) -> None:
        """Take the lock, waiting for it; recover it if its holder died."""
        result = self.lock_function(self.lock_argument)
        if result:
            self.recover(result)

    def recover(self, result: int) -> None:
        """Handle a non-zero result of ``lock_function``: wait while busy, keep it if its holder died, else raise.

        Raises :class:`~segq.errors.Locked` when a live holder keeps it
        ``SEGQ_LOCK_TIMEOUT`` seconds.
        """
        if result in _STILL_BUSY:
            result = self._wait()
            if not result:
                return
        if result == errno.EOWNERDEAD:
            self._consistent(self._mutex_pointer)
            log.warning("%s: the holder of the group lock died; taking it over", self.group_dir)
            return
        if result == errno.EDEADLK:
            raise SegqError(f"{self.group_dir}: this thread already holds the group lock (a segq bug)")
        raise SegqError(
            f"{self.group_dir}: cannot take the group lock: {os.strerror(result)}; "
            "close every worker of the group and delete its 'mutex' file"
        )

    # -- waiting for a busy mutex ----------------------------------------

    def _wait(self) -> int:
        """Wait for the busy mutex in timed slices; return the locking result (0, ``EOWNERDEAD``, ...)."""
        results: list[int] = []

        def take(_: float) -> bool:
            # Not the growing waits wait_lock offers, which suit polling: a
            # timed lock returns at the release, and a short one costs a timer.
            result = self._timed_lock(self.lock_argument, _SLICE)
            if result == errno.ETIMEDOUT:
                return False
            results.append(result)
            return True

        wait_lock(take, os.path.join(self.group_dir, _MUTEX_FILE), what="group lock", holder=self._holder)
        return results[0]

    def _ctypes_timed_lock(self, pointer: Any, seconds: float) -> int:
        # What speedups.mutex_timedlock does in C: the deadline is absolute, on
        # CLOCK_MONOTONIC where pthread_mutex_clocklock exists, else on the wall clock.
        libc = self._libc
        monotonic = hasattr(libc, "pthread_mutex_clocklock")
        at = (time.clock_gettime(time.CLOCK_MONOTONIC) if monotonic else time.time()) + seconds
        deadline = ctypes.byref(_Deadline(int(at), int(at % 1 * 1e9)))
        if monotonic:
            return int(libc.pthread_mutex_clocklock(pointer, time.CLOCK_MONOTONIC, deadline))
        return int(libc.pthread_mutex_timedlock(pointer, deadline))

    def _holder(self) -> int | None:
        """Return the PID of the process holding the mutex, where glibc's layout tells its thread id.

        The thread id is checked against the process it names having this
        mutex file mapped, so a thread id of another PID namespace (or one
        reused since) does not name a stranger.
        """
        if self._map is None or not _layout_tag().startswith(b"glibc/"):
            return None
        thread_id = _FUTEX_WORD.unpack_from(self._map, _MUTEX_OFFSET)[0] & _FUTEX_TID_MASK
        if not thread_id:
            return None
        info = os.fstat(self._mutex_fd)
        # A line of /proc/<pid>/maps names the file by device and inode, and
        # by path (an overlay file system shows the layer's device there).
        device_inode = f" {os.major(info.st_dev):02x}:{os.minor(info.st_dev):02x} {info.st_ino} "
        path = " " + os.path.realpath(os.path.join(self.group_dir, _MUTEX_FILE))
        try:
            with open(f"/proc/{thread_id}/status", encoding="ascii", errors="replace") as status:
                pid = next(int(line.split()[1]) for line in status if line.startswith("Tgid:"))
            with open(f"/proc/{pid}/maps", encoding="utf-8", errors="replace") as maps:
                if any(device_inode in line or line.rstrip("\n").endswith(path) for line in maps):
                    return pid
        except (OSError, ValueError, IndexError, StopIteration):
            pass
        return None

    def release(self) -> None:
        """Drop the lock."""
        self.unlock_function(self.lock_argument)

    def __enter__(self) -> "GroupLock":
        self.acquire()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()

    def close(self) -> None:
        """Close the files; the lock must not be held.  Idempotent."""
        self._window = None
        self.lock_argument = None
        if self._view is not None:
            self._view.release()
            self._view = None
        if self._map is not None:
            self._map.close()
            self._map = None
        for name in ("_mutex_fd", "_flock_fd"):
            fd = getattr(self, name)
            if fd >= 0:
                os.close(fd)
                setattr(self, name, -1)
