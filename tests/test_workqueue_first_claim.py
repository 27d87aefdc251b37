"""The first claim of a process behind a large mixed backlog: it reads the backlog in batches, and takes what a model says."""

from __future__ import annotations

import pathlib
import random
import time

import pytest

import segq
from segq._format import HEADER_SIZE
from segq._reader import RecordReader
from segq.workqueue import WorkQueue, read_group_stats

SEGMENT_SIZE = 1 << 16  # the backlog spans several segments
BACKLOG = 6000
GIVEN_BACK = 12


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _send(tx: segq.Sender, name: int, kind: str, rng: random.Random, now: float) -> tuple[int, float]:
    """Send job ``name`` of ``kind``; return its (priority, run_at), run_at 0.0 for one without."""
    data = b"%d" % name
    if kind == "plain":
        tx.send(data)
        return 0, 0.0
    priority = rng.randint(1, 9) if kind != "due" else rng.randint(0, 9)
    if kind == "prioritised":
        tx.enqueue(data, priority=priority)
        return priority, 0.0
    # Due ones in a scrambled time order; later ones stay out of reach (the clock stands still).
    run_at = now - rng.uniform(1, 1000) if kind == "due" else now + rng.uniform(600, 86400)
    tx.enqueue(data, priority=priority, run_at=run_at)
    return priority, run_at


def _model_order(jobs: dict[int, tuple[int, float]], given_back: dict[int, int], now: float) -> list[bytes]:
    """Return the claim order: by priority, given-back first (lowest position), then due time, then send order."""
    order = []
    for priority in range(9, -1, -1):
        order += sorted(name for name, job_priority in given_back.items() if job_priority == priority)
        pending = [
            (run_at or float("inf"), name)
            for name, (job_priority, run_at) in jobs.items()
            if job_priority == priority and name not in given_back and run_at <= now
        ]
        order += [name for _, name in sorted(pending)]
    return [b"%d" % name for name in order]


def _claim_one_by_one(wq: WorkQueue) -> list[bytes]:
    claimed = []
    while (job := wq.try_claim()) is not None:
        claimed.append(job.data)
        job.ack()
    return claimed


@pytest.mark.parametrize("seed", [1, 2])
@pytest.mark.parametrize("who_goes_on", ["the first claimer", "a fresh replica"])
def test_a_first_claim_behind_a_mixed_backlog_takes_what_the_model_says_and_records_its_skips(
    queue_dir: pathlib.Path, seed: int, who_goes_on: str
) -> None:
    rng = random.Random(seed)
    now = time.time()
    clock = Clock(now)
    kinds = ["plain"] * 6 + ["prioritised"] * 2 + ["due", "later"]
    jobs: dict[int, tuple[int, float]] = {}
    given_back: dict[int, int] = {}  # name -> priority
    with segq.Sender(queue_dir, segment_size=SEGMENT_SIZE) as tx:
        for name in range(200):
            jobs[name] = _send(tx, name, rng.choice(kinds), rng, now)
        # Another worker claims some (going past others: SKIP entries) and gives them back.
        with WorkQueue(queue_dir, max_attempts=100, clock=clock) as earlier:
            held = [earlier.claim(timeout=1) for _ in range(GIVEN_BACK)]
            for job in held:
                given_back[int(job.data)] = job.priority
                job.nack()
        for name in range(200, BACKLOG):
            jobs[name] = _send(tx, name, rng.choice(kinds), rng, now)
    assert len(list(queue_dir.glob("*.seg"))) >= 3
    expected = _model_order(jobs, given_back, now)
    later = sum(1 for _, run_at in jobs.values() if run_at > now)
    stats = read_group_stats(queue_dir)  # the read-only index of the backlog (segq info)
    assert (stats.pending + stats.retrying, stats.scheduled, stats.claimed) == (len(expected), later, 0)
    with WorkQueue(queue_dir, max_attempts=100, clock=clock) as first:
        job = first.claim(timeout=1)  # reads the whole backlog at once
        assert job.data == expected[0]
        mine, read_only = first.stats(), read_group_stats(queue_dir)
        assert (mine.pending + mine.retrying, mine.scheduled, mine.claimed) == (len(expected) - 1, later, 1)
        assert (read_only.pending, read_only.scheduled, read_only.claimed, read_only.retrying) == (
            mine.pending, mine.scheduled, mine.claimed, mine.retrying
        )
        if who_goes_on == "the first claimer":
            job.ack()
            assert _claim_one_by_one(first) == expected[1:]
        else:
            # A new replica knows the records the first claim went past only from its SKIP entries.
            with WorkQueue(queue_dir, max_attempts=100, clock=clock) as fresh:
                assert _claim_one_by_one(fresh) == expected[1:]
            job.ack()
        assert first.stats().scheduled == later


def test_a_first_claim_past_a_batch_of_scheduled_jobs_keeps_their_time_and_priority(queue_dir: pathlib.Path) -> None:
    now = time.time()
    clock = Clock(now)
    with segq.Sender(queue_dir, segment_size=SEGMENT_SIZE) as tx:
        for name in range(5000):
            tx.enqueue(b"%d" % name, priority=name % 3, run_at=now + 100 + name % 7)
        tx.send(b"now")
    with WorkQueue(queue_dir, clock=clock) as wq:
        job = wq.claim(timeout=1)
        assert job.data == b"now"
        job.ack()
        assert wq.try_claim() is None
    clock.now = now + 1000
    with WorkQueue(queue_dir, clock=clock) as wq:  # from the SKIP entries alone
        expected = sorted(range(5000), key=lambda name: (-(name % 3), now + 100 + name % 7, name))
        assert _claim_one_by_one(wq) == [b"%d" % name for name in expected]


def test_the_skip_entries_of_a_first_claim_carry_each_records_own_end_across_segments(queue_dir: pathlib.Path) -> None:
    now = time.time()
    with segq.Sender(queue_dir, segment_size=1 << 12) as tx:  # many segment ends
        for name in range(3000):
            tx.enqueue(b"%d" % name, run_at=now + 3600, priority=name % 2)
        tx.send(b"now")
    with WorkQueue(queue_dir) as wq:
        job = wq.claim(timeout=1)
        assert job.data == b"now"
        reader = RecordReader(wq._control, wq._group.state.mark, consumer="test")
        ends = {}
        while (data := reader.next()) is not None:
            ends[reader.position - HEADER_SIZE - len(data)] = reader.position
        job.ack()
    with WorkQueue(queue_dir) as fresh:  # its replica holds what the SKIP entries say
        skipped = fresh._group.state.skipped
        assert len(skipped) == 3000
        assert {start: item.end for start, item in skipped.items()} == {start: ends[start] for start in skipped}
