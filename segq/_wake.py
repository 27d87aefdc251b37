"""Blocking without spinning: how a sender wakes a waiting receiver.

Theory of operation
-------------------
A process that must wait (a receiver for data, a sender for room) claims a
slot in the control file's waiter table and owns a FIFO, ``wake/<slot>.fifo``.
To wait it raises its slot's byte in ``DATA_WAITERS`` (or ``ROOM_WAITERS``)
and counts itself in ``DATA_WAITING`` (both under the table's flock,
``wake/slots.lock``, so counts stay exact; a holder hung there makes the
others raise ``Locked`` after ``SEGQ_LOCK_TIMEOUT``), checks its condition once more, and blocks in ``poll`` on
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

Work-queue claimers wait in their own region, ``CLAIM_WAITERS``, with the
group they wait in (a CRC-32 of its name) beside the flag; their flags count
in ``DATA_WAITING`` too.  A record is work for every receiver but for only
one claimer of each group, so a send wakes every raised receiver and *one*
raised claimer per group (taken in turn, so consecutive sends wake different
claimers), and a record given back wakes one claimer of its group.  A
claimer that claims while a backlog remains wakes one more of its group
(``Waker.wake_claimer``): that passing-on is what makes one wake-up per job
enough, whether several sends picked the same sleeper or the one picked was
leaving.

The file descriptor of a waiter is pollable, so asyncio can watch it with
``loop.add_reader`` instead of a thread.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import select
import stat
import threading
import time
import zlib
from typing import Callable

from ._flock import wait_flock
from ._fs import file_mode, give_to_directory_owner, make_dir, open_file
from ._control import (
    CLAIM_GROUP,
    CLAIM_GROUPS,
    CLAIM_WAITERS,
    DATA_WAITERS,
    DATA_WAITING,
    ROOM_WAITERS,
    ROOM_WAITING,
    SLOT,
    SLOT_COUNT,
    SLOTS,
    Control,
)
from ._segment import os_error
from .errors import Locked

__all__ = [
    "Waiter",
    "Waker",
    "group_tag",
    "DATA_WAITERS",
    "ROOM_WAITERS",
    "CLAIM_WAITERS",
    "DATA_WAITING",
    "ROOM_WAITING",
]

log = logging.getLogger(__name__)

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


_COUNT_OF = {DATA_WAITERS: DATA_WAITING, ROOM_WAITERS: ROOM_WAITING, CLAIM_WAITERS: DATA_WAITING}
_REGIONS = (DATA_WAITERS, ROOM_WAITERS, CLAIM_WAITERS)


def group_tag(group: str) -> int:
    """Return the number a claimer of ``group`` waits under (a CRC-32 of the name)."""
    return zlib.crc32(group.encode("utf-8"))


class _SlotTable:
    """The flock that guards the waiter table's flags and counts."""

    def __init__(self, control: Control) -> None:
        directory = _wake_dir(control)
        try:
            make_dir(control.queue_dir, os.path.basename(directory))
            self._path = os.path.join(directory, "slots.lock")
            self._fd = open_file(self._path, os.O_RDWR, private=True)
        except OSError as error:
            raise os_error(error, "create", directory) from None

    def __enter__(self) -> None:
        wait_flock(self._fd, self._path, what="the waiter table")

    def __exit__(self, *exc_info: object) -> None:
        fcntl.flock(self._fd, fcntl.LOCK_UN)

    def close(self) -> None:
        os.close(self._fd)


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
            for region in _REGIONS:
                set_flag(control, region, slot, False)
            SLOT.pack_into(control.map, SLOTS + slot * SLOT.size, os.getpid(), generation + 1)

    @property
    def raised(self) -> bool:
        """True while a flag of this waiter is up."""
        return self._raised != 0

    def fileno(self) -> int:
        """Return the FIFO's descriptor, readable when a waker has written."""
        return self.fd

    def raise_flag(self, region: int, group: int = 0) -> None:
        """Announce that this slot waits on ``region``; check the condition after this.

        ``group`` is the ``group_tag`` a claimer waits under (``CLAIM_WAITERS``).
        """
        if self.slot >= 0:
            with self._table:
                if region == CLAIM_WAITERS:
                    CLAIM_GROUP.pack_into(self._control.map, CLAIM_GROUPS + self.slot * CLAIM_GROUP.size, group)
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
            try:
                with self._table:
                    for region in _REGIONS:
                        set_flag(control, region, self.slot, False)
                    offset = SLOTS + self.slot * SLOT.size
                    _, generation = SLOT.unpack_from(control.map, offset)
                    SLOT.pack_into(control.map, offset, 0, generation)
            except Locked as error:
                # Closing must not fail for another process's hang.  The slot
                # stays taken until this process exits, and its raised flags
                # are lowered by the first waker to find its FIFO gone.
                log.warning("%s; leaving waiter slot %d as it is", error, self.slot)
        self._table.close()
        try:
            os.unlink(_fifo_path(control, self.slot))
        except OSError:
            pass
        os.close(self.fd)
        self.fd = -1
        self.slot = -1


class Waker:
    """Writes a byte to the FIFO of the processes that should wake: every receiver, one claimer a group."""

    def __init__(self, control: Control) -> None:
        self._control = control
        self._fds: dict[int, tuple[int, int]] = {}  # slot -> (generation, fd)
        self._table: _SlotTable | None = None
        self._next_claimer = 0  # where the next look for a claimer to wake starts: turns go round
        # The threads of a WorkQueue wake through one Waker (a claim passing a
        # wake-up on, a nack in a handler thread): the FIFO cache is shared.
        self._lock = threading.Lock()

    def _forget_dead_waiter(self, region: int, slot: int) -> None:
        # Its process is gone: lower its flag so sends stop trying to wake it.
        if self._table is None:
            self._table = _SlotTable(self._control)
        try:
            with self._table:
                set_flag(self._control, region, slot, False)
        except Locked as error:
            # A send that already published its record must not fail for
            # this tidying up: the flag stays up and the next wake-up retries.
            log.warning("%s; waiter slot %d stays raised", error, slot)

    def wake(self, region: int) -> None:
        """Wake every waiter raised on ``region`` (cheap when none is).

        On ``DATA_WAITERS`` (new records) also wake one claimer of each group.
        """
        control = self._control
        flags = control.map[region : region + SLOT_COUNT]
        if flags != _NO_WAITERS:
            for slot, flag in enumerate(flags):
                if flag:
                    self._wake_slot(slot, region)
        if region == DATA_WAITERS:
            claimers = control.map[CLAIM_WAITERS : CLAIM_WAITERS + SLOT_COUNT]
            if claimers != _NO_WAITERS:
                self._wake_claimers(claimers, None)

    def wake_claimer(self, group: int) -> None:
        """Wake one claimer waiting in the group whose ``group_tag`` is ``group``, if one waits."""
        claimers = self._control.map[CLAIM_WAITERS : CLAIM_WAITERS + SLOT_COUNT]
        if claimers != _NO_WAITERS:
            self._wake_claimers(claimers, group)

    def _wake_claimers(self, flags: bytes, group: int | None) -> None:
        """Wake one raised claimer of ``group`` (None: of every group), starting where the last turn ended."""
        control_map = self._control.map
        woken: set[int] = set()
        start = self._next_claimer
        for slot in _raised(flags, start):
            tag = CLAIM_GROUP.unpack_from(control_map, CLAIM_GROUPS + slot * CLAIM_GROUP.size)[0]
            if tag in woken or (group is not None and tag != group):
                continue
            self._next_claimer = (slot + 1) % SLOT_COUNT
            if not self._wake_slot(slot, CLAIM_WAITERS):
                continue  # gone: the next claimer of its group takes the turn
            woken.add(tag)
            if group is not None:
                return

    def _wake_slot(self, slot: int, region: int) -> bool:
        """Write a wake-up byte to ``slot``'s FIFO; False if its waiter is gone."""
        with self._lock:
            return self._write_slot(slot, region)

    def _write_slot(self, slot: int, region: int) -> bool:
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
                return False
            if not stat.S_ISFIFO(os.fstat(fd).st_mode):
                os.close(fd)
                return False
            self._fds[slot] = cached = (generation, fd)
        try:
            os.write(cached[1], b"\x01")
        except BlockingIOError:
            pass  # the FIFO is full of unread wake-ups: it is awake anyway
        except OSError:
            os.close(cached[1])
            del self._fds[slot]
            self._forget_dead_waiter(region, slot)
            return False
        return True

    def close(self) -> None:
        """Close the cached FIFO descriptors."""
        for _, fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        if self._table is not None:
            self._table.close()


def _raised(flags: bytes, start: int) -> list[int]:
    """Return the raised slots of ``flags`` in turn from ``start`` (wrapping round)."""
    slots = []
    for first, stop in ((start, SLOT_COUNT), (0, start)):
        slot = flags.find(1, first, stop)
        while slot >= 0:
            slots.append(slot)
            slot = flags.find(1, slot + 1, stop)
    return slots
