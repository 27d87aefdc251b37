"""A batch larger than segment_size: written whole and atomic in a segment of its own."""

from __future__ import annotations

import os
import pathlib
import signal
import subprocess
import sys
import textwrap
import time

import segq
from segq import recovery
from segq._inspect import verify
from segq._segment import list_segments, segment_path

SEGMENT_SIZE = 64 << 10


def drain(queue: pathlib.Path, name: str = "default") -> list[bytes]:
    got = []
    with segq.Receiver(queue, name) as rx:
        while True:
            try:
                batch = rx.recv_batch(1000, timeout=0)
            except segq.Empty:
                return got
            got += [msg.data for msg in batch]
            batch.commit()


def segment_sizes(queue: pathlib.Path) -> list[int]:
    return [os.path.getsize(segment_path(queue, number)) for number in list_segments(queue)]


def test_a_batch_larger_than_a_segment_is_written_whole_in_a_larger_segment(queue_dir: pathlib.Path) -> None:
    batch = [bytes([index]) * 1000 for index in range(200)]  # ~200 KB framed, three segments' worth
    with segq.Sender(queue_dir, segment_size=SEGMENT_SIZE) as tx:
        tx.send(b"before")
        tx.send_batch(batch)
        tx.send(b"after")
    sizes = segment_sizes(queue_dir)
    assert sizes[0] == SEGMENT_SIZE and sizes[1] > SEGMENT_SIZE  # "after" may share the batch's page-rounded segment
    report = verify(queue_dir)
    assert not report.damaged and not report.torn and report.records == 202
    assert drain(queue_dir) == [b"before", *batch, b"after"]


def test_readers_see_a_large_batch_whole_or_not_at_all_in_any_reading_mode(queue_dir: pathlib.Path) -> None:
    batch = [b"%06d" % index + b"." * 500 for index in range(1000)]
    with segq.Sender(queue_dir, segment_size=SEGMENT_SIZE) as tx, segq.Receiver(queue_dir, "one") as one:
        segq.Receiver(queue_dir, "batches").close()  # registered: it keeps every segment for its drain below
        assert one.try_recv() is None
        tx.send_batch(batch)
        tx.send_batch([(b"headed", {"k": b"v"}), *batch[:300]])
        seen = []
        while (msg := one.try_recv()) is not None:
            seen.append(msg.data)
            msg.commit()
    assert seen == [*batch, b"headed", *batch[:300]]
    assert drain(queue_dir, "batches") == seen


def test_a_queue_with_an_oversized_segment_reopens_recovers_and_goes_on(queue_dir: pathlib.Path) -> None:
    batch = [b"b%d" % index * 100 for index in range(2000)]
    with segq.Sender(queue_dir, segment_size=SEGMENT_SIZE) as tx:
        tx.send_batch(batch)
    os.unlink(queue_dir / "segq.ctl")  # the next opener rebuilds the tail by scanning the large segment
    with segq.Sender(queue_dir, segment_size=SEGMENT_SIZE) as tx:
        tx.send(b"next")
    assert recovery.recover(queue_dir) is not None
    assert not verify(queue_dir).damaged
    assert drain(queue_dir) == [*batch, b"next"]
    with segq.Sender(queue_dir, segment_size=SEGMENT_SIZE) as tx:
        tx.send(b"later")
    assert drain(queue_dir) == [b"later"]


def test_only_a_record_over_max_record_size_is_refused(queue_dir: pathlib.Path) -> None:
    with segq.Sender(queue_dir, segment_size=SEGMENT_SIZE, max_record_size=1000) as tx:
        tx.send_batch([b"x" * 1000] * 200)
        try:
            tx.send_batch([b"x" * 1000] * 200 + [b"y" * 1001])
        except segq.RecordTooLarge as error:
            assert error.size == 1001 and error.limit == 1000
        else:
            raise AssertionError("a record over max_record_size was accepted")
    assert drain(queue_dir) == [b"x" * 1000] * 200


_BIG_SENDER = textwrap.dedent(
    """
    import sys, segq
    path = sys.argv[1]
    with segq.Sender(path, segment_size=1 << 20) as tx:
        tx.send(b"start")
        print("ready", flush=True)
        for round in range(1_000_000):
            # 16 MiB per batch: sixteen segments' worth, so a kill lands in its copy often.
            tx.send_batch([b"%d:%d:" % (round, index) + b"." * 65000 for index in range(256)])
    """
)


def test_sigkill_during_a_large_batch_leaves_nothing_of_it_and_later_records_are_fine(tmp_path: pathlib.Path) -> None:
    for trial, delay in enumerate((0.0, 0.01, 0.03, 0.06, 0.1, 0.15)):
        queue = tmp_path / f"q{trial}"
        child = subprocess.Popen(
            [sys.executable, "-c", _BIG_SENDER, str(queue)],
            stdout=subprocess.PIPE,
            env=dict(os.environ, PYTHONPATH=str(pathlib.Path(segq.__file__).parent.parent)),
        )
        assert child.stdout is not None and child.stdout.readline() == b"ready\n"
        time.sleep(delay)
        child.send_signal(signal.SIGKILL)
        child.wait()
        child.stdout.close()
        with segq.Sender(queue, segment_size=1 << 20) as tx:  # takes the append lock over: cuts the torn batch
            tx.send(b"after")
        # A kill between creating the next segment and sealing this one leaves
        # that empty segment, which verify reports and recover seals (see
        # test_recovery.test_an_unsealed_segment_is_sealed); nothing else.
        problems = {damage.problem for damage in verify(queue).damaged}
        assert problems <= {"no end-of-segment marker"}
        recovery.recover(queue)
        assert verify(queue).ok
        got = drain(queue)
        assert got[0] == b"start" and got[-1] == b"after"
        rounds: dict[bytes, list[int]] = {}
        for record in got[1:-1]:
            round_tag, index, _ = record.split(b":", 2)
            rounds.setdefault(round_tag, []).append(int(index))
        for indexes in rounds.values():
            assert indexes == list(range(256)), "a batch was seen in part"

