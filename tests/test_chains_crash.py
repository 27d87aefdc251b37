"""Ack with follow-ups across SIGKILLs: every follow-up lands exactly once, and only for an ack that won.

Worker processes run ``WORKER`` below: ``segq.worker.serve`` with a handler
that chains two follow-ups per job into another queue.  The test SIGKILLs
them at random instants and restarts them, and each worker also kills itself
at one named point inside the ack with a small probability
(``SEGQ_TEST_CRASH_AT``: right after the OUTBOX entry is committed, between
the two follow-ups, after both before SENT, after SENT before the pins are
released).  The journal is kept tiny so that compactions (and kills during
them) happen all the time.  In the end:

- every job of the source queue is done for the group;
- the target queue holds, for every job, ``A <job>`` and ``B <job>``
  exactly once, both marked as coming from the same claim;
- no pin is left holding the target queue.
"""

from __future__ import annotations

import collections
import os
import pathlib
import random
import signal
import subprocess
import sys
import threading
import time

import pytest

import segq
import segq._segment
import segq.recovery
from _harness import group_drained, record_figure
from segq.workqueue._outbox import FROM_HEADER, PIN_KIND
from segq._state import RELEASED_SEGMENT, list_cursors, read_position

REPO = str(pathlib.Path(segq.__file__).resolve().parent.parent)
CRASH_POINTS = ["after-outbox-entry", "between-follow-ups", "before-sent", "after-sent"]

WORKER = r"""
import sys
import segq, segq.worker
from segq.workqueue import _journal
_journal.DEFAULT_CAPACITY = 8192  # compact often, so kills land mid-compaction too
source, target = sys.argv[1:3]
def chain(job):
    return [segq.Enqueue(b"A " + job.data, queue=target), segq.Enqueue(b"B " + job.data, queue=target)]
segq.worker.serve(source, chain, group="default", concurrency=1, lease=30.0, max_attempts=1000,
                  stop=None, dead_letter=None, sync="never", drain=True)
"""


def spawn(source: pathlib.Path, target: pathlib.Path, rng: random.Random) -> subprocess.Popen[bytes]:
    environment = dict(os.environ, PYTHONPATH=REPO)
    environment.pop("SEGQ_TEST_CRASH_AT", None)
    point = rng.choice([None, *CRASH_POINTS])
    if point is not None:
        environment["SEGQ_TEST_CRASH_AT"] = f"{point}:0.02"
    return subprocess.Popen([sys.executable, "-c", WORKER, str(source), str(target)], env=environment)


class Noise(threading.Thread):
    """Another producer of the target queue: its records roll segments over while no worker of the group runs."""

    def __init__(self, target: pathlib.Path) -> None:
        super().__init__(daemon=True)
        self.target = target
        self.stopping = threading.Event()

    def run(self) -> None:
        with segq.Sender(self.target, segment_size=1024) as tx:
            number = 0
            while not self.stopping.wait(0.001):
                tx.send(b"noise %d" % number)
                number += 1


class Consumer(threading.Thread):
    """Reads the target queue as follow-ups arrive, so its tiny segments are deleted behind the kills."""

    def __init__(self, target: pathlib.Path) -> None:
        super().__init__(daemon=True)
        self.target = target
        self.got: list[tuple[bytes, dict[str, bytes]]] = []
        self.stopping = threading.Event()

    def run(self) -> None:
        with segq.Receiver(self.target, "consumer") as rx:
            while True:
                try:
                    batch = rx.recv_batch(100, timeout=0.05)
                except segq.Empty:
                    if self.stopping.is_set():
                        return
                    continue
                self.got.extend(data_and_headers(message) for message in batch)
                batch.commit()  # segments behind it are deleted: only the pins keep the in-doubt ones


def kill_loop(tmp_path: pathlib.Path, jobs: int, workers: int, seed: int, deadline: float) -> int:
    """Run the workers over ``jobs`` jobs under random kills; return how many processes died mid-run."""
    rng = random.Random(seed)
    source = tmp_path / "source"
    target = tmp_path / "target"
    with segq.Sender(source, segment_size=1 << 20) as tx:
        tx.send_batch(b"job%05d" % number for number in range(jobs))
    with segq.Sender(target, segment_size=1024):
        pass  # tiny segments: a few follow-ups each, so they roll over and are deleted all the time
    consumer = Consumer(target)
    consumer.start()
    noise = Noise(target)
    noise.start()
    fleet = [spawn(source, target, rng) for _ in range(workers)]
    deaths = 0
    try:
        while True:
            time.sleep(rng.uniform(0.005, 0.06))
            if time.monotonic() < deadline and rng.random() < 0.5:
                victim = rng.choice(fleet)
                victim.send_signal(signal.SIGKILL)
            for index, worker in enumerate(fleet):
                code = worker.poll()
                if code is None:
                    continue
                if code != 0:
                    assert code == -signal.SIGKILL, f"a worker failed with exit status {code}"
                    deaths += 1
                    fleet[index] = spawn(source, target, rng)
                elif group_drained(source):
                    fleet[index] = worker  # done: leave it exited
                else:
                    fleet[index] = spawn(source, target, rng)  # drained too early (others held jobs)
            if all(worker.poll() == 0 for worker in fleet) and group_drained(source):
                break
            assert time.monotonic() < deadline + 120, "the workers did not drain the source queue"
    finally:
        for worker in fleet:
            if worker.poll() is None:
                worker.kill()
            worker.wait()
        noise.stopping.set()
        noise.join()
        consumer.stopping.set()
        consumer.join()
        for path in (source, target):
            segq.recovery.remove_idle_semaphores(path)  # a worker killed while the last one attached
    assert len(segq._segment.list_segments(target)) < 20  # the consumer's commits deleted what it read
    check_target(source, target, jobs, consumer.got)
    return deaths


def read_all(target: pathlib.Path) -> list[tuple[bytes, dict[str, bytes]]]:
    got = []
    with segq.Receiver(target, "check") as rx:
        while True:
            try:
                batch = rx.recv_batch(1000, timeout=0)
            except segq.Empty:
                return got
            got.extend(data_and_headers(message) for message in batch)
            batch.commit()


def check_target(
    source: pathlib.Path, target: pathlib.Path, jobs: int, records: list[tuple[bytes, dict[str, bytes]]]
) -> None:
    seen: collections.Counter[bytes] = collections.Counter()
    claim_of: dict[bytes, set[bytes]] = collections.defaultdict(set)
    for data, headers in records:
        if data.startswith(b"noise "):
            continue
        seen[data] += 1
        source_id, token, index = headers[FROM_HEADER].split(b":")
        kind, job = data.split(b" ")
        assert index == (b"0" if kind == b"A" else b"1")
        claim_of[job].add(source_id + b":" + token)
    expected = {b"%s job%05d" % (kind, number) for number in range(jobs) for kind in (b"A", b"B")}
    missing = sorted(expected - set(seen))
    twice = sorted(data for data, count in seen.items() if count > 1)
    assert not missing, f"{len(missing)} follow-ups missing, e.g. {missing[:5]}"
    assert not twice, f"{len(twice)} follow-ups delivered twice, e.g. {twice[:5]}"
    assert set(seen) == expected
    assert all(len(claims) == 1 for claims in claim_of.values())  # A and B came from one winning ack
    with segq.WorkQueue(source, lease=60):
        pass  # the next opener settles anything still open (there must be nothing)
    for kind, _, path in list_cursors(target):
        if kind == PIN_KIND:
            assert read_position(path).segment == RELEASED_SEGMENT, "a pin was left holding the target queue"


def data_and_headers(message: segq.Message) -> tuple[bytes, dict[str, bytes]]:
    headers = getattr(message, "headers", None)
    if headers is not None:
        return message.data, headers
    from segq._headers import split_body

    return split_body(message.data)


def test_each_follow_up_lands_exactly_once_through_random_kills(tmp_path: pathlib.Path) -> None:
    deaths = kill_loop(tmp_path, jobs=3000, workers=2, seed=12, deadline=time.monotonic() + 6)
    assert deaths >= 5  # the kills did land
    record_figure("chained: worker deaths survived", deaths)
    record_figure("chained: follow-ups checked", 6000)


@pytest.mark.parametrize("point", CRASH_POINTS)
def test_a_crash_at_each_point_inside_the_ack_is_finished_by_the_next_opener(
    tmp_path: pathlib.Path, point: str
) -> None:
    source = tmp_path / "source"
    target = tmp_path / "target"
    with segq.Sender(source, segment_size=1 << 20) as tx:
        tx.send_batch([b"job00000", b"job00001"])
    script = (
        "import sys, segq\n"
        "wq = segq.WorkQueue(sys.argv[1], lease=60)\n"
        "job = wq.claim(timeout=5)\n"
        "job.ack(enqueue=[segq.Enqueue(b'A ' + job.data, queue=sys.argv[2]),"
        " segq.Enqueue(b'B ' + job.data, queue=sys.argv[2])])\n"
    )
    environment = dict(os.environ, PYTHONPATH=REPO, SEGQ_TEST_CRASH_AT=f"{point}:1")
    crashed = subprocess.run([sys.executable, "-c", script, str(source), str(target)], env=environment, timeout=60)
    assert crashed.returncode == -signal.SIGKILL
    with segq.WorkQueue(source, lease=60) as wq:  # opening finishes the crashed ack
        job = wq.claim(timeout=5)
        assert job.data == b"job00001"  # job 0 was acked by the OUTBOX entry: it does not come back
        job.ack(enqueue=[segq.Enqueue(b"A " + job.data, queue=target), segq.Enqueue(b"B " + job.data, queue=target)])
    check_target(source, target, 2, read_all(target))


def test_claim_lost_applies_no_follow_up(tmp_path: pathlib.Path) -> None:
    source = tmp_path / "source"
    target = tmp_path / "target"
    with segq.Sender(source, segment_size=1 << 20) as tx:
        tx.send(b"job")
    with segq.WorkQueue(source, lease=0.05) as wq:
        job = wq.claim(timeout=5)
        time.sleep(0.1)
        with pytest.raises(segq.ClaimLost):
            job.ack(enqueue=[segq.Enqueue(b"next", queue=target)])
        again = wq.claim(timeout=5)
        assert again.attempt == 2
        again.ack()
    if target.exists():
        with segq.Receiver(target) as rx:
            assert rx.try_recv() is None


@pytest.mark.soak
@pytest.mark.timeout(0)
def test_soak_follow_ups_through_random_kills(tmp_path: pathlib.Path) -> None:
    """The chained kill loop for ``SEGQ_SOAK_SECONDS``, in rounds of about a minute."""
    duration = float(os.environ.get("SEGQ_SOAK_SECONDS", "300"))
    end = time.monotonic() + duration
    round_number = 0
    while time.monotonic() < end:
        round_dir = tmp_path / f"round{round_number}"
        round_dir.mkdir()
        deaths = kill_loop(
            round_dir, jobs=5000, workers=2, seed=round_number, deadline=min(end, time.monotonic() + 60)
        )
        record_figure("soak chained: worker deaths survived", deaths)
        record_figure("soak chained: follow-ups checked", 10_000)
        round_number += 1


def test_follow_ups_carry_their_options_and_headers(tmp_path: pathlib.Path) -> None:
    source = tmp_path / "source"
    target = tmp_path / "target"
    with segq.Sender(source, segment_size=1 << 20) as tx:
        tx.send_batch([b"job 1", b"job 2"])
    with segq.Sender(target, segment_size=1 << 20) as tx:
        existing = tx.enqueue(b"charge", dedup_key="order-12")
    with segq.WorkQueue(source, lease=60) as wq:
        job = wq.claim(timeout=5)
        job.ack(
            enqueue=[
                segq.Enqueue(b"urgent", queue=target, priority=9, job_id="next-1", headers={"trace": b"t1"}),
                segq.Enqueue(b"later", queue=target, delay=3600),
                segq.Enqueue(b"charge", queue=target, dedup_key="order-12"),  # a duplicate: written nowhere
                segq.Enqueue(b"again", delay=0),
            ]
        )
        own = wq.claim(timeout=5)
        assert own.data == b"job 2"
        own.ack()
        own = wq.claim(timeout=5)
        assert own.data == b"again"
        own.ack()
    with segq.WorkQueue(target, lease=60) as wq:
        first = wq.claim(timeout=5)
        assert (first.data, first.id, first.priority, first.headers["trace"]) == (b"urgent", "next-1", 9, b"t1")
        first.ack()
        second = wq.claim(timeout=5)
        assert (second.data, second.id) == (b"charge", existing.id)
        second.ack()
        assert wq.try_claim() is None  # "later" is due in an hour
        assert wq.stats().scheduled == 1


def test_an_unwritable_target_keeps_the_ack_and_its_follow_ups_until_it_can_be_written(tmp_path: pathlib.Path) -> None:
    source = tmp_path / "source"
    target = tmp_path / "target"
    with segq.Sender(source, segment_size=1 << 20) as tx:
        tx.send_batch([b"job00000", b"job00001"])
    script = (
        "import sys, segq\n"
        "wq = segq.WorkQueue(sys.argv[1], lease=60)\n"
        "job = wq.claim(timeout=5)\n"
        "job.ack(enqueue=[segq.Enqueue(b'A ' + job.data, queue=sys.argv[2]),"
        " segq.Enqueue(b'B ' + job.data, queue=sys.argv[2])])\n"
    )
    environment = dict(os.environ, PYTHONPATH=REPO, SEGQ_TEST_CRASH_AT="after-outbox-entry:1")
    crashed = subprocess.run([sys.executable, "-c", script, str(source), str(target)], env=environment, timeout=60)
    assert crashed.returncode == -signal.SIGKILL
    moved = tmp_path / "target.aside"
    target.rename(moved)
    target.write_bytes(b"not a queue")  # the follow-ups cannot be delivered now
    for _ in range(2):
        with pytest.raises(segq.SegqError):
            segq.WorkQueue(source, lease=60)
    target.unlink()
    moved.rename(target)
    with segq.WorkQueue(source, lease=60) as wq:  # now it finishes the ack's follow-ups
        job = wq.claim(timeout=5)
        assert job.data == b"job00001"
        job.ack(enqueue=[segq.Enqueue(b"A " + job.data, queue=target), segq.Enqueue(b"B " + job.data, queue=target)])
    check_target(source, target, 2, read_all(target))
