"""The control file: shared memory every process attached to a queue maps.

Theory of operation
-------------------
``segq.ctl`` is a 4 KiB file each Sender and Receiver maps (MAP_SHARED).  It
holds no data that is not also on disk elsewhere: it is a cache of the
append position (the *tail*), the name of the append semaphore, and the table
of waiting processes.  Every attached process holds a shared ``flock`` on it.
The first process to attach to an idle queue gets the lock exclusively and
*rebuilds* the file: it finds the tail by scanning the last segment, cuts a
torn tail left by a crash, clears the waiter table, and makes a fresh
semaphore.  Then it downgrades to shared.

The tail is one native 64-bit word, ``segment << 32 | offset``, written with
one aligned store after the record bytes, so a reader that loads it sees
either the old or the new value and every byte below it is written.

Appends are serialised by a named POSIX semaphore (``multiprocessing``'s
``SemLock``), which costs no system call when uncontended.  A process killed
while holding it would block everyone, so a waiter that sees no progress for a
second checks the last holder's PID (written after each acquire) and, if that
process is dead, takes the lock over and zeroes the torn bytes past the tail.
Where named semaphores are unavailable an ``flock`` serves instead.

The semaphore named in the file exists exactly while the file is *live*: it
is created by a rebuild and removed only by a process holding the file
exclusively (the last to detach, ``segq recover``, ``segq unlock``).  The
last process to detach also marks the file (``SEMAPHORE_REMOVED``) before it
lets go, because an opener may already be waiting for the lock shared: that
opener finds the mark, lets go and tries again, and whoever then gets the
lock exclusively rebuilds.  An opener that finds the named semaphore gone
without the mark (removed by recovery, or by hand) likewise starts its
attach over.  So an attach uses the semaphore the file names while every
other attached process uses it too, or fails with a ``SegqError``: never
two processes appending under different locks.
"""

from __future__ import annotations

import logging
import os
import struct
import stat
import sys
import threading
import time
from typing import IO, Any, Callable, Protocol

from . import _segment
from ._args import check_path
from ._flock import wait_flock
from ._fs import file_mode, open_file, open_to_read
from ._format import HEADER_SIZE, SEGMENT_HEADER_SIZE, RecordStatus, decode_record
from ._segment import DEFAULT_SEGMENT_SIZE, MappedSegment, StrPath, os_error
from ._state import CURSOR_DIR, Position
from .errors import Closed, CorruptionError, SegqError, UnsupportedFormat

__all__ = [
    "existing_queue",
    "CONTROL_NAME",
    "CONTROL_SIZE",
    "TAIL",
    "SYNCED",
    "OWNER",
    "DATA_WAITERS",
    "ROOM_WAITERS",
    "DATA_WAITING",
    "ROOM_WAITING",
    "CLAIM_WAITERS",
    "CLAIM_GROUPS",
    "CLAIM_GROUP",
    "TAIL_INDEX",
    "OWNER_INDEX",
    "SLOTS",
    "SLOT_COUNT",
    "SLOT",
    "WORD",
    "Control",
    "CONTROL_MAGIC",
    "read_published_tail",
    "published_tail",
    "reset_header",
    "CONSUMER_SEGMENT_SIZE",
    "require_queue",
    "SEMAPHORE",
    "SEMAPHORE_REMOVED",
    "semaphore_prefix",
    "remove_semaphores",
]

log = logging.getLogger(__name__)

CONTROL_NAME = "segq.ctl"
CONTROL_SIZE = 4096
CONTROL_VERSION = 1
CONTROL_MAGIC = b"segq\x00ctl"

# Offsets into the control map (native byte order: the file never leaves
# this machine and is rebuilt whenever no process has it open).
_HEADER = struct.Struct("@8sII")  # magic, version, reserved
TOKEN = 16  # u64: names the append semaphore
TAIL = 24  # u64: segment << 32 | offset of the next append
SYNCED = 32  # u64: tail word known to be on stable storage
OWNER = 40  # u64: PID of the last process that took the append lock
CLEAN_TAIL = 48  # u64: tail at the last clean shutdown (0 while in use)
CLEAN_CHECK = 56  # u64: CLEAN_TAIL ^ TOKEN ^ _CLEAN_SALT, so stale values are ignored
DATA_WAITERS = 64  # 64 bytes: slot i waits for data when byte i is non-zero
ROOM_WAITERS = 128  # 64 bytes: slot i waits for room (backpressure)
DATA_WAITING = 192  # u8: how many DATA_WAITERS bytes are raised (so a send reads one byte)
ROOM_WAITING = 193  # u8: likewise for ROOM_WAITERS
SEMAPHORE = 200  # u64: inode of the append semaphore in /dev/shm (1: unknown; 0: none, appends use flock)
# In the SEMAPHORE word: the last process to detach removed the semaphore,
# so nobody may attach before the file is rebuilt with a new one.
SEMAPHORE_REMOVED = 0xFFFF_FFFF_FFFF_FFFF
SLOTS = 256  # 64 slots of SLOT.size bytes: pid, generation
SLOT_COUNT = 64
SLOT = struct.Struct("@QQ")
# Work-queue claimers wait apart from receivers: a job wakes one claimer of
# each group, where a record wakes every receiver.  Their raised flags count
# in DATA_WAITING too, so a send still reads one byte to know nobody waits.
CLAIM_WAITERS = 1280  # 64 bytes: slot i waits to claim when byte i is non-zero
CLAIM_GROUPS = 1344  # 64 x u32: the group slot i waits to claim in (CRC-32 of its name)
CLAIM_GROUP = struct.Struct("@I")
WORD = struct.Struct("@Q")
TAIL_INDEX = TAIL // WORD.size  # the tail as an index into Control.words
OWNER_INDEX = OWNER // WORD.size
_CLEAN_SALT = 0x5345_4751_434C_4541

# The first segment of a queue a consumer creates (``create=True``): small,
# since a consumer never appends; a sender rolls over to its own size.
CONSUMER_SEGMENT_SIZE = 64 << 10

_STEAL_CHECK_SECONDS = 0.25
_UNFINISHED_RETRY_SECONDS = 5.0  # bounds the retries of an attach (unfinished file, removed semaphore)
_STEAL_AFTER_SECONDS = 1.0


def semaphore_prefix(queue_dir: StrPath) -> str:
    """Return the start of the names of ``queue_dir``'s append semaphores: its device and inode.

    Tying the name to the directory lets ``segq recover`` and ``segq unlock``
    find and remove a semaphore left by a killed process, and the test suite
    count what its own queues left in ``/dev/shm``.
    """
    info = os.stat(queue_dir)
    return f"/segq-{info.st_dev:x}.{info.st_ino:x}-"


def _semaphore_file(name: str) -> str | None:
    """Return where the kernel keeps named semaphore ``name`` (Linux), or None where unknown."""
    return f"/dev/shm/sem.{name[1:]}" if os.path.isdir("/dev/shm") and sys.platform == "linux" else None


def remove_semaphores(queue_dir: StrPath) -> list[str]:
    """Remove every append semaphore named for ``queue_dir``; return their names.

    Only for a caller holding ``segq.ctl`` exclusively (nobody attached):
    the next opener makes a fresh one.
    """
    prefix = semaphore_prefix(queue_dir)
    removed: list[str] = []
    try:
        names = os.listdir("/dev/shm")
    except OSError:
        return removed
    for file_name in names:
        if file_name.startswith("sem." + prefix[1:]):
            name = "/" + file_name[len("sem.") :]
            try:
                _sem_unlink(name)
            except OSError:
                continue
            removed.append(name)
    return removed


def _sem_unlink(name: str) -> None:
    from _multiprocessing import sem_unlink  # type: ignore[import-not-found]

    sem_unlink(name)


def existing_queue(path: StrPath) -> str:
    """Return ``path`` as a string if it is a segq queue; else raise ``SegqError`` saying what it is."""
    queue_dir = check_path(path)
    if not os.path.exists(queue_dir):
        raise SegqError(f"no queue at {queue_dir}: the directory does not exist")
    if not os.path.isdir(queue_dir):
        raise SegqError(f"{queue_dir} is a file, not a queue directory")
    if not (
        _segment.list_segments(queue_dir)
        or os.path.exists(os.path.join(queue_dir, CONTROL_NAME))
        or os.path.isdir(os.path.join(queue_dir, CURSOR_DIR))
    ):
        raise SegqError(f"{queue_dir} is not a segq queue: no segments, no control file, no cursors")
    return queue_dir


def require_queue(queue_dir: str, *, create: bool, who: str) -> None:
    """Raise ``SegqError`` unless ``queue_dir`` exists or ``create`` allows making it.

    Consumers (``who``, e.g. "Receiver") call this before attaching, so a
    typo in a path is an error instead of a new, empty queue waited on forever.
    A typo that names some other directory (one holding other files, but no
    segment, control file or cursors) is refused too: attaching would write
    a queue's files among them.  An empty directory is allowed, since a
    ``Sender`` making the queue leaves one for an instant.
    """
    if create:
        return
    if not os.path.lexists(queue_dir):
        raise SegqError(
            f"no queue at {queue_dir} (no such directory): check the path, or pass create=True to {who} "
            "to create an empty queue (for a consumer that starts before its producers)"
        )
    if os.path.lexists(os.path.join(queue_dir, CONTROL_NAME)):
        return  # every queue has one: the common case costs one stat
    try:
        entries = os.listdir(queue_dir)
    except OSError:
        return  # a file, or no permission: attaching says so
    if not entries or _segment.list_segments(queue_dir) or CURSOR_DIR in entries:
        return
    raise SegqError(
        f"{queue_dir} is not a segq queue: it holds other files (e.g. {sorted(entries)[0]!r}) but no segment, "
        f"control file or cursors: check the path, or pass create=True to {who} to make a queue among them"
    )


class AppendLock(Protocol):
    """What the append lock offers: a semaphore's acquire and release."""

    def acquire(self, block: bool = True, timeout: float | None = None) -> bool: ...

    def release(self) -> None: ...


class _FlockAppendLock:
    """Fallback append lock for platforms without named semaphores."""

    def __init__(self, path: str) -> None:
        self._thread_lock = threading.Lock()
        self._handle = os.fdopen(open_file(path, os.O_RDWR, private=True), "r+b", buffering=0)

    def acquire(self, block: bool = True, timeout: float | None = None) -> bool:
        if not self._thread_lock.acquire(block, -1 if timeout is None else timeout):
            return False
        import portalocker

        flags = portalocker.LockFlags.EXCLUSIVE | (0 if block else portalocker.LockFlags.NON_BLOCKING)
        try:
            portalocker.lock(self._handle, flags)
        except portalocker.LockException:
            self._thread_lock.release()
            return False
        return True

    def release(self) -> None:
        import portalocker

        portalocker.unlock(self._handle)
        self._thread_lock.release()

    def close(self) -> None:
        """Close the lock file (the Control detaching; a SemLock needs nothing)."""
        self._handle.close()


def _semlock_class() -> Any:
    try:
        from _multiprocessing import SemLock
    except ImportError:
        return None
    return SemLock


def _create_semaphore(prefix: str, directory: os.stat_result) -> tuple[int, int] | None:
    """Create a fresh append semaphore; return ``(token, identity)``, or None where there are none.

    The name is unpredictable and created exclusively, so a semaphore planted
    under a name a reader could guess is never ours: we pick another token.
    Its mode is the queue's private mode, so everyone who may write the queue
    can open it (one append lock per queue, whoever opens it) and no one else.
    """
    semlock = _semlock_class()
    if semlock is None:
        return None
    for _ in range(8):
        token = int.from_bytes(os.urandom(8), "little") >> 1 | 1
        name = f"{prefix}{token:016x}"
        try:
            semaphore = semlock(1, 1, 1, name, False)
        except FileExistsError:
            continue
        except (OSError, AttributeError, TypeError):
            return None
        del semaphore  # it lives on by name; openers map it again
        where = _semaphore_file(name)
        if where is None:
            return token, 1
        try:
            if os.geteuid() == 0 and directory.st_uid != 0:
                os.chown(where, directory.st_uid, -1)  # root must not lock the queue's owner out
            os.chmod(where, file_mode(directory.st_mode, private=True))
            return token, os.stat(where).st_ino
        except OSError:
            _unlink_quietly(name)
            return None
    raise SegqError(f"cannot create an append semaphore named {prefix}*: every name tried was taken")


def _open_semaphore(control_path: str, prefix: str, token: int, identity: int, directory: os.stat_result) -> AppendLock:
    """Open the queue's append semaphore and check that it is the one the control file names.

    Refused (``SegqError``, never used): a semaphore with another identity
    (planted or recreated under its name), another owner, a mode wider than
    the queue's, or a value no append lock can have.
    """
    name = f"{prefix}{token:016x}"
    semlock = _semlock_class()
    where = _semaphore_file(name)
    advice = f"close every process using the queue and run `segq recover {os.path.dirname(control_path)}`"
    if semlock is None:
        raise SegqError(f"{control_path}: the queue uses a named semaphore, which this platform lacks")
    try:
        semaphore = semlock._rebuild(0, 1, 1, name)
    except PermissionError:
        raise SegqError(
            f"cannot open the append semaphore {name} of {os.path.dirname(control_path)}: permission denied "
            "(only users who may write the queue may send or receive; see docs/security.md)"
        ) from None
    except FileNotFoundError:
        raise _SemaphoreGone(name) from None
    except OSError as error:
        raise SegqError(f"cannot open the append semaphore {name}: {error.strerror}; {advice}") from None
    if where is not None:
        try:
            info = os.stat(where)
        except FileNotFoundError:
            raise _SemaphoreGone(name) from None
        except OSError as error:
            raise SegqError(f"cannot check the append semaphore {where}: {error.strerror}; {advice}") from None
        widest = file_mode(directory.st_mode, private=True)
        owner_ok = info.st_uid in (os.geteuid(), directory.st_uid, 0) or (
            directory.st_mode & stat.S_IWGRP and info.st_gid == directory.st_gid
        )
        problem = None
        if info.st_ino != identity:
            problem = "is not the one the control file names (planted or recreated)"
        elif not owner_ok:
            problem = f"is owned by uid {info.st_uid}, who may not write the queue"
        elif stat.S_IMODE(info.st_mode) & ~widest:
            problem = f"has mode {stat.S_IMODE(info.st_mode):o}, wider than the queue allows ({widest:o})"
        if problem is not None:
            raise SegqError(f"the append semaphore {where} {problem}; refusing to use it; {advice}")
    try:
        value = semaphore._get_value()
    except (OSError, NotImplementedError):
        value = 0  # macOS has no sem_getvalue
    if value not in (0, 1):
        raise SegqError(f"the append semaphore {name} has value {value}, not 0 or 1 (not a lock of ours); {advice}")
    lock: AppendLock = semaphore
    return lock


class _SemaphoreGone(SegqError):
    """The append semaphore the control file names does not exist (removed while no one was attached)."""

    def __init__(self, name: str) -> None:
        super().__init__(f"the append semaphore {name} does not exist")
        self.name = name


def _back_off() -> None:
    """Sleep 1 to 11 ms, at random, so openers retrying together do not collide again."""
    time.sleep(0.001 + 0.01 * os.urandom(1)[0] / 256)


def _unlink_quietly(name: str) -> None:
    try:
        _sem_unlink(name)
    except (ImportError, OSError):
        pass


class Control:
    """A process's attachment to a queue's control file.

    Attaching creates the queue directory and its first segment when missing,
    and rebuilds the control file when this is the only process attached.
    """

    def __init__(self, queue_dir: StrPath, *, segment_size: int = DEFAULT_SEGMENT_SIZE) -> None:
        import portalocker  # here, not at the top: `import segq` stays cheap (issue 14)

        self.queue_dir = os.fspath(queue_dir)
        self.path = os.path.join(self.queue_dir, CONTROL_NAME)
        self.segment_size = segment_size
        self._closed = False
        if os.path.exists(self.queue_dir) and not os.path.isdir(self.queue_dir):
            raise SegqError(f"{self.queue_dir} is a file, not a queue directory")
        try:
            os.makedirs(self.queue_dir, exist_ok=True)
            self._directory = os.stat(self.queue_dir)
            self._prefix = semaphore_prefix(self.queue_dir)
            self._handle = os.fdopen(open_file(self.path, os.O_RDWR, private=True), "r+b", buffering=0)
        except OSError as error:
            raise os_error(error, "open queue", self.queue_dir) from None
        try:
            self._attach()
        except BaseException:
            # The map holds a duplicate of the descriptor, and so the flock:
            # closing the handle alone would keep every other opener waiting.
            mapping = getattr(self, "map", None)
            for view in (getattr(self, "words", None), getattr(self, "bytes", None)):
                if view is not None:
                    view.release()
            if mapping is not None:
                mapping.close()
            portalocker.unlock(self._handle)
            self._handle.close()
            raise
        self.pid = os.getpid()

    # -- attaching -------------------------------------------------------

    def _attach(self) -> None:
        """Lock, map and (when alone) rebuild the control file, then open the append lock it names.

        Starts over, up to ``_UNFINISHED_RETRY_SECONDS``, when the named
        semaphore is gone: it was removed while nobody was attached, and
        only a process that gets the file exclusively may make a new one.
        """
        import portalocker

        handle = self._handle
        deadline = time.monotonic() + _UNFINISHED_RETRY_SECONDS
        while True:
            alone = self._lock(handle, deadline)
            if getattr(self, "map", None) is None:
                self._map(alone)
            if alone:
                self._rebuild()
                portalocker.lock(handle, portalocker.LockFlags.SHARED)
            else:
                magic, version, _ = _HEADER.unpack_from(self.map, 0)
                if magic != CONTROL_MAGIC:
                    raise CorruptionError(self.path, 0, "control file has a bad magic number")
                if version != CONTROL_VERSION:
                    raise UnsupportedFormat(f"{self.path}: control format {version}, this segq reads {CONTROL_VERSION}")
            try:
                self.append_lock = self._open_append_lock()
                return
            except _SemaphoreGone as error:
                if alone or time.monotonic() > deadline:
                    raise self._attach_failed(f"its append semaphore {error.name} does not exist") from None
            portalocker.unlock(handle)
            _back_off()

    def _map(self, alone: bool) -> None:
        import mmap

        handle = self._handle
        if os.fstat(handle.fileno()).st_size < CONTROL_SIZE:
            if not alone:
                # Someone created the file but has not sized it yet: they hold
                # it exclusively while doing so, and we hold it shared now.
                raise SegqError(f"{self.path} is truncated; run `segq recover {self.queue_dir}`")
            # Written, not just sized: a full disk fails here, not as SIGBUS in a mapped write.
            size = os.fstat(handle.fileno()).st_size
            try:
                os.pwrite(handle.fileno(), bytes(CONTROL_SIZE - size), size)
            except OSError as error:
                raise os_error(error, "create", self.path) from None
        self.map = mmap.mmap(handle.fileno(), CONTROL_SIZE)
        # Views for the hot paths: indexing a memoryview loads or stores one
        # aligned native word (or byte), about three times cheaper than struct.
        self.words = memoryview(self.map).cast("Q")
        self.bytes = memoryview(self.map)

    def _open_append_lock(self) -> AppendLock:
        identity = self.word(SEMAPHORE)
        if identity:
            return _open_semaphore(self.path, self._prefix, self.word(TOKEN), identity, self._directory)
        # The queue was rebuilt where named semaphores are missing: every
        # opener uses the same flock, never a mix of the two.
        return _FlockAppendLock(os.path.join(self.queue_dir, "segq.append.lock"))

    def _attach_failed(self, why: str) -> SegqError:
        from ._flock import flock_holders

        holders = [pid for pid in flock_holders(self._handle.fileno()) if pid != os.getpid()]
        held = f" (held by PID {', '.join(map(str, holders))})" if holders else ""
        return SegqError(
            f"cannot attach to {self.queue_dir}: {why}, and for {_UNFINISHED_RETRY_SECONDS:g} s no opener could "
            f"rebuild {CONTROL_NAME}, since other processes kept it locked{held}; try again, or close every "
            f"process using the queue and run `segq recover {self.queue_dir}`"
        )

    def _lock(self, handle: IO[bytes], deadline: float) -> bool:
        """Lock the control file, exclusively if no one else has it; return whether we are alone.

        Got shared, the file must be live to attach to:

        | found (holding it shared)         | meaning                               | then                     |
        |-----------------------------------|---------------------------------------|--------------------------|
        | magic, a semaphore identity       | live: processes are attached          | attach (return False)    |
        | short, or no magic                | the builder was killed midway         | let go, try again        |
        | magic, ``SEMAPHORE_REMOVED``      | the last process detached just now    | let go, try again        |

        Trying again, whoever finds itself alone rebuilds the file.  Past
        ``deadline`` an unfinished file is returned for the caller to report
        as damage, and a removed semaphore is a ``SegqError``.
        """
        import portalocker

        while True:
            try:
                portalocker.lock(handle, portalocker.LockFlags.EXCLUSIVE | portalocker.LockFlags.NON_BLOCKING)
                return True
            except portalocker.LockException:
                wait_flock(handle.fileno(), self.path, shared=True, what="the control file, held by an opener or `segq recover`")
            header = os.pread(handle.fileno(), SEMAPHORE + WORD.size, 0)
            finished = header[: len(CONTROL_MAGIC)] == CONTROL_MAGIC
            if finished and len(header) == SEMAPHORE + WORD.size:
                if WORD.unpack_from(header, SEMAPHORE)[0] != SEMAPHORE_REMOVED:
                    return False
                if time.monotonic() > deadline:
                    raise self._attach_failed("the last process to detach removed its append semaphore")
            elif finished or time.monotonic() > deadline:
                return False
            portalocker.unlock(handle)
            _back_off()

    def _rebuild(self) -> None:
        """Recompute everything in the control file from the segments (we are alone)."""
        control = self.map
        magic, version, _ = _HEADER.unpack_from(control, 0)
        known = magic == CONTROL_MAGIC and version == CONTROL_VERSION
        if magic == CONTROL_MAGIC and version != CONTROL_VERSION:
            # No process has it open and it is only a cache: rebuild it in our format.
            log.warning("%s: control format %d, rebuilding it as format %d", self.path, version, CONTROL_VERSION)
        old_token = self.word(TOKEN) if known else 0
        clean = known and self.word(CLEAN_CHECK) == self.word(CLEAN_TAIL) ^ old_token ^ _CLEAN_SALT
        # After a clean shutdown the hint is the tail saved with its check; the
        # live tail word has no check, and a damaged one must not say where to scan.
        hint = (self.word(CLEAN_TAIL) if clean else self.word(TAIL)) if known else None
        tail = self._find_tail(hint, clean)
        # os.urandom, not secrets: that module loads OpenSSL (3 MiB resident, issue 14).
        # Alone: no one uses any semaphore of this queue, including ones
        # left by processes killed while attached.
        remove_semaphores(self.queue_dir)
        created = _create_semaphore(self._prefix, self._directory)
        token, identity = created if created is not None else (int.from_bytes(os.urandom(8), "little") >> 1 | 1, 0)
        if created is None:
            log.debug("named semaphores unavailable; appends use flock")
        control[:CONTROL_SIZE] = bytes(CONTROL_SIZE)
        _HEADER.pack_into(control, 0, CONTROL_MAGIC, CONTROL_VERSION, 0)
        WORD.pack_into(control, TOKEN, token)
        WORD.pack_into(control, TAIL, tail)
        WORD.pack_into(control, SYNCED, 0)
        WORD.pack_into(control, SEMAPHORE, identity)

    def _find_tail(self, hint: int | None, clean: bool) -> int:
        segments = _segment.list_segments(self.queue_dir)
        if not segments:
            _segment.create_segment(self.queue_dir, 0, _segment.next_segment_size(None, self.segment_size), durable=True)
            return Position.bottom(0).word
        last = segments[-1]
        # A rollover segment (created without a sync under sync="never") whose
        # header page a power loss kept from the disk: restored from its file
        # name, its records then judged like any tail's.  Only the last one:
        # anywhere else a bad header is damage for `segq recover`.
        if _segment.restore_unwritten_header(self.queue_dir, last):
            # A power loss, then: the control file is no witness to what
            # reached the disk (a clean shutdown's tail included), so scan it all.
            hint, clean = None, False
        segment = MappedSegment(self.queue_dir, last, writable=True)
        try:
            start = SEGMENT_HEADER_SIZE
            if clean and hint is not None:
                # After a clean shutdown the saved tail is trusted as a place
                # to start scanning from, so opening costs no full scan.
                hinted = Position.from_word(hint)
                if hinted.segment == last and SEGMENT_HEADER_SIZE <= hinted.offset <= segment.size - HEADER_SIZE:
                    start = hinted.offset
            tail = self._repair_tail(segment, start, hint, clean_start=start != SEGMENT_HEADER_SIZE)
        finally:
            segment.close()
        # An empty last segment after an unsealed one: the tail is back in that
        # one (and after a power loss, possibly further back still).
        index = len(segments) - 1
        while index > 0 and segments[index - 1] == segments[index] - 1:
            if tail != Position.bottom(segments[index]).word:
                break
            earlier = self._unsealed_tail(segments[index - 1], hint, clean)
            if earlier is None:
                break
            tail, index = earlier, index - 1
        return tail

    def _unsealed_tail(self, number: int, hint: int | None, clean: bool) -> int | None:
        """Return the tail in segment ``number`` if it was never sealed, else None.

        A sender creates the next segment before it seals the old one with the
        end marker.  One killed in between leaves an empty last segment after
        an unsealed one: the tail is still in the unsealed one, and the next
        rollover reuses the empty segment (``Sender._clear_abandoned_segment``).
        """
        start = SEGMENT_HEADER_SIZE
        if clean and hint is not None:
            hinted = Position.from_word(hint)
            if hinted.segment == number + 1:
                return None  # a tail was published in the next segment, which happens after sealing
            if hinted.segment == number:
                start = hinted.offset
        segment = MappedSegment(self.queue_dir, number, writable=True)
        try:
            if not SEGMENT_HEADER_SIZE <= start <= segment.size - HEADER_SIZE:
                start = SEGMENT_HEADER_SIZE
            # "Sealed" is decided by a scan that resumes past damage: a damaged
            # record in front of the end marker does not make a segment unsealed.
            from ._scan import scan_segment

            if scan_segment(self.queue_dir, number, last=False).sealed:
                return None
            log.warning("%s: never sealed (a sender died while starting the next segment)", segment.path)
            return self._repair_tail(segment, start, hint)
        finally:
            segment.close()

    def _repair_tail(self, segment: MappedSegment, start: int, hint: int | None, clean_start: bool = False) -> int:
        """Find the end of the last complete record from ``start``; cut what lies past it."""
        scan = _segment.scan_records(segment.map, start, segment.size)
        if scan.status is RecordStatus.END:
            following = segment.number + 1
            size = _segment.next_segment_size(segment.size, self.segment_size)
            _segment.create_segment(self.queue_dir, following, size, durable=True)
            return Position.bottom(following).word
        if clean_start:
            # Shut down cleanly with the append lock free: nobody died
            # mid-append, so past the tail the segment is zero (no full read).
            dirty = scan.end
        else:
            dirty = _segment.dirty_end_in_file(segment.fd, scan.end, segment.size)
        if hint is not None and dirty > scan.end:
            # Only bytes that are there can be damaged: with nothing at all past
            # the last complete record, the published tail's records never
            # reached the disk (power loss), or the tail word is what is damaged.
            hinted = Position.from_word(hint)
            if hinted.segment == segment.number and scan.end < hinted.offset <= segment.size:
                raise CorruptionError(
                    segment.path,
                    scan.stop,
                    f"{scan.status.value} in a record below the last published one (offset {hinted.offset})",
                )
        if scan.status is not RecordStatus.EMPTY and scan.stop_extent + HEADER_SIZE <= segment.size:
            after = decode_record(segment.map, scan.stop_extent, segment.size)
            if after.status in (RecordStatus.OK, RecordStatus.END):
                raise CorruptionError(segment.path, scan.stop, f"{scan.status.value}, followed by valid records")
        if dirty > scan.end:
            log.warning(
                "%s: cutting a torn tail, bytes %d..%d (a write interrupted by a crash)",
                segment.path,
                scan.end,
                dirty,
            )
            segment.map[scan.end : dirty] = bytes(dirty - scan.end)
        return Position(segment.number, scan.end).word

    # -- shared words ----------------------------------------------------

    def word(self, offset: int) -> int:
        """Load the 64-bit word at ``offset``."""
        value: int = WORD.unpack_from(self.map, offset)[0]
        return value

    def store(self, offset: int, value: int) -> None:
        """Store a 64-bit word at ``offset`` (one aligned store)."""
        WORD.pack_into(self.map, offset, value)

    def tail(self) -> Position:
        """Return the append position."""
        return Position.from_word(self.word(TAIL))

    # -- the append lock -------------------------------------------------

    def acquire_slow(self, zero_past_tail: Callable[[int], None]) -> None:
        """Wait for the append lock; take it over if its holder died holding it.

        ``zero_past_tail(tail_word)`` is called after a takeover to clear the
        torn bytes the dead holder may have left past the tail.
        """
        append_lock = self.append_lock
        last_tail = self.word(TAIL)
        stalled_since = time.monotonic()
        while True:
            if append_lock.acquire(True, _STEAL_CHECK_SECONDS):
                self.words[OWNER_INDEX] = self.pid
                return
            if self._closed:
                raise Closed("the queue was closed while waiting to append")
            tail = self.word(TAIL)
            now = time.monotonic()
            if tail != last_tail:
                last_tail, stalled_since = tail, now
                continue
            if now - stalled_since < _STEAL_AFTER_SECONDS:
                continue
            if self._take_over(last_tail):
                zero_past_tail(last_tail)
                return

    def _take_over(self, stalled_tail: int) -> bool:
        from ._lock import process_is_alive

        owner = self.word(OWNER)
        if owner == self.pid or process_is_alive(owner, None):
            if owner == self.pid or not self._dead_sender_registered():
                return False
        takeover_path = os.path.join(self.queue_dir, "segq.takeover.lock")
        with os.fdopen(open_file(takeover_path, os.O_RDWR, private=True), "r+b", buffering=0) as handle:
            wait_flock(handle.fileno(), takeover_path, what="append-lock takeover")
            if self.word(TAIL) != stalled_tail or self.word(OWNER) != owner:
                return False
            self.words[OWNER_INDEX] = self.pid
        log.warning("%s: append lock held by dead PID %d; taking it over", self.queue_dir, owner)
        return True

    def _dead_sender_registered(self) -> bool:
        """Tell whether a sender registration was left by a dead process (and remove it)."""
        from ._lock import read_owner

        directory = os.path.join(self.queue_dir, "senders")
        found = False
        try:
            names = os.listdir(directory)
        except OSError:
            return False
        for name in names:
            path = os.path.join(directory, name)
            owner = read_owner(path)
            if owner is not None and not owner.alive:
                found = True
                try:
                    os.unlink(path)
                except OSError:
                    pass
        return found

    # -- detaching -------------------------------------------------------

    def close(self) -> None:
        """Detach; the last process to detach records a clean shutdown."""
        import portalocker

        if self._closed:
            return
        self._closed = True
        handle = self._handle
        try:
            portalocker.lock(handle, portalocker.LockFlags.EXCLUSIVE | portalocker.LockFlags.NON_BLOCKING)
        except portalocker.LockException:
            pass
        else:
            tail = self.word(TAIL)
            token = self.word(TOKEN)
            # Clean only if no one died holding the append lock: then nothing
            # torn lies past the tail and the next open need not look there.
            if self.append_lock.acquire(False):
                self.append_lock.release()
                self.store(CLEAN_TAIL, tail)
                self.store(CLEAN_CHECK, tail ^ token ^ _CLEAN_SALT)
            _unlink_quietly(f"{self._prefix}{token:016x}")
            # Before letting go: an opener may be waiting for the file shared,
            # and must not attach to the semaphore just removed.
            self.store(SEMAPHORE, SEMAPHORE_REMOVED)
        self.words.release()
        self.bytes.release()
        try:
            self.map.close()
        except BufferError:
            pass  # a view is still held somewhere; the mapping goes with it
        portalocker.unlock(handle)  # the map's duplicate descriptor would otherwise keep the flock
        handle.close()
        if isinstance(self.append_lock, _FlockAppendLock):
            self.append_lock.close()



# -- the header, for those who read the file without attaching (inspection, recovery) --


def published_tail(fd: int) -> Position | None:
    """Return the tail last published in the open control file ``fd``; None if the file is not a complete one of ours.

    A snapshot: the file may be short (its builder was killed), reset, or
    of another version, and then there is no answer rather than an error.
    """
    if os.fstat(fd).st_size < CONTROL_SIZE:
        return None
    header = os.pread(fd, TAIL + WORD.size, 0)
    if len(header) < TAIL + WORD.size:
        return None
    magic, version, _ = _HEADER.unpack_from(header, 0)
    if magic != CONTROL_MAGIC or version != CONTROL_VERSION:
        return None
    return Position.from_word(WORD.unpack_from(header, TAIL)[0])


def read_published_tail(queue_dir: StrPath) -> Position | None:
    """Return the tail last published in the queue's control file, read-only; None if unknown.

    The file is read as :func:`published_tail` reads it.
    """
    try:
        fd = open_to_read(os.path.join(os.fspath(queue_dir), CONTROL_NAME))
    except OSError:
        return None
    try:
        return published_tail(fd)
    finally:
        os.close(fd)


def reset_header(fd: int) -> None:
    """Zero the header of the open control file ``fd``, so the next process to attach rebuilds it from the segments.

    Only for a caller holding the file's ``flock`` exclusively (nobody attached).
    """
    os.pwrite(fd, bytes(CLEAN_CHECK + WORD.size), 0)
