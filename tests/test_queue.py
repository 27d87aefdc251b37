"""Sender and Receiver as their docstrings and the README describe them, in one process."""

from __future__ import annotations

import os
import pathlib
import threading

import pytest

import segq
from segq._segment import list_segments

SMALL = 4096  # a segment holds a few dozen small records: rollover is exercised everywhere


def drain(rx: segq.Receiver) -> list[bytes]:
    """Receive and commit everything that is there now."""
    got = []
    while (msg := rx.try_recv()) is not None:
        got.append(msg.data)
        msg.commit()
    return got


def test_records_arrive_in_order_across_segments(queue_dir: pathlib.Path) -> None:
    records = [b"record %d" % i * (i % 7) for i in range(500)]
    with segq.Sender(queue_dir, segment_size=SMALL) as tx:
        for record in records:
            tx.send(record)
    assert len(list_segments(queue_dir)) > 3
    with segq.Receiver(queue_dir) as rx:
        assert drain(rx) == records


def test_bytes_like_payloads_and_empty_records(queue_dir: pathlib.Path) -> None:
    with segq.Sender(queue_dir, segment_size=SMALL) as tx:
        tx.send(bytearray(b"ab"))
        tx.send(memoryview(b"cd"))
        tx.send(b"")
        with pytest.raises(TypeError, match="encode"):
            tx.send("text")  # type: ignore[arg-type]
    with segq.Receiver(queue_dir) as rx:
        assert drain(rx) == [b"ab", b"cd", b""]


def test_rollback_redelivers_and_commit_moves_on(queue_dir: pathlib.Path) -> None:
    with segq.Sender(queue_dir) as tx:
        tx.send(b"a")
        tx.send(b"b")
    with segq.Receiver(queue_dir) as rx:
        msg = rx.recv(timeout=1)
        assert msg.data == b"a"
        msg.rollback()
        assert rx.recv(timeout=1).data == b"a"
        rx.commit()
        with rx.recv(timeout=1) as msg:
            assert msg.data == b"b"
        assert not msg.pending
        with pytest.raises(segq.Empty):
            rx.recv(timeout=0.05)


def test_an_exception_in_the_with_block_rolls_back(queue_dir: pathlib.Path) -> None:
    with segq.Sender(queue_dir) as tx:
        tx.send(b"job")
    with segq.Receiver(queue_dir) as rx:
        with pytest.raises(RuntimeError):
            with rx.recv(timeout=1):
                raise RuntimeError("handler failed")
        assert rx.recv(timeout=1).data == b"job"


def test_uncommitted_messages_come_back_after_restart(queue_dir: pathlib.Path) -> None:
    with segq.Sender(queue_dir) as tx:
        tx.send_batch([b"1", b"2", b"3"])
    with segq.Receiver(queue_dir) as rx:
        rx.recv(timeout=1).commit()
        rx.recv(timeout=1)  # pending, never committed
    with segq.Receiver(queue_dir) as rx:
        assert drain(rx) == [b"2", b"3"]


def test_one_pending_message_at_a_time(queue_dir: pathlib.Path) -> None:
    with segq.Sender(queue_dir) as tx:
        tx.send_batch([b"1", b"2"])
    with segq.Receiver(queue_dir) as rx:
        msg = rx.recv(timeout=1)
        for call in (lambda: rx.recv(timeout=0), rx.try_recv, lambda: rx.recv_batch(5)):
            with pytest.raises(segq.UsageError, match="pending"):
                call()
        msg.commit()
        with pytest.raises(segq.UsageError, match="not pending"):
            msg.commit()
        with pytest.raises(segq.UsageError, match="nothing pending"):
            rx.commit()


def test_recv_batch_takes_what_is_ready(queue_dir: pathlib.Path) -> None:
    with segq.Sender(queue_dir, segment_size=SMALL) as tx:
        tx.send_batch([b"%d" % i for i in range(10)])
    with segq.Receiver(queue_dir) as rx:
        batch = rx.recv_batch(4, timeout=1)
        assert [m.data for m in batch] == [b"0", b"1", b"2", b"3"]
        with pytest.raises(segq.UsageError, match="batch"):
            batch[0].commit()
        batch.rollback()
        with rx.recv_batch(100, timeout=1) as batch:
            assert len(batch) == 10
        with pytest.raises(segq.Empty):
            rx.recv_batch(3, timeout=0.05)
        with pytest.raises(segq.InvalidArgument):
            rx.recv_batch(0)


def test_iteration_commits_each_message_when_the_next_is_asked_for(queue_dir: pathlib.Path) -> None:
    with segq.Sender(queue_dir) as tx:
        tx.send_batch([b"1", b"2", b"3", b"4"])
    with segq.Receiver(queue_dir) as rx:
        seen = []
        with pytest.raises(ValueError):
            for msg in rx:
                seen.append(msg.data)
                if msg.data == b"3":
                    raise ValueError("bad record")
        assert seen == [b"1", b"2", b"3"]
        # 1 and 2 were committed; 3 raised, so it is not.
        assert rx.recv(timeout=1).data == b"3"


def test_names_fan_out_and_new_names_start_at_the_oldest_retained_record(queue_dir: pathlib.Path) -> None:
    records = [b"r%03d" % i * 10 for i in range(300)]
    with segq.Sender(queue_dir, segment_size=SMALL) as tx:
        for record in records:
            tx.send(record)
    with segq.Receiver(queue_dir, "a") as a, segq.Receiver(queue_dir, "b") as b:
        assert drain(a) == records
        first = len(list_segments(queue_dir))
        assert drain(b) == records
        assert len(list_segments(queue_dir)) < first  # both past: consumed segments deleted
    with segq.Receiver(queue_dir, "late") as late:
        retained = drain(late)  # what the tail segment still holds
    assert 0 < len(retained) < len(records)
    assert retained == records[-len(retained) :]


def test_segments_stay_until_every_receiver_is_past_them(queue_dir: pathlib.Path) -> None:
    with segq.Sender(queue_dir, segment_size=SMALL) as tx:
        for i in range(300):
            tx.send(b"x" * 50)
    with segq.Receiver(queue_dir, "slow"):
        pass
    with segq.Receiver(queue_dir, "fast") as fast:
        drain(fast)
    count = len(list_segments(queue_dir))
    assert count > 3
    segq.Receiver.remove(queue_dir, "slow")
    assert len(list_segments(queue_dir)) == 1  # only the tail segment is left


def test_a_second_live_receiver_of_a_name_is_refused_naming_the_pid(queue_dir: pathlib.Path) -> None:
    with segq.Receiver(queue_dir, "worker", create=True):
        with pytest.raises(segq.Locked, match=str(os.getpid())) as caught:
            segq.Receiver(queue_dir, "worker")
        assert caught.value.pid == os.getpid()
        with pytest.raises(segq.Locked):
            segq.Receiver.remove(queue_dir, "worker")
    segq.Receiver(queue_dir, "worker").close()  # released on close


def test_record_too_large_writes_nothing(queue_dir: pathlib.Path) -> None:
    with segq.Sender(queue_dir, segment_size=SMALL, max_record_size=100) as tx:
        with pytest.raises(segq.RecordTooLarge):
            tx.send(b"x" * 101)
        with pytest.raises(segq.RecordTooLarge):
            tx.send_batch([b"ok", b"x" * 101])
        tx.send(b"x" * 100)
    with segq.Receiver(queue_dir) as rx:
        assert drain(rx) == [b"x" * 100]


def test_use_after_close_raises_closed(queue_dir: pathlib.Path) -> None:
    tx = segq.Sender(queue_dir)
    rx = segq.Receiver(queue_dir)
    tx.close()
    rx.close()
    tx.close()
    rx.close()
    with pytest.raises(segq.Closed):
        tx.send(b"x")
    with pytest.raises(segq.Closed):
        rx.recv()
    with pytest.raises(segq.Closed):
        tx.sync()


@pytest.mark.parametrize("sync", ["never", "always", 0.05])
def test_every_sync_policy_delivers(queue_dir: pathlib.Path, sync: str | float) -> None:
    with segq.Sender(queue_dir, segment_size=SMALL, sync=sync) as tx:
        for i in range(100):
            tx.send(b"%d" % i)
        tx.flush()
        tx.sync()
    with segq.Receiver(queue_dir, sync=sync) as rx:
        assert len(drain(rx)) == 100
    with segq.Receiver(queue_dir) as rx:
        assert drain(rx) == []


def test_bad_options_are_refused_clearly(queue_dir: pathlib.Path) -> None:
    with pytest.raises(segq.SegqError, match="sync"):
        segq.Sender(queue_dir, sync="sometimes")
    with pytest.raises(segq.SegqError, match="segment_size"):
        segq.Sender(queue_dir, segment_size=10)
    with pytest.raises(segq.SegqError, match="max_record_size"):
        segq.Sender(queue_dir, segment_size=SMALL, max_record_size=SMALL)
    with pytest.raises(segq.SegqError, match="receiver name"):
        segq.Receiver(queue_dir, "../escape")


def test_backpressure_blocks_until_a_receiver_commits(queue_dir: pathlib.Path) -> None:
    with segq.Sender(queue_dir, segment_size=SMALL, max_queue_bytes=1000) as tx, segq.Receiver(queue_dir) as rx:
        for _ in range(9):
            tx.send(b"x" * 100)
        with pytest.raises(segq.Full):
            tx.send(b"x" * 100, timeout=0.05)

        def consume() -> None:
            for _ in range(5):
                rx.recv(timeout=5).commit()

        consumer = threading.Thread(target=consume)
        consumer.start()
        tx.send(b"y" * 100, timeout=10)  # returns once the consumer made room
        consumer.join()
        with pytest.raises(segq.Full, match="never fit"):
            tx.send(b"z" * 2000, timeout=0)


def test_the_queue_directory_is_created_with_parents(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "a" / "b" / "queue"
    with segq.Sender(str(path)) as tx:
        tx.send(b"x")
    assert path.is_dir()


def test_unrelated_files_in_the_queue_directory_are_ignored(queue_dir: pathlib.Path) -> None:
    queue_dir.mkdir()
    (queue_dir / "notes.txt").write_text("hello")
    (queue_dir / "12.seg").write_text("not a segment name")
    (queue_dir / "000000000099.seg.1234.tmp").write_bytes(b"leftover")
    with segq.Sender(queue_dir) as tx:
        tx.send(b"x")
    with segq.Receiver(queue_dir) as rx:
        assert drain(rx) == [b"x"]


def test_a_path_that_is_a_file_is_a_clear_error(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "file"
    path.write_text("x")
    with pytest.raises(segq.SegqError, match="not a queue directory"):
        segq.Sender(path)
    with pytest.raises(segq.SegqError, match="not a queue directory"):
        segq.Receiver(path)


def test_a_future_format_segment_is_refused(queue_dir: pathlib.Path) -> None:
    with segq.Sender(queue_dir) as tx:
        tx.send(b"x")
    segment = queue_dir / "000000000000.seg"
    with open(segment, "r+b") as handle:
        handle.seek(8)
        handle.write((3).to_bytes(4, "little"))
    os.unlink(queue_dir / "segq.ctl")
    with pytest.raises(segq.UnsupportedFormat, match="upgrade segq"):
        segq.Receiver(queue_dir)


def test_a_cursor_with_both_slots_damaged_is_a_clear_error(queue_dir: pathlib.Path) -> None:
    with segq.Sender(queue_dir) as tx:
        tx.send(b"x")
    segq.Receiver(queue_dir).close()
    cursor = queue_dir / "cursors" / "r.default.pos"
    cursor.write_bytes(b"\xff" * 1024)
    with pytest.raises(segq.CorruptionError, match="both position slots") as caught:
        segq.Receiver(queue_dir)
    assert caught.value.path == str(cursor) and caught.value.offset == 0
    assert "segq recover" in str(caught.value)


def test_threads_share_a_sender(queue_dir: pathlib.Path) -> None:
    with segq.Sender(queue_dir, segment_size=SMALL) as tx:

        def produce(tag: int) -> None:
            for i in range(300):
                tx.send(b"%d:%d" % (tag, i))

        threads = [threading.Thread(target=produce, args=(tag,)) for tag in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    with segq.Receiver(queue_dir) as rx:
        got = drain(rx)
    assert len(got) == 1200
    for tag in range(4):
        mine = [int(r.split(b":")[1]) for r in got if r.startswith(b"%d:" % tag)]
        assert mine == list(range(300))


def test_positions_are_comparable_and_printable() -> None:
    assert segq.Position(1, 100) < segq.Position(2, 32) < segq.Position(2, 33)
    assert str(segq.Position(3, 4096)) == "segment 3 offset 4096"


def test_interpreter_exit_closes_what_was_left_open(queue_dir: pathlib.Path) -> None:
    import subprocess
    import sys

    script = (
        "import segq, sys\n"
        "tx = segq.Sender(sys.argv[1], sync=30.0)\n"  # the group commit would not run for 30 s
        "tx.send(b'kept')\n"
        "rx = segq.Receiver(sys.argv[1], 'left-open')\n"
    )
    subprocess.run([sys.executable, "-c", script, str(queue_dir)], check=True, timeout=60)
    assert not any((queue_dir / "senders").iterdir())  # the sender's lock file is gone: it was closed
    with segq.Receiver(queue_dir, "left-open") as rx:  # not Locked: closed at exit
        assert drain(rx) == [b"kept"]


def test_a_smaller_leftover_next_segment_is_skipped(queue_dir: pathlib.Path) -> None:
    from segq._segment import create_segment

    with segq.Sender(queue_dir, segment_size=16384) as tx:
        for _ in range(100):
            tx.send(b"x" * 100)
    create_segment(queue_dir, 1, 16384, durable=False)  # left by a sender killed mid-rollover
    with segq.Sender(queue_dir, segment_size=1 << 20) as tx:
        tx.send_batch([b"y" * 1000] * 100)  # fits this sender's segments, not the leftover one
    with segq.Receiver(queue_dir) as rx:
        assert drain(rx) == [b"x" * 100] * 100 + [b"y" * 1000] * 100
