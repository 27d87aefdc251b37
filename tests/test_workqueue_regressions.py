"""Regressions of the work queue found by the crash tests, each replayed deterministically.

Two ``WorkQueue`` objects on one group stand for two processes: each keeps
its own replica of the group state and its own claim index, and catches up
from the journal at the start of each transaction, as another process would.
"""

from __future__ import annotations

import os
import pathlib

import pytest

import segq
from segq.workqueue import WorkQueue, group_info
from segq.workqueue._claims import GroupState, IllegalTransition
from segq.workqueue._grouplock import group_dir

SEGMENT_SIZE = 512


class Clock:
    """A wall clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def queue_dir(tmp_path: pathlib.Path) -> pathlib.Path:
    path = tmp_path / "q"
    with segq.Sender(path, segment_size=SEGMENT_SIZE) as sender:
        for index in range(3):
            sender.send(b"r%d" % index)
    return path


def test_a_batch_claim_never_takes_a_record_twice_that_came_back_twice(queue_dir: pathlib.Path) -> None:
    # The crash test's 1-in-19 failure, step by step: a replica that saw a
    # WAITING record become claimable keeps a heap entry for it; when another
    # process claims it and it comes back again, the replica holds two live
    # entries for one record, and a batch claim took it twice.
    clock = Clock()
    with WorkQueue(queue_dir, lease=10, clock=clock) as a, WorkQueue(queue_dir, lease=10, clock=clock) as b:
        batch = a.claim_batch(3)
        assert [job.data for job in batch] == [b"r0", b"r1", b"r2"]
        batch.nack()  # all three WAITING, claimable now
        first = b.claim(timeout=0)  # b's replica files all three as ready, takes r0
        assert first.data == b"r0"
        second = a.claim(timeout=0)  # a takes r1: b's entry for r1 is stale now
        assert second.data == b"r1"
        second.nack()  # r1 comes back: b files it again
        jobs = b.claim_batch(5)
        assert sorted(job.data for job in jobs) == [b"r1", b"r2"]
        for job in [first, *jobs]:
            job.ack()
        assert group_info(queue_dir, "default")["claims"] == []
    with WorkQueue(queue_dir) as again:  # the journal replays: the group is not stuck
        assert again.try_claim() is None


def test_a_claim_the_state_machine_refuses_raises_before_it_reaches_the_journal(queue_dir: pathlib.Path) -> None:
    # Whatever bug offers a record it should not, the entry is checked
    # against the replica before the append: the caller gets
    # IllegalTransition and the group stays readable, the records claimable.
    clock = Clock()
    with WorkQueue(queue_dir, lease=10, clock=clock) as queue:
        batch = queue.claim_batch(3)
        held = batch.jobs[0]
        queue._nack(batch.jobs[1:], 0.0, None)
        waiting = batch.jobs[1]
        bad_claims = {
            "twice in one claim": [(waiting._start, 0, 1, b"", 0)] * 2,
            "it is claimed": [(held._start, 0, 1, b"", 0)],
        }
        for why, records in bad_claims.items():
            queue._begin()
            try:
                with pytest.raises(IllegalTransition, match=why):
                    queue._record_claim(clock(), records, [])
            finally:
                queue._group.end()
        held.ack()
    info = group_info(queue_dir, "default")
    assert info["claims"] == [] and len(info["waiting"]) == 2
    with WorkQueue(queue_dir, lease=10, clock=clock) as again:
        rest = again.claim_batch(5)
        assert sorted(job.data for job in rest) == [b"r1", b"r2"]
        rest.ack()


def test_settling_one_job_twice_in_one_call_is_refused_before_the_journal(queue_dir: pathlib.Path) -> None:
    with WorkQueue(queue_dir, lease=10) as queue:
        batch = queue.claim_batch(2)
        batch.jobs.append(batch.jobs[0])
        for settle in (batch.ack, batch.nack):
            with pytest.raises(segq.errors.UsageError, match="same job twice"):
                settle()
        batch.jobs.pop()
        batch.ack()
    assert group_info(queue_dir, "default")["claims"] == []
    with WorkQueue(queue_dir) as again:
        job = again.try_claim()
        assert job is not None and job.data == b"r2"
        job.ack()


def test_group_info_reports_a_group_still_being_opened_as_empty(queue_dir: pathlib.Path) -> None:
    # A worker makes groups/<group>/ before it writes the journal: a look in
    # between (``segq info``, a monitoring poll) sees an opening group.
    os.makedirs(group_dir(queue_dir, "default"))
    info = group_info(queue_dir, "default")
    assert info["opening"] is True
    assert info["claims"] == [] and info["waiting"] == [] and info["done_above_mark"] == 0
    assert info["stats"]["pending"] == 3
    with WorkQueue(queue_dir) as queue:
        job = queue.try_claim()
        assert job is not None
        job.ack()
        info = group_info(queue_dir, "default")
        assert info["opening"] is False and info["stats"]["pending"] == 2


def test_check_claim_refuses_steps_below_the_head_or_out_of_order() -> None:
    state = GroupState(head=100, mark=100)
    state.check_claim([], [100, 120, 140])  # in order, at and past the head
    for steps in ([90, 120], [120, 110], [120, 120]):
        with pytest.raises(IllegalTransition, match="below the claim head"):
            state.check_claim([], steps)
    with pytest.raises(IllegalTransition, match="not claimable"):
        state.check_claim([50], [])
