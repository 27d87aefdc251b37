"""Lock files: the live holder is named, a dead one is taken over, a reused PID is dead."""

from __future__ import annotations

import os
import pathlib
import signal
import subprocess
import sys

import pytest

import segq
from segq._lock import LockFile, process_is_alive, read_owner, unlock

HOLD = """
import sys, time
from segq._lock import LockFile
lock = LockFile(sys.argv[1], what="test")
lock.acquire()
print("held", flush=True)
time.sleep(60)
"""


def hold_in_child(path: pathlib.Path) -> subprocess.Popen[str]:
    child = subprocess.Popen([sys.executable, "-c", HOLD, str(path)], stdout=subprocess.PIPE, text=True)
    assert child.stdout is not None and child.stdout.readline() == "held\n"
    return child


def test_a_live_holder_is_named_and_a_dead_one_is_taken_over(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "x.lock"
    child = hold_in_child(path)
    try:
        with pytest.raises(segq.Locked, match=f"PID {child.pid}") as caught:
            LockFile(path, what="test").acquire()
        assert caught.value.pid == child.pid
        with pytest.raises(segq.Locked):
            unlock(path)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
        child.stdout.close()  # type: ignore[union-attr]
    owner = read_owner(path)
    assert owner is not None and owner.pid == child.pid and not owner.alive
    lock = LockFile(path, what="test")
    lock.acquire()  # the dead owner's file is taken over
    assert read_owner(path).pid == os.getpid()  # type: ignore[union-attr]
    lock.release()
    assert not path.exists()


def test_unlock_removes_dead_owners_and_ignores_absent_files(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "x.lock"
    assert unlock(path) is False
    path.write_text("999999999 1.0\n")
    assert unlock(path) is True and not path.exists()
    path.write_text("garbage that is not a pid")
    assert unlock(path) is True


def test_a_reused_pid_counts_as_dead() -> None:
    assert process_is_alive(os.getpid(), None)
    assert not process_is_alive(os.getpid(), 12345.0)  # same PID, another start time
    assert not process_is_alive(0, None)
