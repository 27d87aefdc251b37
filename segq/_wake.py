"""Blocking without spinning: how a sender wakes a waiting receiver.

Theory of operation
-------------------
A process that must wait (a receiver for data, a sender for room) claims a
slot in the control file's waiter table and owns a FIFO, ``wake/<slot>.fifo``.
To wait it raises its slot's byte in ``DATA_WAITERS`` (or ``ROOM_WAITERS``)
and counts itself in ``DATA_WAITING`` (both under the table's flock, so
counts stay exact), checks its condition once more, and blocks in ``poll`` on
the FIFO.  A process that makes the condition true (a send, a commit) reads
the count byte after publishing its change and, if it is not zero, writes
one byte to the FIFO of each raised slot.  So a send that nobody waits for
costs one byte load and no system call, and a waiting process costs nothing
until it is woken.

Each side stores then loads (the waiter: flag then condition; the waker:
tail then flags).  That needs a full memory barrier between the two on each
side, or both could miss each other.  The waker gets one from releasing the
append semaphore (an atomic instruction); the waiter takes and drops a lock.
As a last line of defence a wait never blocks longer than a second before
checking its condition again, so even a lost wake-up costs latency, not a hang.

The file descriptor of a waiter is pollable, so asyncio can watch it with
``loop.add_reader`` instead of a thread.
"""

from __future__ import annotations

import errno
import os
import select
import stat
import threading
import time
from typing import Callable

from ._fs import file_mode, give_to_directory_owner, make_dir, open_file
from ._control import DATA_WAITERS, DATA_WAITING, ROOM_WAITERS, ROOM_WAITING, SLOT, SLOT_COUNT, SLOTS, Control
from ._segment import os_error

__all__ = ["Waiter", "Waker", "DATA_WAITERS", "ROOM_WAITERS", "DATA_WAITING", "ROOM_WAITING"]

_SAFETY_SECONDS = 1.0
_fence_lock = threading.Lock()
_NO_WAITERS = bytes(SLOT_COUNT)


def _fence() -> None:
    # Taking and dropping a lock executes an atomic instruction: a full barrier.
    _fence_lock.acquire()
    _fence_lock.release()


def _wake_dir(control: Control) -> str:
    return os.path.join(control.queue_dir, "wake")


def _fifo_path(control: Control, slot: int) -> str:
    return os.path.join(_wake_dir(control), f"{slot:02d}.fifo")


_COUNT_OF = {DATA_WAITERS: DATA_WAITING, ROOM_WAITERS: ROOM_WAITING}


class _SlotTable:
    """The flock that guards the waiter table's flags and counts."""

    def __init__(self, control: Control) -> None:
        directory = _wake_dir(control)
        try:
            make_dir(control.queue_dir, os.path.basename(directory))
            fd = open_file(os.path.join(directory, "slots.lock"), os.O_RDWR, private=True)
            self._handle = os.fdopen(fd, "r+b", buffering=0)
        except OSError as error:
            raise os_error(error, "create", directory) from None

    def __enter__(self) -> None:
        import portalocker  # not at the top: `import segq` stays cheap (issue 14)

        portalocker.lock(self._handle, portalocker.LockFlags.EXCLUSIVE)

    def __exit__(self, *exc_info: object) -> None:
        import portalocker

        portalocker.unlock(self._handle)

    def close(self) -> None:
        self._handle.close()


def set_flag(control: Control, region: int, slot: int, raised: bool) -> None:
    """Raise or lower ``slot``'s flag on ``region`` and keep the count exact (hold the table lock)."""
    control_map = control.map
    was_raised = control_map[region + slot] != 0
    if was_raised == raised:
        return
    control_map[region + slot] = 1 if raised else 0
    count = _COUNT_OF[region]
    control_map[count] = max(0, control_map[count] + (1 if raised else -1))


class Waiter:
    """One waiting process's slot and FIFO.  Not thread-safe: one per waiting object."""

    def __init__(self, control: Control) -> None:
        from ._lock import process_is_alive

        self._control = control
        self.slot = -1
        self.fd = -1
        self._raised = 0  # the region whose flag is up, 0 for none
        self._poller: select.poll | None = None  # made on the first blocking wait
        self._table = _SlotTable(control)
        with self._table:
            for slot in range(SLOT_COUNT):
                pid, generation = SLOT.unpack_from(control.map, SLOTS + slot * SLOT.size)
                if pid == 0 or (pid != os.getpid() and not process_is_alive(pid, None)):
                    break
            else:
                return  # table full: wait() falls back to short timed polls
            path = _fifo_path(control, slot)
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
            try:
                os.mkfifo(path, 0o600)
                self.fd = open_file(path, os.O_RDWR | os.O_NONBLOCK, private=True, create=False, fifo=True)
                directory = os.stat(os.path.dirname(path))
                give_to_directory_owner(self.fd, directory)
                os.fchmod(self.fd, file_mode(directory.st_mode, private=True))
            except OSError as error:
                raise os_error(error, "create", path) from None
            self.slot = slot
            set_flag(control, DATA_WAITERS, slot, False)
            set_flag(control, ROOM_WAITERS, slot, False)
            SLOT.pack_into(control.map, SLOTS + slot * SLOT.size, os.getpid(), generation + 1)

    @property
    def raised(self) -> bool:
        """True while a flag of this waiter is up."""
        return self._raised != 0

    def fileno(self) -> int:
        """Return the FIFO's descriptor, readable when a waker has written."""
        return self.fd

    def raise_flag(self, region: int) -> None:
        """Announce that this slot waits on ``region``; check the condition after this."""
        if self.slot >= 0:
            with self._table:
                set_flag(self._control, region, self.slot, True)
            self._raised = region
            _fence()

    def lower_flag(self, region: int) -> None:
        """Withdraw the announcement and swallow pending wake bytes."""
        if self.slot >= 0:
            with self._table:
                set_flag(self._control, region, self.slot, False)
            self._raised = 0
            self.drain()

    def drain(self) -> None:
        try:
            while os.read(self.fd, 4096):
                pass
        except (BlockingIOError, OSError):
            pass

    def wait(
        self, region: int, ready: Callable[[], bool], deadline: float | None, *, keep_raised: bool = False
    ) -> bool:
        """Block until ``ready()`` is true or ``deadline`` (monotonic) passes; return ``ready()``.

        ``keep_raised`` leaves the flag up afterwards (the caller lowers it with
        :meth:`lower_flag` once it finds work without waiting): a receiver that
        waits for every record then pays no flag syscalls per record.
        """
        if ready():
            return True
        if self._raised != region:
            self.raise_flag(region)
        try:
            while True:
                if ready():
                    return True
                now = time.monotonic()
                if deadline is not None and now >= deadline:
                    return False
                limit = _SAFETY_SECONDS if deadline is None else min(_SAFETY_SECONDS, deadline - now)
                if self.fd < 0:
                    time.sleep(min(limit, 0.005))
                    continue
                if self._poller is None:
                    self._poller = select.poll()
                    self._poller.register(self.fd, select.POLLIN)
                if self._poller.poll(limit * 1000.0) and not ready():
                    # Drained only when the wake-up brought nothing: after a real
                    # one the caller gets its record a system call sooner, and
                    # the stale byte is swallowed before the next sleep.
                    self.drain()
        finally:
            if not keep_raised:
                self.lower_flag(region)

    def close(self) -> None:
        """Give the slot back and remove the FIFO."""
        if self.slot < 0:
            self._table.close()
            return
        control = self._control
        if not control.map.closed:
            with self._table:
                set_flag(control, DATA_WAITERS, self.slot, False)
                set_flag(control, ROOM_WAITERS, self.slot, False)
                offset = SLOTS + self.slot * SLOT.size
                _, generation = SLOT.unpack_from(control.map, offset)
                SLOT.pack_into(control.map, offset, 0, generation)
        self._table.close()
        try:
            os.unlink(_fifo_path(control, self.slot))
        except OSError:
            pass
        os.close(self.fd)
        self.fd = -1
        self.slot = -1


class Waker:
    """Writes a byte to the FIFO of every process waiting on a region."""

    def __init__(self, control: Control) -> None:
        self._control = control
        self._fds: dict[int, tuple[int, int]] = {}  # slot -> (generation, fd)
        self._table: _SlotTable | None = None

    def _forget_dead_waiter(self, region: int, slot: int) -> None:
        # Its process is gone: lower its flag so sends stop trying to wake it.
        if self._table is None:
            self._table = _SlotTable(self._control)
        with self._table:
            set_flag(self._control, region, slot, False)

    def wake(self, region: int) -> None:
        """Wake every waiter raised on ``region`` (cheap when none is)."""
        control = self._control
        flags = control.map[region : region + SLOT_COUNT]
        if flags == _NO_WAITERS:
            return
        for slot, flag in enumerate(flags):
            if flag:
                self._wake_slot(slot, region)

    def _wake_slot(self, slot: int, region: int) -> None:
        control = self._control
        pid, generation = SLOT.unpack_from(control.map, SLOTS + slot * SLOT.size)
        cached = self._fds.get(slot)
        if cached is not None and cached[0] != generation:
            os.close(cached[1])
            cached = None
            del self._fds[slot]
        if cached is None:
            try:
                fd = os.open(_fifo_path(control, slot), os.O_WRONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
            except OSError as error:
                if error.errno in (errno.ENXIO, errno.ENOENT):
                    self._forget_dead_waiter(region, slot)
                return
            if not stat.S_ISFIFO(os.fstat(fd).st_mode):
                os.close(fd)
                return
            self._fds[slot] = cached = (generation, fd)
        try:
            os.write(cached[1], b"\x01")
        except BlockingIOError:
            pass  # the FIFO is full of unread wake-ups: it is awake anyway
        except OSError:
            os.close(cached[1])
            del self._fds[slot]
            self._forget_dead_waiter(region, slot)

    def close(self) -> None:
        for _, fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        if self._table is not None:
            self._table.close()
