"""One Receiver (or AsyncReceiver) shared by threads (or tasks): every promise holds.

The stress test runs threads with hypothesis-chosen scripts of calls on one
Receiver, with the interpreter switching threads every microsecond, and
checks what a consumer relies on: each record committed once, none skipped,
the committed position never moving back, and a fresh Receiver after close
starting exactly at the committed position.
"""

from __future__ import annotations

import asyncio
import pathlib
import sys
import threading
import time
from collections.abc import Callable, Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import segq
from _harness import record_figure

SMALL = 1 << 12  # small segments: commits cross segments and delete them while threads race
PATIENCE = 30.0

# What a thread may do in one step of its script.
OPERATIONS = [
    "try_recv+commit",  # the persist-queue habit: poll, handle, commit
    "recv+commit",
    "recv+rollback",
    "with recv",  # commit on leaving the block
    "batch+commit",
    "batch+rollback",
    "rollback what is pending",  # someone else's message, maybe
    "iterate",  # two steps of `for msg in rx`
]


@pytest.fixture
def fast_switching() -> Iterator[None]:
    """Switch threads every microsecond (restored afterwards), so races happen at every bytecode."""
    previous = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        yield
    finally:
        sys.setswitchinterval(previous)


def numbered(count: int) -> list[bytes]:
    return [b"%06d" % number for number in range(count)]


def fill(queue_dir: pathlib.Path, records: list[bytes]) -> None:
    with segq.Sender(queue_dir, segment_size=SMALL) as tx:
        for start in range(0, len(records), 100):
            tx.send_batch(records[start : start + 100])


class Consumers:
    """Threads that share one Receiver and log what each commit covered, in commit order."""

    def __init__(self, receiver: segq.Receiver, stop_after: int) -> None:
        self.receiver = receiver
        self.stop_after = stop_after
        self.committed: list[bytes] = []  # appended under the receiver's own commit order (see _commit)
        self.positions: list[segq.Position] = []
        self.errors: list[BaseException] = []
        self._log = threading.Lock()

    def done(self) -> bool:
        return len(self.committed) >= self.stop_after

    def _commit(self, commit: Callable[[], None], data: list[bytes]) -> None:
        # The log lock is held across the commit so the log's order is the
        # commit order; a UsageError (someone rolled it back first) logs nothing.
        with self._log:
            try:
                commit()
            except segq.UsageError:
                return
            self.committed += data
            self.positions.append(self.receiver.committed_position)

    def _log_if_moved(self, before: segq.Position, data: list[bytes]) -> None:
        # Called with the log lock held: only this thread can have committed meanwhile.
        after = self.receiver.committed_position
        if after != before:
            self.committed += data
            self.positions.append(after)

    def step(self, operation: str) -> None:
        rx = self.receiver
        try:
            if operation == "try_recv+commit":
                message = rx.try_recv()
                if message is not None:
                    self._commit(message.commit, [message.data])
            elif operation in ("recv+commit", "recv+rollback"):
                message = rx.recv(timeout=0.001)
                if operation == "recv+commit":
                    self._commit(message.commit, [message.data])
                else:
                    message.rollback()
            elif operation == "with recv":
                with self._log:  # leaving the block commits; another thread may have rolled it back first
                    before = rx.committed_position
                    with rx.recv(timeout=0.001) as message:
                        pass
                    self._log_if_moved(before, [message.data])
            elif operation in ("batch+commit", "batch+rollback"):
                batch = rx.recv_batch(7, timeout=0.001)
                if operation == "batch+commit":
                    self._commit(batch.commit, [message.data for message in batch])
                else:
                    batch.rollback()
            elif operation == "rollback what is pending":
                rx.rollback()
            elif operation == "iterate":
                with self._log:
                    before = rx.committed_position
                    iterator = iter(rx)
                    first = next(iterator)
                    try:
                        next(iterator)  # commits the first (unless another thread rolled it back)
                    finally:
                        iterator.close()  # leaving the loop rolls the second back
                        self._log_if_moved(before, [first.data])
        except (segq.Empty, segq.UsageError):
            pass  # another thread's receive was outstanding, or nothing was ready
        except BaseException as error:  # noqa: BLE001 - reported by the test
            self.errors.append(error)

    def run(self, script: list[str]) -> None:
        deadline = time.monotonic() + PATIENCE
        while not self.done() and not self.errors and time.monotonic() < deadline:
            for operation in script:
                self.step(operation)
                if self.done():
                    return


@pytest.mark.usefixtures("fast_switching")
@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    scripts=st.lists(st.lists(st.sampled_from(OPERATIONS), min_size=1, max_size=6), min_size=2, max_size=4),
    stop_after=st.integers(min_value=50, max_value=1500),
)
def test_threads_sharing_a_receiver_commit_each_record_once_in_order(
    tmp_path_factory: pytest.TempPathFactory, scripts: list[list[str]], stop_after: int
) -> None:
    queue_dir = tmp_path_factory.mktemp("threads") / "queue"
    records = numbered(2000)
    fill(queue_dir, records)
    rx = segq.Receiver(queue_dir)
    consumers = Consumers(rx, stop_after)
    # Every script also polls and commits, so the threads make progress whatever else they do.
    threads = [threading.Thread(target=consumers.run, args=(script + ["try_recv+commit"],)) for script in scripts]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(PATIENCE)
    rx.close()
    assert not any(thread.is_alive() for thread in threads)
    assert consumers.errors == []
    committed = consumers.committed
    # No record twice, none skipped: the committed records are the queue's first ones, in order.
    assert committed == records[: len(committed)]
    assert len(committed) >= stop_after
    assert consumers.positions == sorted(consumers.positions)  # the position never moved back
    record_figure("thread interleavings tried on one receiver", 1)
    record_figure("records committed by threads sharing one receiver", len(committed))
    with segq.Receiver(queue_dir) as fresh:  # resumes exactly where the commits stopped
        assert fresh.committed_position == consumers.positions[-1]
        following = fresh.try_recv()
        expected = records[len(committed)] if len(committed) < len(records) else None
        assert (following.data if following is not None else None) == expected


def test_a_second_thread_receiving_while_one_waits_gets_usage_error_at_once(queue_dir: pathlib.Path) -> None:
    with segq.Receiver(queue_dir, create=True) as rx, segq.Sender(queue_dir, segment_size=SMALL) as tx:
        got: list[bytes] = []
        waiting = threading.Thread(target=lambda: got.append(rx.recv(timeout=PATIENCE).data))
        waiting.start()
        deadline = time.monotonic() + PATIENCE
        while not rx._waiting and time.monotonic() < deadline:
            time.sleep(0.001)
        for call in (lambda: rx.recv(timeout=5), rx.try_recv, lambda: rx.recv_batch(5, timeout=5)):
            started = time.monotonic()
            with pytest.raises(segq.UsageError, match="already waiting"):
                call()
            assert time.monotonic() - started < 1.0  # at once, not after the other's wait
        tx.send(b"for the waiting one")
        waiting.join(PATIENCE)
        assert got == [b"for the waiting one"]
        with pytest.raises(segq.UsageError, match="pending"):
            rx.try_recv()
        rx.commit()
        assert rx.try_recv() is None


def test_closing_from_another_thread_wakes_a_waiting_recv_with_closed(queue_dir: pathlib.Path) -> None:
    rx = segq.Receiver(queue_dir, create=True)
    outcome: list[BaseException] = []

    def wait() -> None:
        try:
            rx.recv()
        except BaseException as error:  # noqa: BLE001 - checked below
            outcome.append(error)

    waiting = threading.Thread(target=wait)
    waiting.start()
    deadline = time.monotonic() + PATIENCE
    while not rx._waiting and time.monotonic() < deadline:
        time.sleep(0.001)
    started = time.monotonic()
    rx.close()
    waiting.join(PATIENCE)
    assert time.monotonic() - started < 1.0  # woken, not found by the safety re-check
    assert len(outcome) == 1 and isinstance(outcome[0], segq.Closed)
    with segq.Receiver(queue_dir):  # the name's lock was released
        pass


def test_a_recv_that_times_out_in_a_thread_leaves_nothing_behind(queue_dir: pathlib.Path) -> None:
    with segq.Receiver(queue_dir, create=True) as rx:
        with pytest.raises(segq.Empty):
            rx.recv(timeout=0.01)
        with pytest.raises(segq.Empty):
            rx.recv_batch(3, timeout=0.01)
        with segq.Sender(queue_dir) as tx:
            tx.send(b"next")
        assert rx.recv(timeout=PATIENCE).data == b"next"


async def test_tasks_sharing_an_async_receiver_commit_each_record_once(queue_dir: pathlib.Path) -> None:
    records = numbered(300)
    fill(queue_dir, records)
    committed: list[bytes] = []
    refused = 0
    # sync="always": commits run on a worker thread while the loop's tasks keep receiving.
    async with segq.AsyncReceiver(queue_dir, sync="always") as rx:

        async def consume() -> None:
            nonlocal refused
            while len(committed) < len(records):
                try:
                    async with await rx.recv(timeout=0.05) as message:
                        data = message.data
                except (segq.UsageError, segq.Empty):
                    refused += 1
                    await asyncio.sleep(0)
                    continue
                committed.append(data)

        await asyncio.wait_for(asyncio.gather(*(consume() for _ in range(4))), PATIENCE)
        assert rx.try_recv() is None
    assert committed == records
    assert refused > 0  # the tasks did contend


async def test_a_task_cannot_take_a_record_while_another_waits(queue_dir: pathlib.Path) -> None:
    async with segq.AsyncReceiver(queue_dir, create=True) as rx:
        waiting = asyncio.create_task(rx.recv())
        while not rx._wait.active:
            await asyncio.sleep(0.001)
        with pytest.raises(segq.UsageError, match="already waiting"):
            rx.try_recv()
        with segq.Sender(queue_dir) as tx:
            tx.send(b"for the waiting task")
        message = await asyncio.wait_for(waiting, PATIENCE)
        assert message.data == b"for the waiting task"
        await message.commit()


# -- a queue deleted (and made again) under a waiting receiver -----------------


def test_a_waiting_recv_notices_its_queue_deleted_and_made_again(queue_dir: pathlib.Path) -> None:
    import shutil

    with segq.Sender(queue_dir, segment_size=SMALL) as tx:
        tx.send(b"old")
    rx = segq.Receiver(queue_dir)
    rx.recv(timeout=PATIENCE).commit()
    outcome: list[BaseException] = []

    def wait() -> None:
        try:
            rx.recv(timeout=PATIENCE)
        except BaseException as error:  # noqa: BLE001 - checked below
            outcome.append(error)

    waiting = threading.Thread(target=wait)
    waiting.start()
    try:
        deadline = time.monotonic() + PATIENCE
        while not (rx._waiter is not None and rx._waiter.raised) and time.monotonic() < deadline:
            time.sleep(0.001)  # until it sleeps: its wake-up files are made by then
        shutil.rmtree(queue_dir)
        with segq.Sender(queue_dir, segment_size=SMALL) as tx:
            tx.send(b"new")
        started = time.monotonic()
        waiting.join(PATIENCE)
        assert time.monotonic() - started < 5.0  # noticed within the once-a-second check
        assert len(outcome) == 1 and type(outcome[0]) is segq.SegqError
        assert str(queue_dir) in str(outcome[0]) and "deleted" in str(outcome[0])
    finally:
        rx.close()
    with segq.Receiver(queue_dir) as fresh:  # the new queue reads as usual
        assert fresh.recv(timeout=PATIENCE).data == b"new"


async def test_an_async_recv_notices_its_queue_deleted(queue_dir: pathlib.Path) -> None:
    import shutil

    async with segq.AsyncReceiver(queue_dir, create=True) as rx:
        waiting = asyncio.create_task(rx.recv())
        while not rx._wait.active:
            await asyncio.sleep(0.001)
        await asyncio.sleep(0.01)  # into its sleep: its wake-up files are made by then
        shutil.rmtree(queue_dir)
        with pytest.raises(segq.SegqError, match="was deleted"):
            await asyncio.wait_for(waiting, PATIENCE)


def test_recv_follow_exits_with_an_error_when_its_queue_is_deleted_and_made_again(queue_dir: pathlib.Path) -> None:
    import os
    import shutil
    import subprocess

    with segq.Sender(queue_dir, segment_size=SMALL) as tx:
        tx.send(b"old")
    environment = dict(os.environ, PYTHONPATH=str(pathlib.Path(__file__).resolve().parent.parent))
    follower = subprocess.Popen(
        [sys.executable, "-m", "segq", "recv", str(queue_dir), "--follow"],
        env=environment,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert follower.stdout is not None and follower.stdout.readline() == b"old\n"
        time.sleep(0.2)  # let it commit and go to sleep: its wake-up files are made by then
        shutil.rmtree(queue_dir)
        with segq.Sender(queue_dir, segment_size=SMALL) as tx:
            tx.send(b"new")
        stdout, stderr = follower.communicate(timeout=PATIENCE)
        assert follower.returncode == 1
        assert stdout == b""  # nothing of the new queue was taken for the old one's
        lines = stderr.decode().strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("Error: ") and "was deleted" in lines[0], stderr
    finally:
        if follower.poll() is None:
            follower.kill()
            follower.communicate()
    with segq.Receiver(queue_dir) as fresh:  # the new queue's record is still there for a new follower
        assert fresh.recv(timeout=PATIENCE).data == b"new"
