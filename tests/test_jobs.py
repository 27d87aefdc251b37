"""Jobs: options at enqueue (run_at, delay, priority, dedup_key, job_id), GroupStats."""

from __future__ import annotations

import datetime
import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from _harness import ack_all

import segq
from segq.workqueue import WorkQueue

SEGMENT_SIZE = 1 << 16


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_higher_priorities_are_claimed_first_and_equal_ones_in_send_order(queue_dir: pathlib.Path) -> None:
    with segq.Sender(queue_dir, segment_size=SEGMENT_SIZE) as tx:
        for index, priority in enumerate([0, 3, 9, 3, 0, 9, 5]):
            tx.enqueue(b"%d:%d" % (priority, index), priority=priority)
        tx.send(b"0:7")
    with WorkQueue(queue_dir) as wq:
        assert ack_all(wq) == [b"9:2", b"9:5", b"5:6", b"3:1", b"3:3", b"0:0", b"0:4", b"0:7"]


def test_a_batch_claim_takes_the_best_jobs_in_one_transaction(queue_dir: pathlib.Path) -> None:
    with segq.Sender(queue_dir, segment_size=SEGMENT_SIZE) as tx:
        for index in range(20):
            tx.enqueue(b"%d" % index, priority=index % 3)
    with WorkQueue(queue_dir) as wq:
        batch = wq.claim_batch(7, timeout=1)  # six of priority 2, then the first of priority 1
        assert sorted((-job.priority, int(job.data)) for job in batch) == [(-2, 2 + 3 * n) for n in range(6)] + [(-1, 1)]
        batch.ack()
        assert [int(data) for data in ack_all(wq)] == [4, 7, 10, 13, 16, 19, 0, 3, 6, 9, 12, 15, 18]
    with WorkQueue(queue_dir) as wq:  # a fresh replica: the skipped records keep their turn
        assert wq.try_claim() is None


def test_a_scheduled_job_waits_without_spending_an_attempt_and_due_ones_go_in_time_order(
    queue_dir: pathlib.Path,
) -> None:
    now = time.time()
    clock = Clock(now)
    with segq.Sender(queue_dir, segment_size=SEGMENT_SIZE) as tx:
        tx.enqueue(b"in 30 s", run_at=now + 30)
        tx.enqueue(b"in 10 s", run_at=datetime.datetime.fromtimestamp(now + 10, datetime.timezone.utc))
        tx.enqueue(b"in 20 s", delay=20)
    with WorkQueue(queue_dir, clock=clock) as wq:
        assert wq.try_claim() is None
        assert wq.stats().scheduled == 3
        clock.now = now + 25
        first, second = wq.try_claim(), wq.try_claim()
        assert first is not None and second is not None
        assert (first.data, first.attempt, second.data) == (b"in 10 s", 1, b"in 20 s")
        assert first.run_at == pytest.approx(now + 10)
        assert wq.try_claim() is None
        first.ack()
        second.ack()
        clock.now = now + 31
        assert ack_all(wq) == [b"in 30 s"]


def test_a_claimer_waiting_wakes_when_a_scheduled_job_comes_due(queue_dir: pathlib.Path) -> None:
    with segq.Sender(queue_dir, segment_size=SEGMENT_SIZE) as tx:
        tx.enqueue(b"soon", delay=0.3)
    with WorkQueue(queue_dir) as wq:
        started = time.monotonic()
        job = wq.claim(timeout=5)
        assert job.data == b"soon" and 0.2 < time.monotonic() - started < 3
        job.ack()


def test_a_job_id_comes_back_on_the_claimed_job(queue_dir: pathlib.Path) -> None:
    with segq.Sender(queue_dir, segment_size=SEGMENT_SIZE) as tx:
        plain = tx.enqueue(b"a", headers={"trace": "1"})
        named = tx.enqueue(b"b", job_id="invoice-7", priority=1)
    assert plain == segq.Enqueued(plain.id, False) and named.id == "invoice-7"
    with WorkQueue(queue_dir) as wq:
        first, second = wq.claim(timeout=1), wq.claim(timeout=1)
        assert (first.id, first.priority, first.headers) == ("invoice-7", 1, {"segq-id": b"invoice-7", "segq-priority": b"1"})
        assert (second.id, second.headers, second.run_at) == (plain.id, {"trace": b"1"}, None)


def test_a_plain_receiver_sees_the_options_as_reserved_headers(queue_dir: pathlib.Path) -> None:
    with segq.Sender(queue_dir, segment_size=SEGMENT_SIZE) as tx:
        tx.enqueue(b"x", priority=4, dedup_key="k", run_at=2_000_000_000.5)
    with segq.Receiver(queue_dir) as rx, rx.recv(timeout=1) as message:
        assert message.headers == {
            "segq-priority": b"4",
            "segq-run-at": b"2000000000.5",
            "segq-dedup-key": b"k",
        }


@pytest.mark.parametrize(
    "options, problem",
    [
        ({"priority": 10}, "priority must be an int from 0 to 9"),
        ({"priority": -1}, "priority must be an int from 0 to 9"),
        ({"priority": True}, "priority must be an int"),
        ({"run_at": "tomorrow"}, "run_at must be a datetime or seconds"),
        ({"run_at": float("nan")}, "run_at must be"),
        ({"delay": -1}, "delay must be a finite number"),
        ({"delay": 1, "run_at": 5.0}, "not both"),
        ({"dedup_key": ""}, "dedup_key must be a non-empty str"),
        ({"dedup_key": 7}, "dedup_key must be a non-empty str"),
        ({"job_id": b"x"}, "job_id must be a non-empty str"),
        ({"headers": {"segq-priority": b"9"}}, "reserved"),
        ({"headers": {"": b"1"}}, "non-empty str"),
        ({"headers": {"k": 5}}, "bytes or str"),
        ({"headers": [("k", b"v")]}, "mapping"),
    ],
)
def test_bad_options_raise_invalid_argument_and_write_nothing(
    queue_dir: pathlib.Path, options: dict[str, object], problem: str
) -> None:
    with segq.Sender(queue_dir, segment_size=SEGMENT_SIZE) as tx:
        with pytest.raises(segq.InvalidArgument, match=problem):
            tx.enqueue(b"job", **options)  # type: ignore[arg-type]
        tx.send(b"after")
    with segq.Receiver(queue_dir) as rx, rx.recv(timeout=1) as message:
        assert message.data == b"after"


def test_stats_count_where_the_jobs_are(queue_dir: pathlib.Path) -> None:
    now = time.time()
    clock = Clock(now)
    with segq.Sender(queue_dir, segment_size=SEGMENT_SIZE) as tx:
        for index in range(6):
            tx.enqueue(b"%d" % index)
        tx.enqueue(b"later", run_at=now + 100)
    with WorkQueue(queue_dir, clock=clock, max_attempts=1, lease=10) as wq:
        empty_age = wq.stats()
        held = wq.claim(timeout=1)
        acked = wq.claim(timeout=1)
        acked.ack()
        dead = wq.claim(timeout=1)
        dead.nack(reason="poison")
        clock.now = now + 5
        stats = wq.stats()
    assert empty_age.pending == 6 and empty_age.oldest_pending_age is not None
    assert (stats.pending, stats.scheduled, stats.claimed, stats.retrying, stats.done, stats.dead) == (3, 1, 1, 0, 1, 1)
    assert stats.oldest_pending_age is not None and stats.oldest_pending_age >= 5
    assert held.data == b"0"


def test_stats_count_a_given_back_job_as_retrying(queue_dir: pathlib.Path) -> None:
    with segq.Sender(queue_dir, segment_size=SEGMENT_SIZE) as tx:
        tx.enqueue(b"a")
    with WorkQueue(queue_dir) as wq:
        wq.claim(timeout=1).nack(delay=60)
        assert wq.stats() == segq.GroupStats(0, 0, 0, 1, 0, 0, None)


# -- dedup ----------------------------------------------------------------


def test_a_dedup_key_returns_the_first_jobs_id_while_it_is_pending(queue_dir: pathlib.Path) -> None:
    with segq.Sender(queue_dir, segment_size=SEGMENT_SIZE) as tx, segq.Sender(queue_dir) as other:
        first = tx.enqueue(b"charge", dedup_key="order-1")
        assert other.enqueue(b"charge again", dedup_key="order-1") == segq.Enqueued(first.id, True)
        assert tx.enqueue(b"other order", dedup_key="order-2").duplicate is False
        with pytest.raises(segq.DuplicateJobId) as caught:
            other.enqueue(b"x", job_id=first.id)
        assert caught.value.job_id == first.id
    with WorkQueue(queue_dir) as wq:
        assert ack_all(wq) == [b"charge", b"other order"]


def test_a_settled_job_blocks_its_key_for_the_window_then_frees_it(queue_dir: pathlib.Path) -> None:
    with segq.Sender(queue_dir, segment_size=SEGMENT_SIZE, dedup_window=0.3) as tx:
        first = tx.enqueue(b"a", dedup_key="k")
        with WorkQueue(queue_dir) as wq:
            wq.claim(timeout=1).ack()  # the group saves its position within CURSOR_INTERVAL of an ack
            assert tx.enqueue(b"b", dedup_key="k") == segq.Enqueued(first.id, True)
            time.sleep(0.35)
            again = tx.enqueue(b"c", dedup_key="k")
            assert not again.duplicate and again.id != first.id
            assert ack_all(wq) == [b"c"]


def test_a_new_process_remembers_keys_whose_segments_were_deleted(queue_dir: pathlib.Path) -> None:
    with segq.Sender(queue_dir, segment_size=SEGMENT_SIZE) as tx:
        first = tx.enqueue(b"a" * 1000, dedup_key="k")
        with WorkQueue(queue_dir) as wq:
            tx.enqueue(b"seen settled", dedup_key="other")  # a keyed enqueue while the first is pending
            wq.claim(timeout=1).ack()
            wq.claim(timeout=1).ack()
            tx.enqueue(b"notice", dedup_key="third")  # sees "k" settled
            for _ in range(200):
                tx.send(b"f" * 1000)  # rolls segments; the consumed ones are deleted
            ack_all(wq)
    assert min(int(name.split(".")[0]) for name in os.listdir(queue_dir) if name.endswith(".seg")) > 0
    with segq.Sender(queue_dir) as fresh:
        assert fresh.enqueue(b"again", dedup_key="k") == segq.Enqueued(first.id, True)


_RACER = """
import sys, segq
result = segq.Sender(sys.argv[1]).enqueue(b"payload " + sys.argv[2].encode(), dedup_key="the-key")
print(result.id, result.duplicate)
"""


def test_processes_racing_one_key_write_it_once_and_agree_on_the_id(queue_dir: pathlib.Path) -> None:
    segq.Sender(queue_dir, segment_size=SEGMENT_SIZE).close()
    env = {**os.environ, "PYTHONPATH": str(pathlib.Path(segq.__file__).parent.parent)}
    racers = [
        subprocess.Popen([sys.executable, "-c", _RACER, str(queue_dir), str(index)], stdout=subprocess.PIPE, env=env)
        for index in range(6)
    ]
    results = [racer.communicate(timeout=60)[0].decode().split() for racer in racers]
    assert all(racer.returncode == 0 for racer in racers)
    assert len({job_id for job_id, _ in results}) == 1
    assert sorted(duplicate for _, duplicate in results) == ["False"] + ["True"] * 5
    with WorkQueue(queue_dir) as wq:
        assert len(ack_all(wq)) == 1


_KILLED = """
import sys, segq
sender = segq.Sender(sys.argv[1])
sys.stdout.write("ready\\n"); sys.stdout.flush()
sys.stdin.readline()
for index in range(1000000):
    sender.enqueue(b"job", dedup_key="key-%d" % index)
"""


def test_a_sender_killed_mid_enqueue_lets_no_duplicate_through_and_loses_no_original(queue_dir: pathlib.Path) -> None:
    segq.Sender(queue_dir, segment_size=1 << 20).close()
    env = {**os.environ, "PYTHONPATH": str(pathlib.Path(segq.__file__).parent.parent)}
    child = subprocess.Popen(
        [sys.executable, "-c", _KILLED, str(queue_dir)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env
    )
    assert child.stdout is not None and child.stdin is not None
    child.stdout.readline()
    child.stdin.write(b"go\n")
    child.stdin.flush()
    time.sleep(0.3)
    child.send_signal(signal.SIGKILL)
    child.wait()
    child.stdin.close()
    child.stdout.close()
    with segq.Receiver(queue_dir, name="check") as rx:
        written = set()
        while (message := rx.try_recv()) is not None:
            written.add(message.headers["segq-dedup-key"].decode())
            message.commit()
    assert written, "the child wrote nothing before it was killed"
    last = max(int(key.split("-")[1]) for key in written)
    with segq.Sender(queue_dir) as tx:
        for index in range(last + 3):
            result = tx.enqueue(b"again", dedup_key=f"key-{index}")
            assert result.duplicate == (f"key-{index}" in written), index


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.sampled_from(["enqueue", "consume"]), st.integers(0, 1), st.sampled_from("abc")), max_size=30))
def test_dedup_matches_a_model_across_two_senders(tmp_path_factory: pytest.TempPathFactory, steps: list) -> None:  # type: ignore[type-arg]
    queue_dir = tmp_path_factory.mktemp("dedup") / "queue"
    blocked: dict[str, str] = {}  # key -> id, while its job is in the queue (window: for ever)
    in_queue: list[tuple[str, str]] = []
    with segq.Sender(queue_dir, segment_size=SEGMENT_SIZE, dedup_window=3600) as first, segq.Sender(
        queue_dir, dedup_window=3600
    ) as second, segq.Receiver(queue_dir) as rx:
        senders = [first, second]
        for action, which, key in steps:
            if action == "enqueue":
                result = senders[which].enqueue(key.encode(), dedup_key=key)
                if key in blocked:
                    assert result == segq.Enqueued(blocked[key], True)
                else:
                    assert not result.duplicate
                    blocked[key] = result.id
                    in_queue.append((key, result.id))
            elif in_queue:
                with rx.recv(timeout=1) as message:
                    assert message.data == in_queue.pop(0)[0].encode()


def test_a_default_job_id_names_its_own_record_while_other_threads_send(queue_dir: pathlib.Path) -> None:
    import threading

    with segq.Sender(queue_dir) as tx:
        ids: dict[str, bytes] = {}

        def enqueue() -> None:
            for number in range(400):
                data = b"job %d" % number
                ids[tx.enqueue(data).id] = data

        def send() -> None:
            for number in range(400):
                tx.send(b"plain %d" % number)

        threads = [threading.Thread(target=enqueue), threading.Thread(target=send)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    with WorkQueue(queue_dir) as wq:
        for _ in range(800):
            with wq.claim(timeout=5) as job:
                if job.data.startswith(b"job"):
                    assert ids[job.id] == job.data
