"""AsyncSender and AsyncReceiver as their docstrings and the README's asyncio section describe them.

Every wait here is bounded generously and nothing asserts on elapsed time:
where a test must prove that a wake-up came through the FIFO (and not from
the once-a-second safety re-check), it switches the safety net off.
"""

from __future__ import annotations

import asyncio
import pathlib
import queue
import subprocess
import threading
from collections.abc import Callable

import pytest

import segq
import segq.aio
from segq._control import DATA_WAITERS, ROOM_WAITERS, SLOT_COUNT
from segq._wake import Waiter

from _loop import PATIENCE, child, count_raised, eventually

SEND_FROM_CHILD = """
import sys, time, segq
path, count, pause = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
with segq.Sender(path) as tx:
    for number in range(count):
        tx.send(b"record %d" % number)
        time.sleep(pause)
"""


def start_child_sender(queue_dir: pathlib.Path, count: int, pause: float = 0.0) -> subprocess.Popen[bytes]:
    return child(SEND_FROM_CHILD, queue_dir, count, pause)


def is_waiting(rx: segq.AsyncReceiver) -> bool:
    """Tell whether a recv on ``rx`` is parked on the loop (flag raised, reader registered)."""
    return rx._wait._woken is not None


def raised_flags(rx: segq.AsyncReceiver, region: int = DATA_WAITERS) -> int:
    return count_raised(rx._receiver._control.map, region)


def assert_idle(rx: segq.AsyncReceiver) -> None:
    """Nothing left behind by a recv that ended: no wait, no flag, no reader, nothing pending."""
    assert not rx._wait.active
    assert raised_flags(rx) == 0
    waiter = rx._receiver._waiter
    if waiter is not None and waiter.fileno() >= 0:
        assert not asyncio.get_running_loop().remove_reader(waiter.fileno()), "a reader was left registered"
    assert rx._receiver._pending is None


# -- the basic contract ------------------------------------------------------


async def test_send_and_receive_with_async_context_managers(queue_dir: pathlib.Path) -> None:
    async with segq.AsyncSender(queue_dir, segment_size=4096) as tx:
        for number in range(200):  # several segments
            await tx.send(b"record %d" % number)
        await tx.send_batch([b"batch a", bytearray(b"batch b"), memoryview(b"")])
    async with segq.AsyncReceiver(queue_dir) as rx:
        for number in range(200):
            async with await rx.recv(timeout=PATIENCE) as msg:
                assert msg.data == b"record %d" % number
            assert not msg.pending
        async with await rx.recv_batch(10, timeout=PATIENCE) as batch:
            assert [m.data for m in batch] == [b"batch a", b"batch b", b""]
            assert len(batch) == 3 and batch[0].data == b"batch a"
        assert rx.try_recv() is None
    async with segq.AsyncReceiver(queue_dir) as rx:
        assert rx.try_recv() is None  # everything was committed


async def test_an_exception_in_async_with_rolls_back(queue_dir: pathlib.Path) -> None:
    async with segq.AsyncSender(queue_dir) as tx:
        await tx.send_batch([b"one", b"two"])
    async with segq.AsyncReceiver(queue_dir) as rx:
        with pytest.raises(RuntimeError):
            async with await rx.recv(timeout=PATIENCE):
                raise RuntimeError("handler failed")
        with pytest.raises(RuntimeError):
            async with await rx.recv_batch(5, timeout=PATIENCE):
                raise RuntimeError("handler failed")
        msg = await rx.recv(timeout=PATIENCE)
        assert msg.data == b"one"
        await msg.rollback()
        msg = await rx.recv(timeout=PATIENCE)
        await rx.commit()
        assert not msg.pending
        with pytest.raises(segq.UsageError):
            await msg.commit()
        msg = await rx.recv(timeout=PATIENCE)
        assert msg.data == b"two"
        with pytest.raises(segq.UsageError, match="pending"):
            await rx.recv()
        await rx.rollback()


async def test_a_cancelled_handler_rolls_its_message_back(queue_dir: pathlib.Path) -> None:
    async with segq.AsyncSender(queue_dir) as tx:
        await tx.send(b"job")
    async with segq.AsyncReceiver(queue_dir) as rx:
        started = asyncio.Event()

        async def handle() -> None:
            async with await rx.recv(timeout=PATIENCE):
                started.set()
                await asyncio.sleep(3600)

        task = asyncio.create_task(handle())
        await asyncio.wait_for(started.wait(), PATIENCE)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert_idle(rx)
        assert (await rx.recv(timeout=PATIENCE)).data == b"job"


async def test_async_for_commits_when_asked_for_the_next_and_gives_back_on_break_or_error(
    queue_dir: pathlib.Path,
) -> None:
    async with segq.AsyncSender(queue_dir) as tx:
        await tx.send_batch([b"0", b"1", b"2", b"3"])
    async with segq.AsyncReceiver(queue_dir) as rx:
        seen = []
        async for msg in rx:
            seen.append(msg.data)
            if msg.data == b"1":
                break
        assert seen == [b"0", b"1"]
        assert not msg.pending  # "1" was given back when the loop was left
        with pytest.raises(KeyError):
            async for msg in rx:
                seen.append(msg.data)
                if msg.data == b"2":
                    raise KeyError("handler failed")
        assert seen == [b"0", b"1", b"1", b"2"]
        assert not msg.pending
        async for msg in rx:
            assert msg.data == b"2"  # the failed one comes again
            break
    async with segq.AsyncReceiver(queue_dir) as rx:
        assert (await rx.recv(timeout=PATIENCE)).data == b"2"  # "0" and "1" stayed committed


async def test_timeouts_raise_empty(queue_dir: pathlib.Path) -> None:
    async with segq.AsyncReceiver(queue_dir, create=True) as rx:
        with pytest.raises(segq.Empty):
            await rx.recv(timeout=0)
        with pytest.raises(queue.Empty):
            await rx.recv(timeout=0.05)
        with pytest.raises(segq.Empty):
            await rx.recv_batch(5, timeout=0.05)
        with pytest.raises(segq.InvalidArgument):
            await rx.recv_batch(0)
        assert_idle(rx)


# -- waking up -------------------------------------------------------------


async def test_a_send_from_another_process_wakes_a_waiting_recv(queue_dir: pathlib.Path, no_safety_net: None) -> None:
    async with segq.AsyncReceiver(queue_dir, create=True) as rx:
        task = asyncio.create_task(rx.recv())
        await eventually(lambda: is_waiting(rx), "the receiver to wait")
        child = start_child_sender(queue_dir, 1)
        try:
            msg = await asyncio.wait_for(task, PATIENCE)
        finally:
            assert child.wait(PATIENCE) == 0
        assert msg.data == b"record 0"
        await msg.commit()
        assert_idle(rx)


async def test_many_receivers_of_different_names_wait_in_one_loop_without_threads_or_polling(
    queue_dir: pathlib.Path, no_safety_net: None
) -> None:
    receivers = [segq.AsyncReceiver(queue_dir, f"consumer-{number}", create=True) for number in range(20)]
    checks = [0] * len(receivers)
    for number, rx in enumerate(receivers):
        data_ready = rx._receiver._data_ready

        def counted(number: int = number, data_ready: Callable[[], bool] = data_ready) -> bool:
            checks[number] += 1
            return data_ready()

        rx._receiver._data_ready = counted  # type: ignore[method-assign]
    threads_before = threading.active_count()
    try:
        tasks = [asyncio.create_task(rx.recv()) for rx in receivers]
        await eventually(lambda: all(is_waiting(rx) for rx in receivers), "every receiver to wait")
        assert raised_flags(receivers[0]) == len(receivers)
        assert threading.active_count() == threads_before
        checks_while_parked = list(checks)
        await asyncio.sleep(0.2)  # however long this really lasts, a parked receiver checks nothing
        assert checks == checks_while_parked

        child = start_child_sender(queue_dir, 1)
        messages = await asyncio.wait_for(asyncio.gather(*tasks), PATIENCE)
        assert child.wait(PATIENCE) == 0
        assert [msg.data for msg in messages] == [b"record 0"] * len(receivers)
        for msg in messages:
            await msg.commit()
        for rx in receivers:
            assert_idle(rx)
    finally:
        for rx in receivers:
            await rx.close()


async def test_a_full_waiter_table_falls_back_to_polling(queue_dir: pathlib.Path) -> None:
    async with segq.AsyncSender(queue_dir) as tx, segq.AsyncReceiver(queue_dir) as rx:
        control = rx._receiver._control
        squatters = [Waiter(control) for _ in range(SLOT_COUNT)]
        try:
            task = asyncio.create_task(rx.recv())
            await eventually(lambda: rx._wait.active, "the receiver to wait")
            assert rx._receiver._waiter is not None and rx._receiver._waiter.fileno() == -1
            await tx.send(b"polled")
            assert (await asyncio.wait_for(task, PATIENCE)).data == b"polled"
        finally:
            for waiter in squatters:
                waiter.close()


# -- cancellation and closing ---------------------------------------------


async def test_a_cancelled_recv_leaves_nothing_pending_and_loses_nothing(
    queue_dir: pathlib.Path, no_safety_net: None
) -> None:
    async with segq.AsyncSender(queue_dir) as tx, segq.AsyncReceiver(queue_dir) as rx:
        task = asyncio.create_task(rx.recv())
        await eventually(lambda: is_waiting(rx), "the receiver to wait")
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert_idle(rx)

        # Cancelled in the very step its wake-up is written: the record must stay queued.
        task = asyncio.create_task(rx.recv())
        await eventually(lambda: is_waiting(rx), "the receiver to wait")
        await tx.send(b"first")
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert_idle(rx)
        assert (await rx.recv(timeout=PATIENCE)).data == b"first"
        await rx.commit()


async def test_wait_for_times_out_cleanly_and_returns_what_arrives(queue_dir: pathlib.Path) -> None:
    async with segq.AsyncSender(queue_dir) as tx, segq.AsyncReceiver(queue_dir) as rx:
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(rx.recv(), 0.05)
        assert_idle(rx)
        await tx.send(b"on time")
        msg = await asyncio.wait_for(rx.recv(), PATIENCE)
        assert msg.data == b"on time"
        await msg.commit()


@pytest.mark.skipif(not hasattr(asyncio, "timeout"), reason="asyncio.timeout is new in Python 3.11")
async def test_asyncio_timeout_times_out_cleanly(queue_dir: pathlib.Path) -> None:
    async with segq.AsyncSender(queue_dir) as tx, segq.AsyncReceiver(queue_dir) as rx:
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.05):
                await rx.recv()
        assert_idle(rx)
        async with asyncio.timeout(PATIENCE):
            await tx.send(b"again")
            assert (await rx.recv()).data == b"again"


async def test_a_storm_of_timeouts_loses_and_repeats_nothing(queue_dir: pathlib.Path) -> None:
    count = 300
    async with segq.AsyncReceiver(queue_dir, create=True) as rx:
        child = start_child_sender(queue_dir, count, pause=0.0005)
        received: list[bytes] = []
        timeouts = 0
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 4 * PATIENCE
        try:
            while len(received) < count and loop.time() < deadline:
                budget = (0.0, 0.0002, 0.001, 0.003)[len(received) % 4]
                try:
                    if timeouts % 2 and hasattr(asyncio, "timeout"):
                        async with asyncio.timeout(budget):
                            msg = await rx.recv()
                    else:
                        msg = await asyncio.wait_for(rx.recv(), budget)
                except asyncio.TimeoutError:
                    timeouts += 1
                    assert rx._receiver._pending is None
                    continue
                received.append(msg.data)
                await msg.commit()
        finally:
            assert child.wait(PATIENCE) == 0
        assert received == [b"record %d" % number for number in range(count)]
        assert timeouts > 0
        assert_idle(rx)


async def test_two_tasks_cannot_wait_on_one_receiver(queue_dir: pathlib.Path) -> None:
    async with segq.AsyncReceiver(queue_dir, create=True) as rx:
        first = asyncio.create_task(rx.recv())
        await eventually(lambda: is_waiting(rx), "the receiver to wait")
        with pytest.raises(segq.UsageError, match="already waiting"):
            await rx.recv()
        first.cancel()
        with pytest.raises(asyncio.CancelledError):
            await first
        assert_idle(rx)


async def test_closing_wakes_a_waiting_recv_with_closed(queue_dir: pathlib.Path) -> None:
    rx = segq.AsyncReceiver(queue_dir, create=True)
    task = asyncio.create_task(rx.recv())
    await eventually(lambda: is_waiting(rx), "the receiver to wait")
    fd = rx._receiver._data_waiter().fileno()
    await rx.close()
    with pytest.raises(segq.Closed):
        await task
    assert not asyncio.get_running_loop().remove_reader(fd)
    await rx.close()  # idempotent
    with pytest.raises(segq.Closed):
        await rx.recv()
    with pytest.raises(segq.Closed):
        rx.try_recv()
    async with segq.AsyncReceiver(queue_dir):  # the name's lock was released
        pass


# -- the sender --------------------------------------------------------------


async def test_backpressure_waits_on_the_loop_and_a_cancelled_send_writes_nothing(
    queue_dir: pathlib.Path, no_safety_net: None
) -> None:
    record = b"x" * 50
    async with segq.AsyncReceiver(queue_dir, create=True) as rx, segq.AsyncSender(queue_dir, max_queue_bytes=200) as tx:
        sent = 0
        with pytest.raises(segq.Full):
            while True:
                await tx.send(record, timeout=0.01)
                sent += 1
        assert sent >= 1
        with pytest.raises(segq.Full):
            await tx.send(b"y" * 500)  # can never fit: refused at once, even with no timeout

        threads_before = threading.active_count()
        cancelled = asyncio.create_task(tx.send(b"n" * len(record)))  # never sent
        await eventually(lambda: tx._wait._woken is not None, "the send to wait for room")
        assert threading.active_count() == threads_before
        cancelled.cancel()
        with pytest.raises(asyncio.CancelledError):
            await cancelled
        assert raised_flags(rx, ROOM_WAITERS) == 0

        blocked = asyncio.create_task(tx.send(b"l" * len(record)))
        await eventually(lambda: tx._wait._woken is not None, "the send to wait for room")
        assert not blocked.done()
        async with await rx.recv(timeout=PATIENCE):
            pass  # committing makes room: the send goes through
        await asyncio.wait_for(blocked, PATIENCE)
        received = []
        while (msg := rx.try_recv()) is not None:
            received.append(msg.data)
            await msg.commit()
        assert received == [record] * (sent - 1) + [b"l" * len(record)]


async def test_sync_always_runs_syncs_off_the_loop_and_keeps_order(queue_dir: pathlib.Path) -> None:
    async with segq.AsyncSender(queue_dir, sync="always") as tx:
        await asyncio.gather(*(tx.send(b"%d" % number) for number in range(20)))
        await tx.send_batch([b"a", b"b"])
        await tx.flush()
        await tx.sync()
    async with segq.AsyncReceiver(queue_dir, sync="always") as rx:
        got = []
        async for msg in rx:
            got.append(msg.data)
            if len(got) == 22:
                await msg.commit()
                break
        assert got == [b"%d" % number for number in range(20)] + [b"a", b"b"]
    async with segq.AsyncReceiver(queue_dir, sync=0.05) as rx:
        assert rx.try_recv() is None


async def test_a_closed_sender_refuses_and_errors_match_the_blocking_sender(queue_dir: pathlib.Path) -> None:
    tx = segq.AsyncSender(queue_dir, segment_size=4096)
    with pytest.raises(segq.RecordTooLarge):
        await tx.send(b"z" * 5000)
    with pytest.raises(TypeError, match="encode"):
        await tx.send("text")  # type: ignore[arg-type]
    await tx.close()
    await tx.close()
    with pytest.raises(segq.Closed):
        await tx.send(b"late")
    with pytest.raises(segq.Closed):
        await tx.sync()
    assert "closed" in repr(tx)
