"""The work-queue group lock excludes processes, survives a dead holder, and refuses a relock: through C and ctypes."""

from __future__ import annotations

import logging
import os
import pathlib
import signal
import subprocess
import sys
import threading

import pytest

from segq.errors import SegqError
from segq.workqueue._grouplock import GroupLock, robust_mutexes_available

pytestmark = pytest.mark.skipif(not robust_mutexes_available(), reason="no robust pthread mutexes here (flock fallback)")

ROOT = pathlib.Path(__file__).resolve().parent.parent

# A child that takes the lock, says so, and holds it until stdin closes (or it is killed).
HOLDER = """
import sys
from segq.workqueue._grouplock import GroupLock
lock = GroupLock(sys.argv[1])
lock.acquire()
print("held", flush=True)
sys.stdin.read()
lock.release()
lock.close()
"""


@pytest.fixture(params=["C", "ctypes"])
def calls(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run the test with the pthread calls made from the C extension, then through ctypes."""
    if request.param == "ctypes":
        monkeypatch.setenv("SEGQ_PURE_PYTHON", "1")
    else:
        pytest.importorskip("segq._speedups")
        monkeypatch.delenv("SEGQ_PURE_PYTHON", raising=False)
    return str(request.param)


def start_holder(directory: pathlib.Path) -> subprocess.Popen[str]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(directory)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env
    )
    assert holder.stdout is not None
    assert holder.stdout.readline() == "held\n"
    return holder


def stop(holder: subprocess.Popen[str]) -> None:
    holder.kill()
    holder.wait()
    for pipe in (holder.stdin, holder.stdout):
        if pipe is not None:
            pipe.close()


def test_a_lock_held_by_another_process_is_waited_for_until_it_is_released(tmp_path: pathlib.Path, calls: str) -> None:
    holder = start_holder(tmp_path)
    lock = GroupLock(str(tmp_path))
    taken = threading.Event()

    def take() -> None:
        lock.acquire()
        taken.set()

    try:
        waiter = threading.Thread(target=take)
        waiter.start()
        assert not taken.wait(0.3), "the lock was taken while another process held it"
        assert holder.stdin is not None
        holder.stdin.close()
        assert taken.wait(10), "the lock was not taken after its holder released it"
        waiter.join()
        lock.release()
    finally:
        stop(holder)
        lock.close()


def test_a_holder_killed_with_the_lock_leaves_it_to_the_next_process_with_a_warning(
    tmp_path: pathlib.Path, calls: str, caplog: pytest.LogCaptureFixture
) -> None:
    holder = start_holder(tmp_path)
    holder.send_signal(signal.SIGKILL)
    stop(holder)
    lock = GroupLock(str(tmp_path))
    try:
        with caplog.at_level(logging.WARNING):
            lock.acquire()
        assert "died" in caplog.text
        lock.release()
        lock.acquire()  # consistent again: an ordinary lock from here on
        lock.release()
    finally:
        lock.close()


def test_a_thread_taking_the_lock_it_holds_gets_an_error_not_a_deadlock(tmp_path: pathlib.Path, calls: str) -> None:
    lock = GroupLock(str(tmp_path))
    try:
        lock.acquire()
        with pytest.raises(SegqError, match="already holds"):
            lock.acquire()
        lock.release()
    finally:
        lock.close()
