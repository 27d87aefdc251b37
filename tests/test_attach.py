"""Attaching to a queue while others attach and detach: one append lock, never a missing one.

The last process to detach removes the append semaphore; an opener may
already be waiting for ``segq.ctl`` shared at that moment.  Before, such an
opener found the file's magic, believed others attached, and failed opening
the removed semaphore ("No such file or directory", about one open in a
hundred with two processes opening and closing).  Here real processes open
and close Senders at once, and a second process holds ``segq.ctl`` shared
at exactly the instants that went wrong.
"""

from __future__ import annotations

import os
import pathlib
import struct
import subprocess
import sys
import threading

import pytest
from _harness import CONTEXT

import _users
import segq
from segq import _control, recovery

HOLD_SHARED = """
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDONLY)
fcntl.flock(fd, fcntl.LOCK_SH)
print("held", flush=True)
sys.stdin.readline()
"""


def semaphores_of(queue: pathlib.Path) -> list[str]:
    prefix = "sem." + _control.semaphore_prefix(queue)[1:]
    return sorted(name for name in os.listdir("/dev/shm") if name.startswith(prefix))


def semaphore_word(queue: pathlib.Path) -> int:
    with open(queue / _control.CONTROL_NAME, "rb") as handle:
        handle.seek(_control.SEMAPHORE)
        value: int = struct.unpack("@Q", handle.read(8))[0]
    return value


class SharedHolder:
    """Another process holding ``segq.ctl`` shared, as an opener does between its lock and its check."""

    def __init__(self, queue: pathlib.Path) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-c", HOLD_SHARED, str(queue / _control.CONTROL_NAME)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        assert self.process.stdout is not None and self.process.stdout.readline() == b"held\n"

    def release(self) -> None:
        if self.process.poll() is None:
            assert self.process.stdin is not None
            self.process.stdin.close()
        self.process.wait(timeout=30)
        assert self.process.stdout is not None
        self.process.stdout.close()

    def release_later(self, seconds: float) -> threading.Timer:
        timer = threading.Timer(seconds, self.release)
        timer.start()
        return timer


def drain(queue: pathlib.Path) -> list[bytes]:
    got = []
    with segq.Receiver(queue) as receiver:
        while (message := receiver.try_recv()) is not None:
            got.append(message.data)
            message.commit()
    return got


def assert_every_record_whole(queue: pathlib.Path, tags: list[str], rounds: int) -> None:
    assert recovery.verify(queue).ok
    records = drain(queue)
    assert len(records) == len(tags) * rounds
    for tag in tags:
        mine = [record for record in records if record.startswith(tag.encode() + b":")]
        assert mine == [b"%s:%06d:" % (tag.encode(), seq) + b"x" * 60 for seq in range(rounds)]


def test_senders_opening_and_closing_at_once_all_attach(tmp_path: pathlib.Path) -> None:
    """Three processes each open, send once and close a Sender 300 times: no open fails, no record is lost."""
    queue = tmp_path / "q"
    tags, rounds = ["p0", "p1", "p2"], 300
    started = [_users.start(_users.open_send_close, str(queue), tag, rounds) for tag in tags]
    outcomes = [_users.finish(child) for child in started]
    assert outcomes == [("value", [])] * len(tags), outcomes
    assert_every_record_whole(queue, tags, rounds)
    assert semaphores_of(queue) == []


def test_the_last_process_to_detach_marks_its_semaphore_removed(tmp_path: pathlib.Path) -> None:
    """After the last close segq.ctl names no semaphore to open, and none is left in /dev/shm."""
    queue = tmp_path / "q"
    with segq.Sender(queue) as sender:
        sender.send(b"one")
        assert semaphore_word(queue) not in (0, _control.SEMAPHORE_REMOVED)
        with segq.Sender(queue):
            pass  # not the last: leaves the semaphore to the first
        assert semaphore_word(queue) not in (0, _control.SEMAPHORE_REMOVED)
        assert len(semaphores_of(queue)) == 1
    assert semaphore_word(queue) == _control.SEMAPHORE_REMOVED
    assert semaphores_of(queue) == []


def test_an_opener_that_gets_the_file_shared_after_the_last_close_waits_and_rebuilds(tmp_path: pathlib.Path) -> None:
    """Held shared by another opener after the last close, segq.ctl is rebuilt once that opener lets go."""
    queue = tmp_path / "q"
    with segq.Sender(queue) as sender:
        sender.send(b"before")
    holder = SharedHolder(queue)
    timer = holder.release_later(0.3)
    try:
        with segq.Sender(queue) as sender:  # before the fix: "cannot open the append semaphore"
            sender.send(b"after")
            assert len(semaphores_of(queue)) == 1
    finally:
        timer.join()
    assert drain(queue) == [b"before", b"after"]


def test_an_opener_that_finds_the_named_semaphore_gone_starts_over(tmp_path: pathlib.Path) -> None:
    """A semaphore removed while nobody was attached (`segq unlock`, by hand) makes the opener rebuild, not fail."""
    queue = tmp_path / "q"
    child = CONTEXT.Process(target=_users.attach_and_die, args=(str(queue),))
    child.start()
    child.join(60)
    assert child.exitcode == -9
    assert len(semaphores_of(queue)) == 1  # left by the killed process, still named in segq.ctl
    holder = SharedHolder(queue)
    assert len(_control.remove_semaphores(queue)) == 1
    timer = holder.release_later(0.3)
    try:
        with segq.Sender(queue) as sender:
            sender.send(b"after")
    finally:
        timer.join()
    assert drain(queue) == [b"sent by a process about to die", b"after"]
    assert semaphores_of(queue) == []


@pytest.mark.parametrize("killed", [False, True], ids=["removed at close", "removed while nobody attached"])
def test_an_opener_kept_from_rebuilding_gives_up_with_a_clear_error(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch, killed: bool
) -> None:
    """Held shared past the retry bound, the opener raises a SegqError naming the holder, using no lock."""
    queue = tmp_path / "q"
    if killed:
        child = CONTEXT.Process(target=_users.attach_and_die, args=(str(queue),))
        child.start()
        child.join(60)
        _control.remove_semaphores(queue)
    else:
        with segq.Sender(queue) as sender:
            sender.send(b"before")
    monkeypatch.setattr(_control, "_UNFINISHED_RETRY_SECONDS", 0.3)
    holder = SharedHolder(queue)
    try:
        with pytest.raises(segq.SegqError) as caught:
            segq.Sender(queue)
    finally:
        holder.release()
    message = str(caught.value)
    assert f"cannot attach to {queue}" in message and f"PID {holder.process.pid}" in message, message
    assert "segq recover" in message
    assert semaphores_of(queue) == []
    with segq.Sender(queue) as sender:  # once the holder is gone, the next opener rebuilds
        sender.send(b"after")
