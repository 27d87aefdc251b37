"""AsyncWorkQueue: WorkQueue's semantics, with claims waiting on the event loop.

Every wait is bounded generously and nothing asserts on elapsed time: where a
test must prove what woke a claim (the FIFO, a pidfd, the lease-end timer)
and not the once-a-second safety re-check, it switches the safety net off.
"""

from __future__ import annotations

import asyncio
import pathlib
import signal
import subprocess
import threading

import pytest

import segq
import segq.aio
from segq._control import CLAIM_WAITERS

from _loop import PATIENCE, child, count_raised, eventually

SEND_FROM_CHILD = """
import sys, segq
path, count = sys.argv[1], int(sys.argv[2])
with segq.Sender(path) as tx:
    for number in range(count):
        tx.send(b"record %d" % number)
"""

CLAIM_IN_CHILD_AND_HANG = """
import sys, time, segq
wq = segq.WorkQueue(sys.argv[1], lease=3600)
job = wq.claim(timeout=30)
print(job.data.decode(), flush=True)
time.sleep(3600)
"""


async def send(queue_dir: pathlib.Path, *records: bytes) -> None:
    async with segq.AsyncSender(queue_dir) as tx:
        await tx.send_batch(records)


def is_waiting(wq: segq.AsyncWorkQueue) -> bool:
    """Tell whether a claim on ``wq`` is parked on the loop (flag raised, readers registered)."""
    return wq._wait._woken is not None


def raised_flags(wq: segq.AsyncWorkQueue) -> int:
    """Count the claimers waiting (their flags are apart from the receivers')."""
    return count_raised(wq._queue._control.map, CLAIM_WAITERS)


def assert_idle(wq: segq.AsyncWorkQueue) -> None:
    """Nothing left behind by a claim that ended: no wait, no flag, no reader, nothing claimed."""
    assert not wq._wait.active
    assert raised_flags(wq) == 0
    waiter = getattr(wq._queue._waiters, "waiter", None)
    if waiter is not None and waiter.fileno() >= 0:
        assert not asyncio.get_running_loop().remove_reader(waiter.fileno()), "a reader was left registered"
    assert not wq._queue._held


def claim_elsewhere(queue_dir: pathlib.Path) -> bytes:
    """Claim and ack one record through another WorkQueue of the group: it must be claimable now."""
    with segq.WorkQueue(queue_dir) as other:
        job = other.try_claim()
        assert job is not None, "the record should be claimable at once"
        job.ack()
        return job.data


# -- the basic contract ------------------------------------------------------


async def test_claim_ack_nack_renew_and_batches(queue_dir: pathlib.Path) -> None:
    await send(queue_dir, b"a", b"b", b"c", b"d", b"e")
    async with segq.AsyncWorkQueue(queue_dir, lease=60) as wq:
        job = await wq.claim(timeout=PATIENCE)
        assert (job.data, job.attempt, job.state) == (b"a", 1, segq.workqueue.JobState.HELD)
        before = job.lease_expires_at
        await job.renew(120)
        assert job.lease_expires_at > before
        await job.nack()
        again = await wq.claim(timeout=PATIENCE)
        assert (again.data, again.attempt) == (b"a", 2)  # given back: it comes first, attempt counted
        await again.ack()
        with pytest.raises(segq.UsageError, match="acked"):
            await again.ack()

        async with await wq.claim(timeout=PATIENCE) as job:
            assert job.data == b"b"
        assert job.state is segq.workqueue.JobState.ACKED
        with pytest.raises(RuntimeError):
            async with await wq.claim(timeout=PATIENCE) as job:
                raise RuntimeError("handler failed")
        assert job.state is segq.workqueue.JobState.NACKED

        async with await wq.claim_batch(10, timeout=PATIENCE) as batch:
            assert [(job.data, job.attempt) for job in batch] == [(b"c", 2), (b"d", 1), (b"e", 1)]
            assert len(batch) == 3 and batch[1].data == b"d"
            await batch[0].ack()  # one by one, then the rest together on exit
        assert all(job.state is segq.workqueue.JobState.ACKED for job in batch)
        assert await wq.try_claim() is None
        with pytest.raises(segq.Empty):
            await wq.claim(timeout=0)
        with pytest.raises(segq.Empty):
            await wq.claim_batch(3, timeout=0.05)
        with pytest.raises(segq.InvalidArgument):
            await wq.claim_batch(0)
        assert_idle(wq)
    with segq.WorkQueue(queue_dir) as blocking:
        assert blocking.try_claim() is None  # everything was acked


async def test_async_for_acks_when_asked_for_the_next_and_nacks_on_break_or_error(queue_dir: pathlib.Path) -> None:
    await send(queue_dir, b"0", b"1", b"2", b"3")
    async with segq.AsyncWorkQueue(queue_dir) as wq:
        seen = []
        async for job in wq:
            seen.append((job.data, job.attempt))
            if job.data == b"1":
                break
        assert job.state is segq.workqueue.JobState.NACKED
        with pytest.raises(KeyError):
            async for job in wq:
                seen.append((job.data, job.attempt))
                if job.data == b"2":
                    raise KeyError("handler failed")
        assert job.state is segq.workqueue.JobState.NACKED
        assert seen == [(b"0", 1), (b"1", 1), (b"1", 2), (b"2", 1)]
        async for job in wq:
            assert (job.data, job.attempt) == (b"2", 2)  # the failed one comes again
            await job.ack()
            break
        async for job in wq:
            assert job.data == b"3"
            break
    with segq.WorkQueue(queue_dir) as blocking:
        left = blocking.try_claim()
        assert left is not None and (left.data, left.attempt) == (b"3", 2)  # "0", "1" and "2" stayed acked
        left.ack()
        assert blocking.try_claim() is None


async def test_sync_always_runs_on_the_worker_thread_and_keeps_the_semantics(queue_dir: pathlib.Path) -> None:
    await send(queue_dir, *(b"%d" % number for number in range(6)))
    async with segq.AsyncWorkQueue(queue_dir, sync="always") as wq:
        assert wq._worker is not None
        claimed = [await wq.claim(timeout=PATIENCE) for _ in range(3)]
        await asyncio.gather(*(job.ack() for job in claimed))
        async with await wq.claim_batch(2, timeout=PATIENCE) as batch:
            await batch.renew()
        got = []
        async for job in wq:
            got.append(job.data)
            break
        assert [job.data for job in claimed] + [job.data for job in batch] + got == [b"%d" % n for n in range(6)]
        assert (await wq.claim(timeout=PATIENCE)).attempt == 2  # "5" was given back by the break
    with segq.WorkQueue(queue_dir) as blocking:
        left = blocking.try_claim()
        assert left is not None and left.data == b"5"  # close() gave it back


# -- waking up -------------------------------------------------------------


async def test_a_send_from_another_process_wakes_a_waiting_claim(queue_dir: pathlib.Path, no_safety_net: None) -> None:
    await send(queue_dir)
    async with segq.AsyncWorkQueue(queue_dir) as wq:
        task = asyncio.create_task(wq.claim())
        await eventually(lambda: is_waiting(wq), "the claim to wait")
        sender = child(SEND_FROM_CHILD, queue_dir, 1)
        try:
            job = await asyncio.wait_for(task, PATIENCE)
        finally:
            assert sender.wait(PATIENCE) == 0
        assert job.data == b"record 0"
        await job.ack()
        assert_idle(wq)


async def test_a_lease_running_out_elsewhere_wakes_a_waiting_claim(
    queue_dir: pathlib.Path, no_safety_net: None
) -> None:
    await send(queue_dir, b"slow job")
    with segq.WorkQueue(queue_dir, lease=0.5) as other:
        held = other.claim(timeout=PATIENCE)
        async with segq.AsyncWorkQueue(queue_dir) as wq:
            task = asyncio.create_task(wq.claim())
            # Only the lease-end timer can wake it (a loaded machine may end the lease first).
            await eventually(lambda: is_waiting(wq) or task.done(), "the claim to wait")
            job = await asyncio.wait_for(task, PATIENCE)
            assert (job.data, job.attempt) == (b"slow job", 2)
            with pytest.raises(segq.ClaimLost):
                held.ack()
            await job.ack()
            assert_idle(wq)


async def test_a_dead_worker_s_claim_wakes_a_waiting_claim(queue_dir: pathlib.Path, no_safety_net: None) -> None:
    await send(queue_dir, b"orphan")
    worker = child(CLAIM_IN_CHILD_AND_HANG, queue_dir, stdout=subprocess.PIPE)
    try:
        assert worker.stdout is not None
        line = await asyncio.wait_for(asyncio.to_thread(worker.stdout.readline), PATIENCE)
        assert line == b"orphan\n"
        async with segq.AsyncWorkQueue(queue_dir, lease=3600) as wq:
            task = asyncio.create_task(wq.claim())
            await eventually(lambda: is_waiting(wq), "the claim to wait")
            assert wq._wait.active and wq._queue._liveness.fds()  # the holder's pidfd is watched
            worker.send_signal(signal.SIGKILL)
            job = await asyncio.wait_for(task, PATIENCE)  # woken by the pidfd: the lease is an hour
            assert (job.data, job.attempt) == (b"orphan", 2)
            await job.ack()
            assert_idle(wq)
    finally:
        worker.kill()
        worker.wait(PATIENCE)
        if worker.stdout is not None:
            worker.stdout.close()


async def test_many_work_queues_of_one_group_in_one_loop_get_distinct_records_without_threads(
    queue_dir: pathlib.Path, no_safety_net: None
) -> None:
    await send(queue_dir)
    count = 12
    workers = [segq.AsyncWorkQueue(queue_dir) for _ in range(count)]
    try:
        threads_before = threading.active_count()
        tasks = [asyncio.create_task(wq.claim()) for wq in workers]
        await eventually(lambda: all(is_waiting(wq) for wq in workers), "every claim to wait")
        assert raised_flags(workers[0]) == count
        assert threading.active_count() == threads_before
        sender = child(SEND_FROM_CHILD, queue_dir, count)
        jobs = await asyncio.wait_for(asyncio.gather(*tasks), PATIENCE)
        assert sender.wait(PATIENCE) == 0
        assert sorted(job.data for job in jobs) == sorted(b"record %d" % number for number in range(count))
        assert threading.active_count() == threads_before
        for job in jobs:
            await job.ack()
        for wq in workers:
            assert_idle(wq)
    finally:
        for wq in workers:
            await wq.close()


# -- cancellation and closing ---------------------------------------------


async def test_a_cancelled_claim_leaves_nothing_claimed(queue_dir: pathlib.Path, no_safety_net: None) -> None:
    await send(queue_dir)
    async with segq.AsyncSender(queue_dir) as tx, segq.AsyncWorkQueue(queue_dir) as wq:
        task = asyncio.create_task(wq.claim())
        await eventually(lambda: is_waiting(wq), "the claim to wait")
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert_idle(wq)

        # Cancelled in the very step its wake-up is written: the record stays claimable.
        batch_task = asyncio.create_task(wq.claim_batch(5))
        await eventually(lambda: is_waiting(wq), "the claim to wait")
        await tx.send(b"first")
        batch_task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await batch_task
        assert_idle(wq)
        assert claim_elsewhere(queue_dir) == b"first"


async def test_wait_for_and_asyncio_timeout_end_a_claim_cleanly(queue_dir: pathlib.Path) -> None:
    await send(queue_dir)
    async with segq.AsyncSender(queue_dir) as tx, segq.AsyncWorkQueue(queue_dir) as wq:
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(wq.claim(), 0.05)
        assert_idle(wq)
        await tx.send(b"one")
        assert claim_elsewhere(queue_dir) == b"one"
        if hasattr(asyncio, "timeout"):
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.05):
                    await wq.claim_batch(3)
            assert_idle(wq)
            await tx.send(b"two")
            assert claim_elsewhere(queue_dir) == b"two"
        await tx.send(b"three")
        job = await asyncio.wait_for(wq.claim(), PATIENCE)
        assert job.data == b"three"
        await job.ack()


async def test_a_cancelled_handler_nacks_its_job(queue_dir: pathlib.Path) -> None:
    await send(queue_dir, b"job")
    async with segq.AsyncWorkQueue(queue_dir) as wq:
        started = asyncio.Event()

        async def handle() -> None:
            async with await wq.claim(timeout=PATIENCE):
                started.set()
                await asyncio.sleep(3600)

        task = asyncio.create_task(handle())
        await asyncio.wait_for(started.wait(), PATIENCE)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert_idle(wq)
        job = await wq.claim(timeout=PATIENCE)
        assert (job.data, job.attempt) == (b"job", 2)
        await job.ack()


async def test_a_claim_cancelled_on_the_worker_thread_gives_its_job_back(queue_dir: pathlib.Path) -> None:
    await send(queue_dir, b"job")
    async with segq.AsyncWorkQueue(queue_dir, sync="always") as wq:
        task = asyncio.create_task(wq.claim(timeout=PATIENCE))
        await asyncio.sleep(0)  # the claim is on the worker thread now (or done)
        task.cancel()
        try:
            job = await task
            await job.nack()  # it finished before the cancel landed: give it back by hand
        except asyncio.CancelledError:
            pass
        await eventually(lambda: not wq._queue._held, "the job to be given back")
        got = await wq.claim(timeout=PATIENCE)
        assert (got.data, got.attempt) == (b"job", 2)
        await got.ack()


async def test_many_tasks_claim_through_one_work_queue(queue_dir: pathlib.Path, no_safety_net: None) -> None:
    await send(queue_dir)
    count = 8
    async with segq.AsyncWorkQueue(queue_dir) as wq:
        threads_before = threading.active_count()
        tasks = [asyncio.create_task(wq.claim()) for _ in range(count)]
        await eventually(lambda: is_waiting(wq) and wq._turn_over is not None, "the tasks to wait")
        assert raised_flags(wq) == 1  # one slot, however many tasks
        assert threading.active_count() == threads_before
        sender = child(SEND_FROM_CHILD, queue_dir, count)
        jobs = await asyncio.wait_for(asyncio.gather(*tasks), PATIENCE)
        assert sender.wait(PATIENCE) == 0
        assert sorted(job.data for job in jobs) == sorted(b"record %d" % number for number in range(count))
        await asyncio.gather(*(job.ack() for job in jobs))
        assert_idle(wq)


async def test_cancelling_the_watching_task_hands_the_wait_on(queue_dir: pathlib.Path, no_safety_net: None) -> None:
    await send(queue_dir)
    async with segq.AsyncSender(queue_dir) as tx, segq.AsyncWorkQueue(queue_dir) as wq:
        first = asyncio.create_task(wq.claim())
        await eventually(lambda: is_waiting(wq), "the first claim to wait")
        second = asyncio.create_task(wq.claim())
        timed_out = asyncio.create_task(wq.claim(timeout=0.05))
        await eventually(lambda: wq._turn_over is not None, "the others to queue up")
        with pytest.raises(segq.Empty):
            await asyncio.wait_for(timed_out, PATIENCE)
        first.cancel()
        with pytest.raises(asyncio.CancelledError):
            await first
        await eventually(lambda: is_waiting(wq), "the second claim to take over the wait")
        await tx.send(b"for the second")
        job = await asyncio.wait_for(second, PATIENCE)
        assert job.data == b"for the second"
        await job.ack()
        assert_idle(wq)


async def test_closing_wakes_a_waiting_claim_and_gives_held_jobs_back(queue_dir: pathlib.Path) -> None:
    await send(queue_dir, b"held")
    wq = segq.AsyncWorkQueue(queue_dir)
    held = await wq.claim(timeout=PATIENCE)
    task = asyncio.create_task(wq.claim())
    await eventually(lambda: is_waiting(wq), "the claim to wait")
    fd = wq._queue._claim_waiter().fileno()
    await wq.close()
    with pytest.raises(segq.Closed):
        await task
    assert not asyncio.get_running_loop().remove_reader(fd)
    assert held.state is segq.workqueue.JobState.NACKED
    await wq.close()  # idempotent
    with pytest.raises(segq.Closed):
        await wq.claim()
    with pytest.raises(segq.Closed):
        await wq.try_claim()
    assert "closed" in repr(wq)
    async with segq.AsyncWorkQueue(queue_dir) as again:
        job = await again.claim(timeout=PATIENCE)
        assert (job.data, job.attempt) == (b"held", 2)
        await job.ack()


async def test_async_sender_enqueue_takes_the_options_and_dedups_like_sender(queue_dir: pathlib.Path) -> None:
    async with segq.AsyncSender(queue_dir, dedup_window=30) as tx:
        assert tx.dedup_window == 30.0
        first = await tx.enqueue(b"low", priority=1, headers={"trace": b"t1"})
        later = await tx.enqueue(b"later", delay=3600)
        high = await tx.enqueue(b"high", priority=9, dedup_key="k")
        again = await tx.enqueue(b"high again", priority=9, dedup_key="k")
        named = await tx.enqueue(b"named", job_id="job-7")
        with pytest.raises(segq.DuplicateJobId):
            await tx.enqueue(b"named twice", job_id="job-7")
        with pytest.raises(segq.InvalidArgument):
            await tx.enqueue(b"bad", priority=10)
    assert not first.duplicate and not later.duplicate and not high.duplicate
    assert again == segq.Enqueued(high.id, True)
    assert named.id == "job-7"
    async with segq.AsyncWorkQueue(queue_dir, lease=60) as wq:
        claimed = [await wq.claim(timeout=1) for _ in range(3)]
        assert [job.data for job in claimed] == [b"high", b"low", b"named"]
        assert claimed[1].headers["trace"] == b"t1" and claimed[1].priority == 1 and claimed[0].id == high.id
        for job in claimed:
            await job.ack()
        assert await wq.try_claim() is None  # "later" is not due


async def test_async_sender_close_waits_for_an_enqueue_still_running(queue_dir: pathlib.Path) -> None:
    tx = segq.AsyncSender(queue_dir)
    running = asyncio.ensure_future(tx.enqueue(b"in flight", dedup_key="once"))
    await asyncio.sleep(0)  # the enqueue is on its thread
    await tx.close()
    assert (await running).duplicate is False
    with pytest.raises(segq.Closed):
        await tx.enqueue(b"after close")
    with segq.Receiver(queue_dir) as rx:
        assert rx.recv(timeout=1).data == b"in flight"
