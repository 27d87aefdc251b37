"""A live process that hangs holding a lock makes the others raise ``Locked`` after SEGQ_LOCK_TIMEOUT, naming it.

The three locks that used to be waited for without a bound: the work-queue
group lock (a robust mutex, and its ``flock`` fallback), the group commit's
``segq.sync.lock`` and the waiter table's ``wake/slots.lock``.  Each holder
is a real process, stopped with SIGSTOP while it holds the lock; once it
goes on (SIGCONT) and lets go, the same wait succeeds.  A holder killed
while stopped still hands the robust mutex over at once (``EOWNERDEAD``).
"""

from __future__ import annotations

import logging
import os
import pathlib
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator

import pytest

import segq
from segq.workqueue import _grouplock
from segq.workqueue._grouplock import GroupLock, group_dir, robust_mutexes_available

ROOT = pathlib.Path(__file__).resolve().parent.parent
TIMEOUT = 1.0  # SEGQ_LOCK_TIMEOUT in these tests
GIVES_UP_WITHIN = 15.0  # seconds: the timeout plus a generous allowance for a machine busy with other tests

needs_robust_mutexes = pytest.mark.skipif(not robust_mutexes_available(), reason="no robust pthread mutexes here")

# A child that takes a lock ("mutex": a group's GroupLock; "flock": an flock on
# a file), says so, and lets go when its stdin closes.
HOLDER = """
import fcntl, os, sys
kind, path = sys.argv[1], sys.argv[2]
if kind == "mutex":
    from segq.workqueue._grouplock import GroupLock
    lock = GroupLock(path)
    lock.acquire()
else:
    fd = os.open(path, os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)
print("held", flush=True)
sys.stdin.read()
if kind == "mutex":
    lock.release()
    lock.close()
else:
    fcntl.flock(fd, fcntl.LOCK_UN)
"""

Hold = Callable[[str, pathlib.Path], subprocess.Popen[str]]


def child_env() -> dict[str, str]:
    """Return the environment of a child that imports this segq."""
    return dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))


@pytest.fixture
def stopped_holder() -> Iterator[Hold]:
    """Start a process that takes a lock, then stop it with SIGSTOP: a live holder that hangs."""
    started: list[subprocess.Popen[str]] = []

    def hold(kind: str, path: pathlib.Path) -> subprocess.Popen[str]:
        process = subprocess.Popen(
            [sys.executable, "-c", HOLDER, kind, str(path)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=child_env(),
        )
        started.append(process)
        assert process.stdout is not None and process.stdout.readline() == "held\n"
        os.kill(process.pid, signal.SIGSTOP)
        return process

    yield hold
    for process in started:
        process.kill()  # SIGKILL ends a stopped process too
        process.wait()
        for pipe in (process.stdin, process.stdout):
            if pipe is not None:
                pipe.close()


@pytest.fixture
def short_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SEGQ_LOCK_TIMEOUT", str(TIMEOUT))


@pytest.fixture(params=["mutex from C", "mutex through ctypes", "flock fallback"])
def group_lock_file(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Make the group lock what this run tests; return its file's name in the group directory.

    A robust mutex, its pthread calls made from the C extension or through
    ctypes; or the ``flock`` used where robust mutexes are missing (macOS),
    here by leaving the probe for them what it leaves on such a platform.
    """
    if request.param == "flock fallback":
        monkeypatch.setattr(_grouplock, "_libc", False)
        return "lock"
    if not robust_mutexes_available():
        pytest.skip("no robust pthread mutexes here")
    if request.param == "mutex through ctypes":
        monkeypatch.setenv("SEGQ_PURE_PYTHON", "1")
    else:
        pytest.importorskip("segq._speedups")
        monkeypatch.delenv("SEGQ_PURE_PYTHON", raising=False)
    return "mutex"


def let_go(holder: subprocess.Popen[str]) -> None:
    """Let a stopped holder go on and release its lock (it exits afterwards)."""
    os.kill(holder.pid, signal.SIGCONT)
    assert holder.stdin is not None
    holder.stdin.close()
    holder.wait(timeout=30)


def assert_names(error: segq.Locked, holder: subprocess.Popen[str], file_name: str) -> None:
    assert os.path.basename(error.path) == file_name
    assert error.pid == holder.pid
    assert error.path in str(error) and f"PID {holder.pid}" in str(error) and "SEGQ_LOCK_TIMEOUT" in str(error)


def raises_locked_in_time(call: Callable[[], object]) -> segq.Locked:
    """Run ``call``, which must raise Locked after waiting about the timeout; return the error."""
    started = time.monotonic()
    with pytest.raises(segq.Locked) as caught:
        call()
    waited = time.monotonic() - started
    assert TIMEOUT <= waited < GIVES_UP_WITHIN, waited
    return caught.value


def make_group(queue: pathlib.Path, group: str = "g") -> pathlib.Path:
    with segq.Sender(queue) as sender:
        sender.send(b"job")
    segq.WorkQueue(queue, group).close()
    return pathlib.Path(group_dir(queue, group))


# -- the work-queue group lock ---------------------------------------------------------------------------


def hold_group_lock(stopped_holder: Hold, directory: pathlib.Path, file_name: str) -> subprocess.Popen[str]:
    """Stop a process holding the group lock: the mutex through a GroupLock, the fallback's flock directly."""
    if file_name == "mutex":
        return stopped_holder("mutex", directory)
    return stopped_holder("flock", directory / file_name)


def test_a_group_lock_held_by_a_stopped_process_raises_locked_naming_it_then_is_taken_once_it_goes_on(
    tmp_path: pathlib.Path, group_lock_file: str, stopped_holder: Hold, short_timeout: None
) -> None:
    directory = make_group(tmp_path / "queue")
    holder = hold_group_lock(stopped_holder, directory, group_lock_file)
    lock = GroupLock(str(directory))
    try:
        assert lock.robust == (group_lock_file == "mutex")
        error = raises_locked_in_time(lock.acquire)
        assert_names(error, holder, group_lock_file)
        let_go(holder)
        lock.acquire()
        lock.release()
    finally:
        lock.close()


@needs_robust_mutexes
def test_a_claim_while_a_stopped_process_holds_the_group_lock_raises_locked_and_claims_once_it_goes_on(
    tmp_path: pathlib.Path, stopped_holder: Hold, short_timeout: None
) -> None:
    queue = tmp_path / "queue"
    directory = make_group(queue)
    with segq.WorkQueue(queue, "g") as work:
        holder = stopped_holder("mutex", directory)
        error = raises_locked_in_time(lambda: work.claim(timeout=0))
        assert_names(error, holder, "mutex")
        let_go(holder)
        job = work.claim(timeout=0)
        assert job.data == b"job"
        job.ack()


def test_a_stopped_holder_killed_during_the_wait_hands_the_group_lock_over_at_once(
    tmp_path: pathlib.Path,
    group_lock_file: str,
    stopped_holder: Hold,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A dead holder is no hang: the waiter gets the lock long before the timeout (the mutex with a warning)."""
    monkeypatch.setenv("SEGQ_LOCK_TIMEOUT", "60")
    directory = make_group(tmp_path / "queue")
    holder = hold_group_lock(stopped_holder, directory, group_lock_file)
    lock = GroupLock(str(directory))
    taken = threading.Event()
    failed: list[BaseException] = []

    def take() -> None:
        try:
            lock.acquire()
            taken.set()
        except BaseException as error:
            failed.append(error)

    waiter = threading.Thread(target=take)
    try:
        with caplog.at_level(logging.WARNING):
            waiter.start()
            assert not taken.wait(0.5), "the lock was taken while a live process held it"
            killed = time.monotonic()
            holder.kill()
            assert taken.wait(GIVES_UP_WITHIN), failed
            handed_over = time.monotonic() - killed
            waiter.join()
        assert handed_over < 30  # far below the 60 s timeout: taken over, not timed out
        assert ("died" in caplog.text) == (group_lock_file == "mutex")
        lock.release()
        lock.acquire()  # consistent again: an ordinary lock from here on
        lock.release()
    finally:
        waiter.join()
        lock.close()


WAITER = """
import sys
from segq.workqueue import _grouplock
if sys.argv[2] == "lock":
    _grouplock._libc = False  # the flock fallback, as in the test process
lock = _grouplock.GroupLock(sys.argv[1])
print("waiting", flush=True)
try:
    lock.acquire()
    print("taken", flush=True)
except KeyboardInterrupt:
    print("interrupted", flush=True)
"""


def test_ctrl_c_ends_a_wait_for_the_group_lock(
    tmp_path: pathlib.Path, group_lock_file: str, stopped_holder: Hold, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The wait returns to Python at least every 50 ms, so SIGINT's KeyboardInterrupt is raised in it."""
    monkeypatch.setenv("SEGQ_LOCK_TIMEOUT", "60")
    directory = make_group(tmp_path / "queue")
    hold_group_lock(stopped_holder, directory, group_lock_file)
    command = [sys.executable, "-c", WAITER, str(directory), group_lock_file]
    waiter = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=child_env())
    try:
        assert waiter.stdout is not None and waiter.stdout.readline() == "waiting\n"
        time.sleep(0.5)  # in the wait by now
        waiter.send_signal(signal.SIGINT)
        assert waiter.wait(timeout=GIVES_UP_WITHIN) == 0
        assert waiter.stdout.read() == "interrupted\n"
    finally:
        waiter.kill()
        waiter.wait()
        if waiter.stdout is not None:
            waiter.stdout.close()


# -- the group commit's sync lock ------------------------------------------------------------------------


def test_a_durable_send_while_a_stopped_process_holds_the_sync_lock_raises_locked_then_syncs_once_it_goes_on(
    tmp_path: pathlib.Path, stopped_holder: Hold, short_timeout: None
) -> None:
    queue = tmp_path / "queue"
    with segq.Sender(queue, sync="always") as sender:
        sender.send(b"first")
        holder = stopped_holder("flock", queue / "segq.sync.lock")
        error = raises_locked_in_time(lambda: sender.send(b"second"))
        assert_names(error, holder, "segq.sync.lock")
        let_go(holder)
        sender.sync()
        sender.send(b"third")


def test_a_durable_send_waiting_for_the_sync_lock_returns_once_another_senders_sync_covered_it(
    tmp_path: pathlib.Path,
) -> None:
    """The group commit: a waiter whose record a running sync covers returns without the lock or an fdatasync."""
    import fcntl
    import threading

    from segq._control import SYNCED, TAIL

    queue = tmp_path / "queue"
    with segq.Sender(queue, sync="always") as sender:
        sender.send(b"first")
        with open(queue / "segq.sync.lock", "rb") as leader:  # another sender, mid-fdatasync
            fcntl.flock(leader.fileno(), fcntl.LOCK_EX)
            syncs_before = sender._fdatasyncs
            done = threading.Event()
            waiting = threading.Thread(target=lambda: (sender.send(b"second"), done.set()))
            waiting.start()
            try:
                assert not done.wait(0.3)  # its record is not synced yet: it waits
                control = sender._control
                control.store(SYNCED, control.word(TAIL))  # the leader's fdatasync ended, covering it
                assert done.wait(5), "the send kept waiting for the lock after its record was synced"
            finally:
                fcntl.flock(leader.fileno(), fcntl.LOCK_UN)
                waiting.join()
            assert sender._fdatasyncs == syncs_before  # it ran no fdatasync of its own


# -- the waiter table's lock -----------------------------------------------------------------------------


def make_waiter_table(queue: pathlib.Path) -> None:
    with segq.Sender(queue), segq.Receiver(queue, "first") as receiver:
        with pytest.raises(segq.Empty):
            receiver.recv(timeout=0.01)  # a blocking wait: makes wake/slots.lock


def test_a_blocking_recv_while_a_stopped_process_holds_the_waiter_table_raises_locked_then_waits_once_it_goes_on(
    tmp_path: pathlib.Path, stopped_holder: Hold, short_timeout: None
) -> None:
    queue = tmp_path / "queue"
    make_waiter_table(queue)
    with segq.Sender(queue) as sender, segq.Receiver(queue, "r") as receiver:
        holder = stopped_holder("flock", queue / "wake" / "slots.lock")
        error = raises_locked_in_time(lambda: receiver.recv(timeout=30))
        assert_names(error, holder, "slots.lock")
        let_go(holder)
        with pytest.raises(segq.Empty):
            receiver.recv(timeout=0.01)
        sender.send(b"after")
        assert receiver.recv(timeout=10).data == b"after"


def test_closing_a_receiver_while_a_stopped_process_holds_the_waiter_table_closes_it_with_a_warning(
    tmp_path: pathlib.Path, stopped_holder: Hold, short_timeout: None, caplog: pytest.LogCaptureFixture
) -> None:
    """Close lets go of its own files (and /dev/shm) rather than fail for another process's hang."""
    queue = tmp_path / "queue"
    make_waiter_table(queue)
    receiver = segq.Receiver(queue, "r")
    with pytest.raises(segq.Empty):
        receiver.recv(timeout=0.01)  # takes a slot
    stopped_holder("flock", queue / "wake" / "slots.lock")
    with caplog.at_level(logging.WARNING):
        receiver.close()
    assert "slots.lock" in caplog.text and "leaving waiter slot" in caplog.text
