"""run_worker and arun_worker: a handler over a group's jobs, until told to stop."""

from __future__ import annotations

import asyncio
import logging
import os
import pathlib
import signal
import subprocess
import sys
import threading
import time

import pytest

import segq
import segq.workqueue

REPO = pathlib.Path(__file__).resolve().parent.parent
PATIENCE = 30.0


def fill(queue_dir: pathlib.Path, count: int) -> None:
    with segq.Sender(queue_dir, segment_size=1 << 20) as tx:
        tx.send_batch(b"job %d" % number for number in range(count))


def pending(queue_dir: pathlib.Path) -> list[bytes]:
    """Return what is still claimable, claiming it once (the caller's test is over)."""
    left = []
    with segq.WorkQueue(queue_dir, lease=60) as wq:
        while (job := wq.try_claim()) is not None:
            left.append(job.data)
            job.ack()
    return left


def run_in_thread(target: object, *args: object, **kwargs: object) -> threading.Thread:
    thread = threading.Thread(target=target, args=args, kwargs=kwargs, daemon=True)  # type: ignore[arg-type]
    thread.start()
    return thread


@pytest.mark.parametrize("concurrency", [1, 4])
def test_run_worker_handles_every_job_once_and_returns_when_stopped(
    queue_dir: pathlib.Path, concurrency: int
) -> None:
    fill(queue_dir, 300)
    seen: list[bytes] = []
    lock = threading.Lock()
    stop = threading.Event()

    def handler(job: segq.Job) -> None:
        with lock:
            seen.append(job.data)
            if len(seen) == 300:
                stop.set()

    segq.run_worker(queue_dir, handler, concurrency=concurrency, stop=stop)
    assert sorted(seen) == sorted(b"job %d" % number for number in range(300))
    assert pending(queue_dir) == []


def test_jobs_run_concurrently_on_threads(queue_dir: pathlib.Path) -> None:
    fill(queue_dir, 4)
    stop = threading.Event()
    all_in = threading.Barrier(4, timeout=PATIENCE)

    def handler(job: segq.Job) -> None:
        all_in.wait()  # only passes if four handlers run at once
        stop.set()

    segq.run_worker(queue_dir, handler, concurrency=4, stop=stop)
    assert pending(queue_dir) == []


def test_claims_are_batched_to_the_free_threads(queue_dir: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fill(queue_dir, 64)
    sizes: list[int] = []
    original = segq.WorkQueue.claim_batch

    def recording(self: segq.WorkQueue, max_count: int, timeout: float | None = None) -> segq.JobBatch:
        batch = original(self, max_count, timeout)
        sizes.append(len(batch))
        return batch

    monkeypatch.setattr(segq.WorkQueue, "claim_batch", recording)
    stop = threading.Event()
    done: list[bytes] = []
    lock = threading.Lock()
    release = threading.Event()

    def handler(job: segq.Job) -> None:
        release.wait(PATIENCE)
        with lock:
            done.append(job.data)
            if len(done) == 64:
                stop.set()

    thread = run_in_thread(segq.run_worker, queue_dir, handler, concurrency=8, stop=stop)
    time.sleep(0.2)
    release.set()
    thread.join(PATIENCE)
    assert not thread.is_alive()
    assert sizes[0] == 8  # the first claim takes a job for every thread, in one transaction
    assert sum(sizes) == 64 and max(sizes) <= 8


def test_a_handler_exception_nacks_with_the_exception_as_reason(queue_dir: pathlib.Path) -> None:
    fill(queue_dir, 1)
    stop = threading.Event()
    attempts: list[int] = []

    def handler(job: segq.Job) -> None:
        attempts.append(job.attempt)
        if job.attempt == 2:
            stop.set()
        raise ValueError(f"cannot resize {job.data!r}")

    segq.run_worker(queue_dir, handler, max_attempts=2, stop=stop)
    assert attempts == [1, 2]
    with segq.Receiver(queue_dir / "dead" / "default") as rx:
        letter = segq.DeadLetter.decode(rx.recv(timeout=PATIENCE).data)
    assert letter.attempts == 2
    assert letter.reason == "ValueError: cannot resize b'job 0'"


def test_a_handler_returning_junk_nacks_the_job(queue_dir: pathlib.Path, caplog: pytest.LogCaptureFixture) -> None:
    fill(queue_dir, 1)
    stop = threading.Event()

    def handler(job: segq.Job) -> object:
        stop.set()
        return "done"

    segq.run_worker(queue_dir, handler, stop=stop)  # type: ignore[arg-type]
    assert "it must return None or a list of segq.Enqueue" in caplog.text
    info = segq.workqueue.group_info(queue_dir)
    assert [item["reason"] for item in info["waiting"]] == ["handler returned str, not None or a list of segq.Enqueue"]


def test_a_lost_claim_is_logged_as_such_and_the_loop_goes_on(
    queue_dir: pathlib.Path, caplog: pytest.LogCaptureFixture
) -> None:
    fill(queue_dir, 3)
    stop = threading.Event()
    handled: list[tuple[bytes, int]] = []

    def handler(job: segq.Job) -> None:
        handled.append((job.data, job.attempt))
        if job.data == b"job 0" and job.attempt == 1:
            time.sleep(0.3)  # past the lease: the ack will be refused
        if len(handled) == 4:
            stop.set()

    caplog.set_level(logging.WARNING, logger="segq.worker")
    segq.run_worker(queue_dir, handler, lease=0.1, stop=stop)
    assert "lost claim: could not ack the job at segment 0" in caplog.text
    assert (b"job 0", 2) in handled and (b"job 2", 1) in handled
    assert pending(queue_dir) == []


def test_stop_while_idle_returns_without_claiming(queue_dir: pathlib.Path) -> None:
    fill(queue_dir, 0)
    stop = threading.Event()
    thread = run_in_thread(segq.run_worker, queue_dir, lambda job: None, stop=stop)
    time.sleep(0.1)
    stop.set()
    thread.join(PATIENCE)
    assert not thread.is_alive()


def test_stop_lets_running_jobs_finish_and_claims_no_more(queue_dir: pathlib.Path) -> None:
    fill(queue_dir, 10)
    stop = threading.Event()
    started = threading.Event()
    finished: list[bytes] = []

    def handler(job: segq.Job) -> None:
        started.set()
        time.sleep(0.2)
        finished.append(job.data)

    thread = run_in_thread(segq.run_worker, queue_dir, handler, concurrency=2, stop=stop)
    started.wait(PATIENCE)
    stop.set()
    thread.join(PATIENCE)
    assert len(finished) == 2  # the two running ones ended normally, and were acked
    assert sorted(pending(queue_dir)) == sorted(set(b"job %d" % n for n in range(10)) - set(finished))


WORKER_PROCESS = """
import sys, time, segq
path, log = sys.argv[1], sys.argv[2]
def handler(job):
    with open(log, "ab") as out:
        out.write(b"start " + job.data + b"\\n")
    time.sleep(0.5)
    with open(log, "ab") as out:
        out.write(b"end " + job.data + b"\\n")
segq.run_worker(path, handler, concurrency=2, lease=30)
print("stopped", flush=True)
"""


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_and_sigint_stop_a_worker_cleanly(queue_dir: pathlib.Path, tmp_path: pathlib.Path, signum: int) -> None:
    fill(queue_dir, 10)
    log_file = tmp_path / "log"
    log_file.touch()
    worker = subprocess.Popen(
        [sys.executable, "-c", WORKER_PROCESS, str(queue_dir), str(log_file)],
        env=dict(os.environ, PYTHONPATH=str(REPO)),
        stdout=subprocess.PIPE,
    )
    deadline = time.monotonic() + PATIENCE
    while log_file.read_bytes().count(b"start") < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    worker.send_signal(signum)
    out, _ = worker.communicate(timeout=PATIENCE)
    assert worker.returncode == 0 and out == b"stopped\n"
    lines = log_file.read_bytes().splitlines()
    started = {line.split(b" ", 1)[1] for line in lines if line.startswith(b"start")}
    ended = {line.split(b" ", 1)[1] for line in lines if line.startswith(b"end")}
    assert started == ended and len(started) == 2
    assert sorted(pending(queue_dir)) == sorted(set(b"job %d" % n for n in range(10)) - ended)


async def test_arun_worker_handles_every_job_and_stops(queue_dir: pathlib.Path) -> None:
    fill(queue_dir, 100)
    stop = asyncio.Event()
    seen: list[bytes] = []
    in_flight = 0
    most = 0

    async def handler(job: segq.AsyncJob) -> None:
        nonlocal in_flight, most
        in_flight += 1
        most = max(most, in_flight)
        await asyncio.sleep(0.001)
        in_flight -= 1
        if job.data == b"job 7" and job.attempt == 1:
            raise RuntimeError("flaky")
        seen.append(job.data)
        if len(seen) == 100:
            stop.set()

    await asyncio.wait_for(segq.arun_worker(queue_dir, handler, concurrency=5, stop=stop), PATIENCE)
    assert sorted(seen) == sorted(b"job %d" % number for number in range(100))
    assert most == 5
    assert pending(queue_dir) == []


async def test_arun_worker_stop_while_waiting_leaves_nothing_claimed(queue_dir: pathlib.Path) -> None:
    fill(queue_dir, 0)
    stop = asyncio.Event()
    worker = asyncio.ensure_future(segq.arun_worker(queue_dir, lambda job: asyncio.sleep(0), stop=stop))
    await asyncio.sleep(0.1)
    stop.set()
    await asyncio.wait_for(worker, PATIENCE)
    fill(queue_dir, 1)
    assert pending(queue_dir) == [b"job 0"]


def follow_up_data(path: pathlib.Path) -> list[bytes]:
    got = []
    with segq.Receiver(path, "check") as rx:
        while (message := rx.try_recv()) is not None:
            got.append(message.data)
            message.commit()
    return got


def test_follow_ups_a_handler_returns_are_enqueued_with_its_ack(queue_dir: pathlib.Path, tmp_path: pathlib.Path) -> None:
    fill(queue_dir, 20)
    uploads = tmp_path / "uploads"
    stop = threading.Event()
    seen: list[bytes] = []
    lock = threading.Lock()

    def handler(job: segq.Job) -> list[segq.Enqueue] | None:
        with lock:
            seen.append(job.data)
            if len(seen) == 40:
                stop.set()
        if job.data.startswith(b"again "):
            return None
        return [segq.Enqueue(b"upload " + job.data, queue=uploads), segq.Enqueue(b"again " + job.data)]

    segq.run_worker(queue_dir, handler, concurrency=3, stop=stop)
    assert sorted(follow_up_data(uploads)) == sorted(b"upload job %d" % n for n in range(20))
    assert sorted(seen) == sorted([b"job %d" % n for n in range(20)] + [b"again job %d" % n for n in range(20)])


async def test_arun_worker_enqueues_follow_ups_with_the_ack(queue_dir: pathlib.Path, tmp_path: pathlib.Path) -> None:
    fill(queue_dir, 10)
    uploads = tmp_path / "uploads"
    stop = asyncio.Event()
    count = 0

    async def handler(job: segq.AsyncJob) -> list[segq.Enqueue]:
        nonlocal count
        count += 1
        if count == 10:
            stop.set()
        return [segq.Enqueue(b"upload " + job.data, queue=uploads)]

    await asyncio.wait_for(segq.arun_worker(queue_dir, handler, concurrency=2, stop=stop), PATIENCE)
    assert sorted(follow_up_data(uploads)) == sorted(b"upload job %d" % n for n in range(10))


def test_follow_ups_refused_before_the_commit_nack_the_job(queue_dir: pathlib.Path, tmp_path: pathlib.Path) -> None:
    fill(queue_dir, 1)
    small = tmp_path / "small"
    with segq.Sender(small, segment_size=4096):
        pass  # its records are at most about 4 KiB
    stop = threading.Event()
    attempts: list[int] = []

    def handler(job: segq.Job) -> list[segq.Enqueue]:
        attempts.append(job.attempt)
        if job.attempt == 2:
            stop.set()
        return [segq.Enqueue(b"x" * 10_000, queue=small)]

    segq.run_worker(queue_dir, handler, max_attempts=2, stop=stop)
    assert attempts == [1, 2]
    with segq.Receiver(queue_dir / "dead" / "default") as rx:
        letter = segq.DeadLetter.decode(rx.recv(timeout=PATIENCE).data)
    assert letter.reason.startswith("follow-ups refused: a follow-up of 10000 bytes is larger than")


async def test_arun_worker_nacks_a_junk_result_and_dead_letters_refused_follow_ups(
    queue_dir: pathlib.Path, tmp_path: pathlib.Path, caplog: pytest.LogCaptureFixture
) -> None:
    fill(queue_dir, 1)
    small = tmp_path / "small"
    with segq.Sender(small, segment_size=4096):
        pass  # its records are at most about 4 KiB
    stop = asyncio.Event()
    attempts: list[int] = []

    async def handler(job: segq.AsyncJob) -> object:
        attempts.append(job.attempt)
        if job.attempt == 1:
            return "done"
        stop.set()
        return [segq.Enqueue(b"x" * 10_000, queue=small)]

    await asyncio.wait_for(
        segq.arun_worker(queue_dir, handler, max_attempts=2, stop=stop), PATIENCE  # type: ignore[arg-type]
    )
    assert attempts == [1, 2]
    assert "it must return None or a list of segq.Enqueue" in caplog.text
    with segq.Receiver(queue_dir / "dead" / "default") as rx:
        letter = segq.DeadLetter.decode(rx.recv(timeout=PATIENCE).data)
    assert letter.attempts == 2
    assert letter.reason.startswith("follow-ups refused: a follow-up of 10000 bytes is larger than")
