"""Two workers (two replicas, two claim indexes) against a model of the claim order, under hypothesis.

The model: a claim takes the highest priority; within one, records given
back whose retry time came (lowest position first), then jobs whose run_at
passed (earliest first, then send order), then plain jobs in send order.
"""

from __future__ import annotations

import pathlib
import shutil
import tempfile
import time
from dataclasses import dataclass

from hypothesis import settings
from hypothesis.stateful import Bundle, RuleBasedStateMachine, consumes, invariant, rule
from hypothesis import strategies as st

import segq
from segq.workqueue import WorkQueue


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@dataclass
class ModelJob:
    index: int
    priority: int
    run_at: float  # 0.0: none
    retry_at: float | None = None  # set while given back
    claimed: bool = False
    done: bool = False


class ClaimOrder(RuleBasedStateMachine):
    held = Bundle("held")

    def __init__(self) -> None:
        super().__init__()
        self.directory = pathlib.Path(tempfile.mkdtemp(prefix="segq-jobs-sm-"))
        self.path = self.directory / "queue"
        self.clock = Clock(time.time())
        self.start = self.clock.now
        self.sender = segq.Sender(self.path, segment_size=1 << 14)
        self.workers = [WorkQueue(self.path, clock=self.clock, lease=10_000, max_attempts=1000) for _ in range(2)]
        self.jobs: list[ModelJob] = []

    def teardown(self) -> None:
        for worker in self.workers:
            worker.close()
        self.sender.close()
        shutil.rmtree(self.directory, ignore_errors=True)

    def expected(self) -> ModelJob | None:
        now = self.clock.now
        candidates = []
        for job in self.jobs:
            if job.claimed or job.done:
                continue
            if job.retry_at is not None:
                if job.retry_at <= now:
                    candidates.append(((-job.priority, 0, 0.0, job.index), job))
            elif job.run_at and job.run_at <= now:
                candidates.append(((-job.priority, 1, job.run_at, job.index), job))
            elif not job.run_at:
                candidates.append(((-job.priority, 2, 0.0, job.index), job))
        return min(candidates, key=lambda pair: pair[0])[1] if candidates else None

    @rule(priority=st.sampled_from([0, 0, 0, 1, 9]), later=st.sampled_from([0, 0, 0, 5, 10, 20]))
    def enqueue(self, priority: int, later: int) -> None:
        index = len(self.jobs)
        run_at = self.start + later + 0.001 * index if later else 0.0
        self.sender.enqueue(b"%d" % index, priority=priority, run_at=run_at or None)
        self.jobs.append(ModelJob(index, priority, run_at))

    @rule(target=held, worker=st.integers(0, 1))
    def claim(self, worker: int) -> object:
        want = self.expected()
        job = self.workers[worker].try_claim()
        if want is None:
            assert job is None
            return None
        assert job is not None, f"expected job {want.index}"
        assert int(job.data) == want.index, (int(job.data), want.index)
        want.claimed = True
        want.retry_at = None
        return (job, want)

    @rule(pair=consumes(held))
    def ack(self, pair: object) -> None:
        if pair is None:
            return
        job, model = pair  # type: ignore[misc]
        job.ack()
        model.claimed, model.done = False, True

    @rule(pair=consumes(held), delay=st.sampled_from([0, 0, 3]))
    def nack(self, pair: object, delay: int) -> None:
        if pair is None:
            return
        job, model = pair  # type: ignore[misc]
        job.nack(delay=delay)
        model.claimed = False
        model.retry_at = self.clock.now + delay

    @rule(seconds=st.sampled_from([1, 4, 8]))
    def advance(self, seconds: int) -> None:
        self.clock.now += seconds

    @invariant()
    def stats_agree(self) -> None:
        stats = self.workers[0].stats()
        now = self.clock.now
        fresh = [job for job in self.jobs if not job.claimed and not job.done and job.retry_at is None]
        assert stats.scheduled == sum(1 for job in fresh if job.run_at > now)
        assert stats.pending == len(fresh) - stats.scheduled
        assert stats.claimed == sum(1 for job in self.jobs if job.claimed)
        assert stats.retrying == sum(1 for job in self.jobs if job.retry_at is not None)
        assert stats.done == sum(1 for job in self.jobs if job.done)


TestClaimOrder = ClaimOrder.TestCase
TestClaimOrder.settings = settings(max_examples=40, stateful_step_count=40, deadline=None)
