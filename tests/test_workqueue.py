"""WorkQueue: the API its docstrings and docs/workqueue.md promise, one behaviour per test.

Multi-process and crash tests live in test_workqueue_crash.py; the model-based
state machine in test_workqueue_statemachine.py.
"""

from __future__ import annotations

import os
import pathlib
import threading
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from _harness import ack_all

import segq
from segq import workqueue
from segq.workqueue import _journal
from segq._state import ConsumerKind, list_cursors
from segq.workqueue._claims import TRANSITIONS, Event, GroupState, IllegalTransition, RecordState
from segq.workqueue import DeadLetter, JobState, WorkQueue, group_info, list_groups, recover_group, requeue_dead

SEGMENT_SIZE = 512


class Clock:
    """A wall clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> Clock:
    return Clock()


def fill(path: pathlib.Path, count: int, *, prefix: bytes = b"r") -> list[bytes]:
    records = [prefix + b"%d" % index for index in range(count)]
    with segq.Sender(path, segment_size=SEGMENT_SIZE) as sender:
        for record in records:
            sender.send(record)
    return records


def dead_letters(path: pathlib.Path, group: str = "default") -> list[DeadLetter]:
    directory = workqueue.dead_letter_path(path, group)
    if not os.path.isdir(directory):
        return []
    letters = []
    with segq.Receiver(directory, name="test") as receiver:
        while (message := receiver.try_recv()) is not None:
            letters.append(DeadLetter.decode(message.data))
            message.commit()
    return letters


# -- claiming ------------------------------------------------------------


def test_claims_in_send_order_and_each_record_once(queue_dir: pathlib.Path) -> None:
    records = fill(queue_dir, 40)
    with WorkQueue(queue_dir) as first, WorkQueue(queue_dir) as second:
        seen = []
        for index in range(40):
            job = (first if index % 2 else second).claim(timeout=1)
            assert job.attempt == 1
            seen.append(job.data)
            job.ack()
        assert seen == records
        assert first.try_claim() is None


def test_claim_times_out_with_empty(queue_dir: pathlib.Path) -> None:
    with WorkQueue(queue_dir, create=True) as queue:
        started = time.monotonic()
        with pytest.raises(segq.Empty):
            queue.claim(timeout=0.05)
        assert time.monotonic() - started < 5
        with pytest.raises(segq.Empty):
            queue.claim_batch(3, timeout=0)


def test_claim_wakes_when_a_record_is_sent(queue_dir: pathlib.Path) -> None:
    with WorkQueue(queue_dir, create=True) as queue:
        got: list[bytes] = []
        worker = threading.Thread(target=lambda: got.append(queue.claim(timeout=30).data))
        worker.start()
        time.sleep(0.05)
        fill(queue_dir, 1)
        worker.join(30)
        assert got == [b"r0"]


def test_claim_wakes_when_another_worker_nacks(queue_dir: pathlib.Path) -> None:
    fill(queue_dir, 1)
    with WorkQueue(queue_dir) as holder, WorkQueue(queue_dir) as waiter:
        job = holder.claim(timeout=1)
        got: list[tuple[bytes, int]] = []

        def wait() -> None:
            other = waiter.claim(timeout=30)
            got.append((other.data, other.attempt))

        worker = threading.Thread(target=wait)
        worker.start()
        time.sleep(0.05)
        job.nack()
        worker.join(30)
        assert got == [(b"r0", 2)]


def test_ack_in_any_order_moves_the_mark_only_over_a_done_prefix(queue_dir: pathlib.Path) -> None:
    fill(queue_dir, 3)
    with WorkQueue(queue_dir) as queue:
        jobs = [queue.claim(timeout=1) for _ in range(3)]
        mark = group_info(queue_dir)["low_water_mark"]
        jobs[2].ack()
        jobs[1].ack()
        assert group_info(queue_dir)["low_water_mark"] == mark
        assert group_info(queue_dir)["done_above_mark"] == 2
        jobs[0].ack()
        info = group_info(queue_dir)
        assert info["low_water_mark"] == info["claim_head"]
        assert info["done_above_mark"] == 0


def test_segments_below_every_consumer_are_deleted(queue_dir: pathlib.Path) -> None:
    fill(queue_dir, 200)
    segments = segq._segment.list_segments(queue_dir)
    assert len(segments) >= 5
    with WorkQueue(queue_dir) as queue:
        assert len(ack_all(queue)) == 200
        assert segq._segment.list_segments(queue_dir) == segments[-1:]


def test_a_lagging_group_holds_back_deletion_for_receivers(queue_dir: pathlib.Path) -> None:
    fill(queue_dir, 200)
    WorkQueue(queue_dir, "slow").close()
    with segq.Receiver(queue_dir) as receiver:
        while (message := receiver.try_recv()) is not None:
            message.commit()
    assert len(segq._segment.list_segments(queue_dir)) >= 5
    with WorkQueue(queue_dir, "slow") as queue:
        ack_all(queue)
    assert len(segq._segment.list_segments(queue_dir)) == 1


def test_groups_are_independent(queue_dir: pathlib.Path) -> None:
    records = fill(queue_dir, 5)
    with WorkQueue(queue_dir, "a") as first, WorkQueue(queue_dir, "b") as second:
        assert ack_all(first) == records
        assert ack_all(second) == records
    assert list_groups(queue_dir) == ["a", "b"]


def test_claim_batch_takes_up_to_max_count_under_one_lease(queue_dir: pathlib.Path, clock: Clock) -> None:
    records = fill(queue_dir, 5)
    with WorkQueue(queue_dir, clock=clock, lease=10) as queue:
        batch = queue.claim_batch(3, timeout=1)
        assert [job.data for job in batch] == records[:3]
        assert len({job.lease_expires_at for job in batch}) == 1
        batch[1].ack()
        batch.ack()  # the two still held
        assert all(job.state is JobState.ACKED for job in batch)
        rest = queue.claim_batch(10, timeout=1)
        assert [job.data for job in rest] == records[3:]
        with pytest.raises(RuntimeError):
            with rest:
                raise RuntimeError("boom")
        assert all(job.state is JobState.NACKED for job in rest)
        again = queue.claim_batch(10, timeout=0)
        assert [job.attempt for job in again] == [2, 2]
        with pytest.raises(segq.InvalidArgument):
            queue.claim_batch(0)


def test_context_manager_acks_on_success_and_nacks_on_error(queue_dir: pathlib.Path) -> None:
    fill(queue_dir, 2)
    with WorkQueue(queue_dir) as queue:
        with queue.claim(timeout=1) as job:
            pass
        assert job.state is JobState.ACKED
        with pytest.raises(ValueError):
            with queue.claim(timeout=1) as job:
                raise ValueError("bad input")
        assert job.state is JobState.NACKED
        again = queue.claim(timeout=1)
        assert (again.data, again.attempt) == (b"r1", 2)


def test_iterating_acks_each_job_when_the_next_is_asked_for(queue_dir: pathlib.Path) -> None:
    fill(queue_dir, 3)
    with WorkQueue(queue_dir) as queue:
        seen = []
        for job in queue:
            seen.append(job.data)
            if len(seen) == 2:
                break
        assert job.state is JobState.NACKED  # left by break: given back
        assert queue.claim(timeout=1).data == b"r1"


# -- leases, retries, dead letters ----------------------------------------


def test_an_unacked_claim_returns_after_its_lease(queue_dir: pathlib.Path, clock: Clock) -> None:
    fill(queue_dir, 2)
    with WorkQueue(queue_dir, clock=clock, lease=10) as queue:
        job = queue.claim(timeout=0)
        clock.advance(9.9)
        assert queue.claim(timeout=0).data == b"r1"
        assert queue.try_claim() is None
        clock.advance(0.1)
        again = queue.claim(timeout=0)
        assert (again.data, again.attempt) == (b"r0", 2)
        with pytest.raises(segq.ClaimLost):
            job.ack()
        assert job.state is JobState.LOST
        again.ack()


def test_lost_claims_raise_claim_lost_and_change_nothing(queue_dir: pathlib.Path, clock: Clock) -> None:
    fill(queue_dir, 1)
    with WorkQueue(queue_dir, clock=clock, lease=5) as queue:
        job = queue.claim(timeout=0)
        clock.advance(5)
        before = group_info(queue_dir)
        for call in (job.renew, job.nack, job.ack):
            with pytest.raises(segq.ClaimLost):
                call()
        after = group_info(queue_dir)
        assert after["journal"] == before["journal"]
        assert [claim["lease_expires_at"] for claim in after["claims"]] == [clock.now]


def test_renew_extends_the_lease(queue_dir: pathlib.Path, clock: Clock) -> None:
    fill(queue_dir, 1)
    with WorkQueue(queue_dir, clock=clock, lease=5) as queue:
        job = queue.claim(timeout=0)
        clock.advance(4)
        job.renew(lease=20)
        assert job.lease_expires_at == clock.now + 20
        clock.advance(19)
        assert queue.try_claim() is None
        job.ack()


def test_nack_with_delay_holds_the_record_back(queue_dir: pathlib.Path, clock: Clock) -> None:
    fill(queue_dir, 2)
    with WorkQueue(queue_dir, clock=clock) as queue:
        queue.claim(timeout=0).nack(delay=30, reason="rate limited")
        assert queue.claim(timeout=0).data == b"r1"
        assert queue.try_claim() is None
        waiting = group_info(queue_dir)["waiting"]
        assert [(item["attempts"], item["reason"]) for item in waiting] == [(1, "rate limited")]
        clock.advance(30)
        again = queue.claim(timeout=0)
        assert (again.data, again.attempt) == (b"r0", 2)


def test_after_max_attempts_the_record_goes_to_the_dead_letter_queue(queue_dir: pathlib.Path) -> None:
    fill(queue_dir, 2)
    with WorkQueue(queue_dir, max_attempts=3) as queue:
        for attempt in (1, 2, 3):
            job = queue.claim(timeout=1)
            assert (job.data, job.attempt) == (b"r0", attempt)
            job.nack(reason=f"failure {attempt}")
        assert queue.claim(timeout=1).data == b"r1"
        info = group_info(queue_dir)
        assert info["dead_lettered_total"] == 1
        assert info["dead_letters_pending"] == 1
    [letter] = dead_letters(queue_dir)
    assert (letter.data, letter.attempts, letter.reason, letter.group) == (b"r0", 3, "failure 3", "default")
    assert letter.position == segq.Position(0, 32)


def test_dead_letters_can_go_to_a_queue_of_your_choice(queue_dir: pathlib.Path, tmp_path: pathlib.Path) -> None:
    fill(queue_dir, 1)
    elsewhere = tmp_path / "dlq"
    with WorkQueue(queue_dir, max_attempts=1, dead_letter=elsewhere) as queue:
        queue.claim(timeout=1).nack(reason="no")
    with segq.Receiver(elsewhere) as receiver:
        assert DeadLetter.decode(receiver.recv(timeout=1).data).reason == "no"


def test_requeue_dead_sends_the_payloads_back_with_fresh_attempts(queue_dir: pathlib.Path) -> None:
    fill(queue_dir, 2)
    with WorkQueue(queue_dir, max_attempts=1) as queue:
        queue.claim(timeout=1).nack(reason="x")
        queue.claim(timeout=1).nack(reason="y")
        assert requeue_dead(queue_dir) == 2
        assert WorkQueue.requeue_dead(queue_dir) == 0
        jobs = [queue.claim(timeout=1) for _ in range(2)]
        assert [(job.data, job.attempt) for job in jobs] == [(b"r0", 1), (b"r1", 1)]
    assert requeue_dead(queue_dir, "nobody") == 0


def test_close_gives_back_held_jobs(queue_dir: pathlib.Path) -> None:
    fill(queue_dir, 1)
    queue = WorkQueue(queue_dir)
    job = queue.claim(timeout=1)
    queue.close()
    queue.close()
    assert job.state is JobState.NACKED
    with pytest.raises(segq.Closed):
        queue.claim(timeout=0)
    with WorkQueue(queue_dir) as other:
        again = other.claim(timeout=0)
        assert (again.data, again.attempt) == (b"r0", 2)


def test_a_claim_of_a_dead_worker_returns_at_once(queue_dir: pathlib.Path) -> None:
    import subprocess
    import sys

    fill(queue_dir, 2)
    child = subprocess.run(
        [
            sys.executable,
            "-c",
            "import segq; q = segq.WorkQueue(%r, lease=3600); j = q.claim(timeout=5); import os; os._exit(0)"
            % str(queue_dir),
        ],
        env={
            **os.environ,
            "PYTHONPATH": os.pathsep.join(
                filter(None, [str(pathlib.Path(segq.__file__).parent.parent), os.environ.get("PYTHONPATH")])
            ),
        },
        timeout=60,
    )
    assert child.returncode == 0
    assert group_info(queue_dir)["claims"][0]["owner_alive"] is False
    with WorkQueue(queue_dir, lease=3600) as queue:
        job = queue.claim(timeout=0)
        assert (job.data, job.attempt) == (b"r0", 2)
        reason = group_info(queue_dir)
        assert reason["claims"][0]["attempt"] == 2


# -- settling twice, usage errors -------------------------------------------


def test_settling_a_settled_job_names_its_state(queue_dir: pathlib.Path) -> None:
    fill(queue_dir, 1)
    with WorkQueue(queue_dir) as queue:
        job = queue.claim(timeout=1)
        job.ack()
        with pytest.raises(segq.UsageError, match="already acked"):
            job.ack()
        with pytest.raises(segq.UsageError, match="already acked"):
            job.nack()


def test_bad_arguments_are_refused(queue_dir: pathlib.Path) -> None:
    with pytest.raises(segq.InvalidArgument, match="lease"):
        WorkQueue(queue_dir, lease=0)
    with pytest.raises(segq.InvalidArgument, match="max_attempts"):
        WorkQueue(queue_dir, max_attempts=0)
    with pytest.raises(segq.InvalidArgument, match="group name"):
        WorkQueue(queue_dir, "../x")
    fill(queue_dir, 1)
    with WorkQueue(queue_dir) as queue:
        job = queue.claim(timeout=1)
        with pytest.raises(segq.InvalidArgument, match="delay"):
            job.nack(delay=-1)
        with pytest.raises(segq.InvalidArgument, match="lease"):
            job.renew(lease=0)
        with pytest.raises(segq.InvalidArgument, match="max_count"):
            queue.claim_batch(0)
        job.ack()


def test_transition_tables_are_complete_for_what_the_code_does() -> None:
    assert TRANSITIONS[RecordState.CLAIMED, Event.ACK] is RecordState.DONE
    assert (RecordState.DONE, Event.ACK) not in TRANSITIONS
    assert workqueue.JOB_TRANSITIONS[JobState.HELD, "ack"] is JobState.ACKED
    assert {state for state, _ in workqueue.JOB_TRANSITIONS} == {JobState.HELD}


def test_the_record_table_decides_a_transition_not_an_if(monkeypatch: pytest.MonkeyPatch) -> None:
    state = GroupState(100, 100)
    state.claim(1, 10.0, (1, 1.0), 100, 200, 1)
    state.give_back(100, 1, 0.0, 1, "nacked")
    monkeypatch.delitem(TRANSITIONS, (RecordState.WAITING, Event.CLAIM))
    with pytest.raises(IllegalTransition) as caught:
        state.claim(2, 10.0, (1, 1.0), 100, 200, 2)
    assert (caught.value.state, caught.value.event) == (RecordState.WAITING, Event.CLAIM)
    assert "cannot claim the record at segment 0 offset 100: it is waiting" in str(caught.value)


def test_an_event_the_record_table_lacks_names_the_event_and_the_state() -> None:
    state = GroupState(100, 100)
    state.claim(1, 10.0, (1, 1.0), 100, 200, 1)
    state.settle(100, 1)
    with pytest.raises(IllegalTransition, match="cannot ack the record at segment 0 offset 100: it is passed"):
        state.settle(100, 1)
    with pytest.raises(IllegalTransition, match="cannot renew the record at segment 0 offset 300: it is pending"):
        state.renew(300, 1, 20.0)


def test_the_job_table_decides_what_a_worker_may_do(queue_dir: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fill(queue_dir, 2)
    with WorkQueue(queue_dir) as queue:
        job = queue.claim(timeout=1)
        monkeypatch.delitem(workqueue.JOB_TRANSITIONS, (JobState.HELD, "renew"))
        with pytest.raises(segq.UsageError, match="cannot renew the job at .*: it is already held"):
            job.renew()
        job.ack()
        with pytest.raises(segq.UsageError, match="cannot nack the job at .*: it is already acked"):
            job.nack()


def test_consumer_kinds_are_an_enum_naming_the_cursor_files(queue_dir: pathlib.Path) -> None:
    fill(queue_dir, 1)
    with WorkQueue(queue_dir, "workers"), segq.Receiver(queue_dir, "reader"):
        kinds = {name: kind for kind, name, _ in list_cursors(queue_dir)}
    assert kinds == {"workers": ConsumerKind.GROUP, "reader": ConsumerKind.RECEIVER}
    assert (queue_dir / "cursors" / "g.workers.pos").exists()


def test_remove_unregisters_a_closed_group(queue_dir: pathlib.Path) -> None:
    fill(queue_dir, 200)
    queue = WorkQueue(queue_dir, "gone")
    with pytest.raises(segq.Locked):
        WorkQueue.remove(queue_dir, "gone")
    queue.close()
    WorkQueue.remove(queue_dir, "gone")
    assert list_groups(queue_dir) == []


def test_a_worker_may_be_shared_by_threads(queue_dir: pathlib.Path) -> None:
    records = fill(queue_dir, 300)
    seen: list[bytes] = []
    with WorkQueue(queue_dir) as queue:

        def work() -> None:
            while (job := queue.try_claim()) is not None:
                seen.append(job.data)
                job.ack()

        threads = [threading.Thread(target=work) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
    assert sorted(seen) == sorted(records)


def test_a_worker_copied_by_fork_refuses_to_work(queue_dir: pathlib.Path) -> None:
    fill(queue_dir, 1)
    with WorkQueue(queue_dir) as queue:
        pid = os.fork()
        if pid == 0:
            try:
                queue.claim(timeout=0)
            except segq.UsageError:
                os._exit(7)
            os._exit(1)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 7
        assert queue.claim(timeout=0).data == b"r0"


# -- the journal: compaction, crashes mid-compaction, damage -----------------


def test_compaction_keeps_the_state(queue_dir: pathlib.Path, monkeypatch: pytest.MonkeyPatch, clock: Clock) -> None:
    monkeypatch.setattr(_journal, "DEFAULT_CAPACITY", 1024)
    fill(queue_dir, 300)
    with WorkQueue(queue_dir, clock=clock) as queue, WorkQueue(queue_dir, clock=clock) as other:
        held = queue.claim(timeout=0)
        queue.claim(timeout=0).nack(delay=100, reason="later")
        for _ in range(100):
            other.claim(timeout=0).ack()
        assert group_info(queue_dir)["journal"]["generation"] > 3
        info = group_info(queue_dir)
        assert len(info["claims"]) == 1 and len(info["waiting"]) == 1
        assert info["done_above_mark"] == 100
        held.ack()
    with WorkQueue(queue_dir, clock=clock) as reopened:
        assert len(ack_all(reopened)) == 198


def test_a_compaction_interrupted_after_sealing_is_undone(queue_dir: pathlib.Path) -> None:
    fill(queue_dir, 3)
    with WorkQueue(queue_dir) as queue:
        queue.claim(timeout=1).ack()
        held = queue.claim(timeout=1)
        # What a compactor killed between sealing and renaming leaves behind.
        journal = _journal.Journal(queue_dir / "groups" / "default")
        journal.seal()
        journal.close()
        assert held.attempt == 1
        held.ack()
        queue.claim(timeout=1).ack()
    with WorkQueue(queue_dir) as reopened:
        assert reopened.try_claim() is None


def test_a_damaged_journal_is_an_error_naming_the_file_and_recover_repairs_it(queue_dir: pathlib.Path) -> None:
    fill(queue_dir, 4)
    with WorkQueue(queue_dir) as queue:
        for _ in range(3):
            queue.claim(timeout=1).ack()
    path = queue_dir / "groups" / "default" / "journal"
    journal = _journal.Journal(path.parent)
    end = journal.end
    journal.map[end - 3] ^= 0xFF  # a bit flip in the last ack
    journal.close()
    with pytest.raises(segq.CorruptionError) as caught:
        WorkQueue(queue_dir)
    assert caught.value.path == str(path) and "segq recover" in str(caught.value)
    dry = recover_group(queue_dir, dry_run=True)
    assert dry.repairs and dry.dry_run
    report = recover_group(queue_dir)
    assert any("cut the journal" in repair for repair in report.repairs)
    # The cursor, written when the worker closed, still knows r2 was done.
    assert any("moved the low-water mark" in repair for repair in report.repairs)
    with WorkQueue(queue_dir) as queue:
        assert ack_all(queue) == [b"r3"]


def test_a_cut_journal_gives_claims_again_never_loses_them(queue_dir: pathlib.Path) -> None:
    fill(queue_dir, 3)
    queue = WorkQueue(queue_dir)
    queue.claim(timeout=1).ack()
    queue.claim(timeout=1).ack()  # this ack is cut below; the cursor is never written (no close)
    path = queue_dir / "groups" / "default"
    journal = _journal.Journal(path)
    journal.map[journal.end - 3] ^= 0xFF
    journal.close()
    recover_group(queue_dir)
    later = Clock()
    later.now = time.time() + 3600  # the claim whose ack was cut has run out of lease
    with WorkQueue(queue_dir, clock=later) as other:
        assert ack_all(other) == [b"r1", b"r2"]
    queue._abandon()  # as a killed process would leave it


def test_a_missing_journal_is_rebuilt_at_the_mark(queue_dir: pathlib.Path) -> None:
    fill(queue_dir, 200)
    with WorkQueue(queue_dir) as queue:
        for _ in range(100):
            queue.claim(timeout=1).ack()
    mark = segq._state.read_position(queue_dir / "cursors" / "g.default.pos")
    os.unlink(queue_dir / "groups" / "default" / "journal")
    with WorkQueue(queue_dir) as queue:
        first = queue.claim(timeout=1)
        assert first.position >= segq.Position(mark.segment, 32)
        assert first.position <= segq.Position(mark.segment, mark.offset)


def test_recover_gives_back_claims_of_dead_workers(queue_dir: pathlib.Path) -> None:
    import subprocess
    import sys

    fill(queue_dir, 1)
    code = "import segq, os; segq.WorkQueue(%r, lease=3600).claim(timeout=5); os._exit(0)" % str(queue_dir)
    env = {**os.environ, "PYTHONPATH": str(pathlib.Path(segq.__file__).parent.parent)}
    subprocess.run([sys.executable, "-c", code], env=env, timeout=60, check=True)
    report = recover_group(queue_dir)
    assert [item["attempt"] for item in report.returned] == [1]
    assert group_info(queue_dir)["claims"] == []
    assert report.to_dict()["returned"][0]["position"] == {"segment": 0, "offset": 32}
    with WorkQueue(queue_dir) as queue:
        assert queue.claim(timeout=0).attempt == 2


def test_group_info_of_a_missing_group_is_an_error(queue_dir: pathlib.Path) -> None:
    fill(queue_dir, 1)
    with pytest.raises(segq.SegqError, match="no work-queue group"):
        group_info(queue_dir, "nope")
    with pytest.raises(segq.SegqError, match="no work-queue group"):
        recover_group(queue_dir, "nope")


# -- the dead-letter envelope -----------------------------------------------


@given(
    data=st.binary(max_size=200),
    attempts=st.integers(0, 2**32 - 1),
    reason=st.text(max_size=50),
    group=st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,20}", fullmatch=True),
)
def test_dead_letter_round_trips(data: bytes, attempts: int, reason: str, group: str) -> None:
    letter = DeadLetter(data, attempts, reason, group, segq.Position(3, 4096), 12.5)
    encoded = letter.encode()
    decoded = DeadLetter.decode(encoded)
    assert decoded.data == data and decoded.attempts == attempts and decoded.group == group
    assert decoded.reason == reason.encode("utf-8", "replace").decode("utf-8", "replace")
    assert decoded.position == segq.Position(3, 4096) and decoded.dead_at == 12.5
    for cut in range(len(encoded) - len(data)):
        with pytest.raises(segq.SegqError):
            DeadLetter.decode(encoded[:cut])


def test_dead_letter_decode_refuses_other_records() -> None:
    with pytest.raises(segq.SegqError, match="not a segq dead letter"):
        DeadLetter.decode(b"hello world, this is not an envelope at all")
