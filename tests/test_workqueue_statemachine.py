"""A hypothesis state machine drives WorkQueue workers beside an in-memory model.

Workers are WorkQueue objects in this process, each with an owner identity
borrowed from a real ``sleep`` process, so "worker death" is a real process
dying and being seen through its pidfd.  Leases run on an injected clock.
The journal is given a tiny capacity, so compaction happens all the time, and
segments are tiny, so the mark crosses end-of-segment markers and segments
are deleted.

The model: every record sent, in order, and for each its state (pending,
claimed by which worker under which token until when at which attempt,
waiting with its attempts and available time, or done), plus the expected
dead-letter queue.  Each call's outcome (which record, which attempt,
ClaimLost or not) is compared with the model; invariants compare the group's
state (info, a fresh replay of the journal, every worker's replica) and the
dead letters.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field

import psutil
import pytest
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, consumes, invariant, multiple, precondition, rule

import segq
from segq import workqueue
from segq.workqueue import _journal, _queue
from segq.workqueue._claims import load_state
from segq.workqueue import DeadLetter, Job, JobState, WorkQueue

SEGMENT_SIZE = 256
LEASE = 10.0
MAX_ATTEMPTS = 2
WORKERS = 3


@dataclass
class Record:
    payload: bytes
    state: str = "pending"  # pending, claimed, waiting, done
    worker: object = None  # the Worker holding the claim
    token: int = 0
    expires: float = 0.0
    attempt: int = 0  # of the current claim; attempts so far when waiting
    available_at: float = 0.0
    position: segq.Position | None = None


@dataclass
class Worker:
    queue: WorkQueue
    process: subprocess.Popen[bytes]
    alive: bool = True
    jobs: list[Job] = field(default_factory=list)


class Clock:
    def __init__(self) -> None:
        self.now = 5_000_000.0

    def __call__(self) -> float:
        return self.now


def abandon(queue: WorkQueue) -> None:
    """Drop a worker as a killed process would: release its files, touch no shared state."""
    queue._abandon()


class WorkQueueMachine(RuleBasedStateMachine):
    jobs = Bundle("jobs")
    batches = Bundle("batches")

    def __init__(self) -> None:
        super().__init__()
        self.path = tempfile.mkdtemp(prefix="segq-wq-sm-")
        self.clock = Clock()
        self.sender = segq.Sender(self.path, segment_size=SEGMENT_SIZE)
        self.records: list[Record] = []
        self.workers: list[Worker] = []
        self.expected_dead: list[tuple[bytes, int, str]] = []  # payload, attempts, reason prefix
        self.seen_dead: list[DeadLetter] = []
        self.dead_receiver: segq.Receiver | None = None
        self.serial = 0
        self.token_of: dict[int, int] = {}  # id(job) -> model token
        self.next_token = 0
        for _ in range(WORKERS):
            self.workers.append(self._new_worker())

    def _new_worker(self) -> Worker:
        process = subprocess.Popen(["sleep", "600"])
        owner = (process.pid, psutil.Process(process.pid).create_time())
        queue = WorkQueue(self.path, lease=LEASE, max_attempts=MAX_ATTEMPTS, clock=self.clock, _owner=owner)
        return Worker(queue, process)

    def teardown(self) -> None:
        for worker in self.workers:
            if worker.alive:
                worker.queue.close()
            else:
                abandon(worker.queue)
            worker.process.kill()
            worker.process.wait()
        self.sender.close()
        if self.dead_receiver is not None:
            self.dead_receiver.close()
        shutil.rmtree(self.path, ignore_errors=True)

    # -- the model ---------------------------------------------------------

    def now(self) -> float:
        return self.clock.now

    def fail(self, record: Record, available_at: float, reason: str) -> None:
        event(f"claim failed: {reason.split(' PID')[0]}")
        if record.attempt >= MAX_ATTEMPTS:
            event("dead-lettered")
            record.state = "done"
            self.expected_dead.append((record.payload, record.attempt, reason))
        else:
            record.state = "waiting"
            record.available_at = available_at

    def sweep(self, claimer: Worker) -> None:
        """What a claim by ``claimer`` does first: expired claims, then dead workers' claims."""
        now = self.now()
        expired = [r for r in self.records if r.state == "claimed" and r.expires <= now]
        for record in expired:
            self.fail(record, now, "lease ran out")
        foreign = [r for r in self.records if r.state == "claimed" and r.worker is not claimer]
        for record in foreign:
            holder = record.worker
            assert isinstance(holder, Worker)
            if not holder.alive:
                self.fail(record, now, f"worker PID {holder.process.pid} died")

    def pick(self, limit: int) -> list[Record]:
        now = self.now()
        ready = [r for r in self.records if r.state == "waiting" and r.available_at <= now][:limit]
        pending = [r for r in self.records if r.state == "pending"]
        return ready + pending[: limit - len(ready)]

    def holds(self, job: Job) -> Record | None:
        record = next(r for r in self.records if r.payload == job.data)
        token = self.token_of[id(job)]
        if record.state == "claimed" and record.token == token and record.expires > self.now():
            return record
        return None

    # -- rules -------------------------------------------------------------

    @rule(count=st.integers(1, 3), size=st.integers(0, 40))
    def send(self, count: int, size: int) -> None:
        batch = []
        for _ in range(count):
            self.serial += 1
            payload = b"%d:" % self.serial + b"x" * size
            batch.append(payload)
            self.records.append(Record(payload))
        self.sender.send_batch(batch)

    def _live(self, index: int) -> Worker:
        return self.workers[index % len(self.workers)]

    def _claim(self, index: int, count: int) -> list[Job]:
        index %= len(self.workers)
        worker = self.workers[index]
        if not worker.alive:
            return []
        self.sweep(worker)
        expected = self.pick(count)
        if count == 1:
            job = worker.queue.try_claim()
            got = [] if job is None else [job]
        else:
            try:
                got = list(worker.queue.claim_batch(count, timeout=0))
            except segq.Empty:
                got = []
        assert [job.data for job in got] == [record.payload for record in expected]
        self.next_token += 1
        for job, record in zip(got, expected, strict=True):
            attempt = record.attempt + 1 if record.state == "waiting" else 1
            assert job.attempt == attempt
            record.state, record.worker, record.token = "claimed", worker, self.next_token
            record.attempt, record.expires = attempt, self.now() + LEASE
            assert job.lease_expires_at == record.expires
            record.position = job.position
            self.token_of[id(job)] = self.next_token
            worker.jobs.append(job)
        return got

    @rule(target=jobs, index=st.integers(0, WORKERS - 1))
    def claim(self, index: int) -> object:
        return multiple(*self._claim(index, 1))

    @rule(target=jobs, index=st.integers(0, WORKERS - 1))
    def claim_again(self, index: int) -> object:
        return multiple(*self._claim(index, 1))

    @rule(target=batches, index=st.integers(0, WORKERS - 1), count=st.integers(2, 4))
    def claim_batch(self, index: int, count: int) -> object:
        got = self._claim(index, count)
        return multiple(got) if got else multiple()

    def _settle(self, jobs: list[Job], call: str, **kwargs: object) -> None:
        if not jobs:
            return
        job = jobs[0]
        worker = next((w for w in self.workers if w.queue is job._queue), None)
        if worker is None or not worker.alive:
            return  # its worker died or was closed
        if job.state is not JobState.HELD:
            expected_error = segq.ClaimLost if job.state is JobState.LOST else segq.UsageError
            with pytest.raises(expected_error):
                getattr(job, call)(**kwargs)
            return
        record = self.holds(job)
        if record is None:
            event(f"ClaimLost on {call}")
            with pytest.raises(segq.ClaimLost):
                getattr(job, call)(**kwargs)
            assert job.state is JobState.LOST
            return
        getattr(job, call)(**kwargs)
        now = self.now()
        if call == "ack":
            record.state = "done"
            assert job.state is JobState.ACKED
        elif call == "nack":
            delay = kwargs.get("delay", 0.0)
            assert isinstance(delay, float)
            reason = kwargs.get("reason")
            self.fail(record, now + delay, str(reason) if reason is not None else "nacked")
            assert job.state is JobState.NACKED
        else:
            lease = kwargs.get("lease")
            record.expires = now + (LEASE if lease is None else float(lease))  # type: ignore[arg-type]
            assert job.lease_expires_at == record.expires

    @rule(job=consumes(jobs))
    def ack(self, job: Job) -> None:
        self._settle([job], "ack")

    @rule(job=consumes(jobs), delay=st.sampled_from([0.0, 5.0, 30.0]), reason=st.sampled_from([None, "bad"]))
    def nack(self, job: Job, delay: float, reason: str | None) -> None:
        self._settle([job], "nack", delay=delay, reason=reason)

    @rule(job=jobs, lease=st.sampled_from([None, 3.0, 50.0]))
    def renew(self, job: Job, lease: float | None) -> None:
        self._settle([job], "renew", lease=lease)

    @rule(job=jobs)
    def ack_twice(self, job: Job) -> None:
        """Settling a job that is settled (or lost) again: UsageError (or ClaimLost), nothing changes."""
        if job.state is not JobState.HELD:
            self._settle([job], "ack")

    @rule(batch=batches)
    def settle_one_of_a_batch(self, batch: list[Job]) -> None:
        self._settle(batch[-1:], "ack")

    @rule(jobs=consumes(batches))
    def settle_batch(self, jobs: list[Job]) -> None:
        """Ack a whole batch in one transaction: all or nothing."""
        held = [job for job in jobs if job.state is JobState.HELD]
        if not held or not any(w.alive and w.queue is held[0]._queue for w in self.workers):
            return
        records = [self.holds(job) for job in held]
        batch = workqueue.JobBatch(held[0]._queue, held)
        if any(record is None for record in records):
            with pytest.raises(segq.ClaimLost):
                batch.ack()
            return
        batch.ack()
        for record in records:
            assert record is not None
            record.state = "done"

    @rule(seconds=st.sampled_from([1.0, 4.0, 9.0, 10.0, 31.0]))
    def advance_clock(self, seconds: float) -> None:
        self.clock.now += seconds

    @precondition(lambda self: sum(w.alive for w in self.workers) > 1)
    @rule(index=st.integers(0, WORKERS - 1))
    def kill_worker(self, index: int) -> None:
        worker = self.workers[index % len(self.workers)]
        if not worker.alive:
            return
        worker.process.kill()
        worker.process.wait()
        worker.alive = False

    @rule(index=st.integers(0, WORKERS - 1))
    def close_worker(self, index: int) -> None:
        """Close a live worker (its held, unexpired claims come back) and open a fresh one in its place."""
        index %= len(self.workers)
        worker = self.workers[index]
        if not worker.alive:
            abandon(worker.queue)
        else:
            now = self.now()
            for job in sorted(worker.jobs, key=lambda job: job._start):
                record = self.holds(job) if job.state is JobState.HELD else None
                if record is not None and record.worker is worker:
                    self.fail(record, now, "worker closed its WorkQueue")
            worker.queue.close()
        worker.process.kill()
        worker.process.wait()
        self.workers[index] = self._new_worker()

    # -- invariants ------------------------------------------------------------

    @invariant()
    def group_state_matches_the_model(self) -> None:
        info = workqueue.group_info(self.path)
        claimed = sorted(
            (r.position.segment, r.position.offset, r.attempt)
            for r in self.records
            if r.state == "claimed" and r.position is not None
        )
        assert (
            sorted((c["position"]["segment"], c["position"]["offset"], c["attempt"]) for c in info["claims"]) == claimed
        )
        waiting = sorted(
            (r.position.segment, r.position.offset, r.attempt)
            for r in self.records
            if r.state == "waiting" and r.position
        )
        assert (
            sorted((w["position"]["segment"], w["position"]["offset"], w["attempts"]) for w in info["waiting"])
            == waiting
        )
        first = next((r for r in self.records if r.state != "done"), None)
        mark = segq.Position(info["low_water_mark"]["segment"], info["low_water_mark"]["offset"])
        head = segq.Position(info["claim_head"]["segment"], info["claim_head"]["offset"])
        if first is None or first.state == "pending":
            assert mark == head
        else:
            assert mark == first.position
        # Segments below the mark are gone; the mark's segment is kept.
        segments = segq._segment.list_segments(self.path)
        assert segments and segments[0] <= mark.segment

    @invariant()
    def every_replica_equals_a_fresh_replay(self) -> None:
        journal = _journal.Journal(f"{self.path}/groups/default")
        try:
            fresh = load_state(journal)
        finally:
            journal.close()
        for worker in self.workers:
            if not worker.alive:
                continue
            queue = worker.queue
            with queue._group as state:  # catches up with the journal
                pass
            assert (state.head, state.mark, state.dead_total) == (fresh.head, fresh.mark, fresh.dead_total)
            assert {s: (c.token, c.expires, c.attempt) for s, c in state.claims.items()} == {
                s: (c.token, c.expires, c.attempt) for s, c in fresh.claims.items()
            }
            assert {s: (w.attempts, w.available_at) for s, w in state.waiting.items()} == {
                s: (w.attempts, w.available_at) for s, w in fresh.waiting.items()
            }
            assert state.done == fresh.done

    @invariant()
    def dead_letters_match(self) -> None:
        directory = workqueue.dead_letter_path(self.path)
        if self.dead_receiver is None:
            if not self.expected_dead:
                return
            self.dead_receiver = segq.Receiver(directory)
        while (message := self.dead_receiver.try_recv()) is not None:
            self.seen_dead.append(DeadLetter.decode(message.data))
            message.commit()
        assert [(letter.data, letter.attempts) for letter in self.seen_dead] == [
            (payload, attempts) for payload, attempts, _ in self.expected_dead
        ]
        for letter, (_, _, reason) in zip(self.seen_dead, self.expected_dead, strict=True):
            assert letter.reason.startswith(reason), (letter.reason, reason)


@pytest.fixture(autouse=True)
def _tiny_journal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_journal, "DEFAULT_CAPACITY", 700)
    monkeypatch.setattr(_queue, "LIVENESS_INTERVAL", 0.0)


WorkQueueMachine.TestCase.settings = settings(
    max_examples=int(os.environ.get("SEGQ_SM_EXAMPLES", "40")),
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
TestWorkQueueMachine = WorkQueueMachine.TestCase
