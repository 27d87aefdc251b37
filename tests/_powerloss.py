"""The power-loss harness: record what every sync made durable, and build the files a power loss would leave.

A child installs a :class:`DurabilityRecorder`, which journals each sync's
effect; :class:`DurableState` replays such a journal up to any crash point
and materializes the surviving files, on which recovery is then checked.
"""

from __future__ import annotations

import dataclasses
import os
import random
import time
from typing import Any

import segq
from _harness import CHILD_TIMEOUT, make_record

__all__ = ["DurabilityRecorder", "DurableState", "powerloss_receiver", "powerloss_sender", "read_durability_journal"]


class DurabilityRecorder:
    """Journal, in this process, what every ``fsync``/``fdatasync``/cursor ``msync`` made durable.

    The model of a power loss is pessimistic: a file's bytes survive only as
    they were when it was last synced, a directory entry only if the directory
    was synced after it appeared.  File contents are keyed by inode (segments
    and cursors are synced under a temporary name, then linked), and read
    *before* the real sync, so nothing written meanwhile is credited to it.
    Before each sync the control file is journalled too: it is never synced,
    so after a power loss it may hold anything it ever held, up to the latest.
    """

    def __init__(self, queue_dir: str, journal_path: str) -> None:
        import pickle

        self._pickle = pickle
        self.root = os.path.realpath(queue_dir)
        # One write per event on an O_APPEND descriptor: several processes may share the journal.
        self.fd = os.open(journal_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self.syncs = 0

    def event(self, *item: Any) -> None:
        os.write(self.fd, self._pickle.dumps(item))

    def install(self, *, initial: bool = True) -> None:
        """Journal the queue as it is (durable: it was there before), then patch the sync calls.

        ``initial`` is false for a second process joining a journal already begun.
        """
        from segq import _state

        for directory, _, names in os.walk(self.root) if initial else ():
            self._journal_directory(directory)
            for name in names:
                path = os.path.join(directory, name)
                if os.path.isfile(path):
                    with open(path, "rb") as handle:
                        self.event("inode", os.fstat(handle.fileno()).st_ino, handle.read(), time.monotonic_ns())
        real_fsync, real_fdatasync = os.fsync, os.fdatasync
        real_cursor_sync = _state.CursorFile.sync
        recorder = self

        def fsync(fd: int) -> None:
            recorder._sync_fd(fd, real_fsync)

        def fdatasync(fd: int) -> None:
            recorder._sync_fd(fd, real_fdatasync)

        def cursor_sync(cursor: Any) -> None:
            recorder.crash_point()
            stamp = time.monotonic_ns()
            with open(cursor.path, "rb") as handle:
                content = handle.read()
                inode = os.fstat(handle.fileno()).st_ino
            real_cursor_sync(cursor)
            recorder.event("inode", inode, content, stamp)

        os.fsync = fsync  # type: ignore[assignment]
        os.fdatasync = fdatasync  # type: ignore[assignment]
        _state.CursorFile.sync = cursor_sync  # type: ignore[method-assign]

    def crash_point(self) -> None:
        """Mark an instant a power loss could strike, with the control file as it is now."""
        self.syncs += 1
        try:
            with open(os.path.join(self.root, "segq.ctl"), "rb") as handle:
                control = handle.read()
        except FileNotFoundError:
            control = b""
        # The kernel may write dirty pages back early: the newest segment as it is now.
        newest = b""
        inode = -1
        segments = sorted(name for name in os.listdir(self.root) if name.endswith(".seg"))
        if segments:
            try:
                with open(os.path.join(self.root, segments[-1]), "rb") as handle:
                    newest = handle.read()
                    inode = os.fstat(handle.fileno()).st_ino
            except FileNotFoundError:
                pass
        self.event("crash", control, inode, newest)

    def _journal_directory(self, directory: str, stamp: int | None = None) -> None:
        entries = {entry.name: (entry.inode(), entry.is_dir(follow_symlinks=False)) for entry in os.scandir(directory)}
        self.event("dir", os.path.relpath(directory, self.root), entries, stamp or time.monotonic_ns())

    def _sync_fd(self, fd: int, real_sync: Any) -> None:
        target = os.readlink(f"/proc/self/fd/{fd}")
        if not (target == self.root or target.startswith(self.root + os.sep)):
            real_sync(fd)
            return
        self.crash_point()
        # Read before the real sync, and stamped: a sync in another thread may
        # finish later with older content, which must not undo this one.
        stamp = time.monotonic_ns()
        if os.path.isdir(target):
            entries = {entry.name: (entry.inode(), entry.is_dir(follow_symlinks=False)) for entry in os.scandir(target)}
            real_sync(fd)
            self.event("dir", os.path.relpath(target, self.root), entries, stamp)
            return
        with open(f"/proc/self/fd/{fd}", "rb") as handle:
            content = handle.read()
        real_sync(fd)
        self.event("inode", os.fstat(fd).st_ino, content, stamp)


def powerloss_sender(path: str, journal_path: str, options: dict[str, Any]) -> int:
    """Send numbered records with a sync policy, journalling durability and acks (a child-process target)."""
    recorder = DurabilityRecorder(path, journal_path)
    recorder.install()
    rng = random.Random(options.get("seed", 1))
    sender = segq.Sender(path, segment_size=options.get("segment_size", 1024), sync=options["sync"])
    seq = 0
    while seq < options["count"]:
        size = rng.choice((1, 1, 1, 3))
        batch = [make_record("p", seq + i, rng.randrange(options.get("max_size", 80))) for i in range(size)]
        if size == 1:
            sender.send(batch[0])
        else:
            sender.send_batch(batch)
        seq += size
        recorder.event("ack", seq)
        if options.get("pause"):
            time.sleep(rng.random() * options["pause"])
    if options.get("settle"):
        # Group commit: wait (generously) for the background thread to cover every send, without sync().
        from segq import _control

        deadline = time.monotonic() + CHILD_TIMEOUT
        while time.monotonic() < deadline:
            if sender._control.word(_control.SYNCED) >= sender._control.word(_control.TAIL):
                break
            time.sleep(0.01)
        recorder.event("settled", seq)
    sender.close()
    recorder.crash_point()
    recorder.event("closed")
    return recorder.syncs


def powerloss_receiver(path: str, journal_path: str, options: dict[str, Any]) -> int:
    """Receive and commit with a sync policy, journalling durability and commits (a child-process target)."""
    recorder = DurabilityRecorder(path, journal_path)
    recorder.install(initial=options.get("initial", True))
    rng = random.Random(options.get("seed", 2))
    received = 0
    with segq.Receiver(path, options.get("name", "default"), sync=options["sync"]) as receiver:
        while received < options.get("count", 1 << 62):
            try:
                batch = receiver.recv_batch(rng.choice((1, 1, 4)), timeout=options.get("idle", 0.2))
            except segq.Empty:
                break
            received += len(batch)
            recorder.event("received", received)
            batch.commit()
            recorder.event("committed", received)
    recorder.crash_point()
    recorder.event("closed")
    return recorder.syncs


@dataclasses.dataclass
class DurableState:
    """The files a power loss would leave, per the journal so far."""

    directories: dict[str, dict[str, tuple[int, bool]]] = dataclasses.field(default_factory=dict)
    inodes: dict[int, bytes] = dataclasses.field(default_factory=dict)
    stamps: dict[object, int] = dataclasses.field(default_factory=dict)

    def apply(self, event: tuple[Any, ...]) -> None:
        """Apply a sync's journal entry; durability only moves forward, so an older read loses."""
        if event[0] not in ("dir", "inode"):
            return
        kind, key, content, stamp = event
        if stamp < self.stamps.get((kind, key), -1):
            return
        self.stamps[(kind, key)] = stamp
        if kind == "dir":
            self.directories[key] = content
        else:
            self.inodes[key] = content

    def with_written_back(self, inode: int, content: bytes) -> DurableState:
        """Return this state with one file's current content on disk too (early write-back)."""
        if inode < 0:
            return self
        return DurableState(self.directories, {**self.inodes, inode: content}, self.stamps)

    def materialize(self, target: str, control: bytes | None) -> None:
        """Write the surviving files under ``target``; ``control`` is what the unsynced control file holds."""
        self._materialize_directory(".", target, control)

    def _materialize_directory(self, relative: str, target: str, control: bytes | None) -> None:
        os.makedirs(target, exist_ok=True)
        for name, (inode, is_directory) in self.directories.get(relative, {}).items():
            path = os.path.join(target, name)
            child = os.path.normpath(os.path.join(relative, name))
            if is_directory:
                self._materialize_directory(child, path, control)
            elif child == "segq.ctl":
                if control is not None:
                    with open(path, "wb") as handle:
                        handle.write(control)
            elif inode in self.inodes:
                with open(path, "wb") as handle:
                    handle.write(self.inodes[inode])
            elif name.endswith(".lock"):
                open(path, "wb").close()  # never synced: empty, which is harmless for a lock file
            # Anything else never synced (FIFOs, temporary files) is simply gone.


def read_durability_journal(path: str) -> list[tuple[Any, ...]]:
    import pickle

    events = []
    with open(path, "rb") as handle:
        while True:
            try:
                events.append(pickle.load(handle))
            except EOFError:
                return events
