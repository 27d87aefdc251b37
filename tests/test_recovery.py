"""segq.recovery: unlocking, guessing, both recovery strategies, verify, info and clear.

Queues are left behind by real killed processes where the state can be made
that way (dead lock holders, a consumer killed with a message pending), and
by editing bytes where it cannot be timed (a torn write, a flipped bit).
"""

from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys
import tempfile

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import segq
from segq import recovery
from segq._format import HEADER_SIZE, SEGMENT_HEADER_SIZE, encode_batch, encode_record
from segq._segment import create_segment, list_segments, segment_path

ROOT = pathlib.Path(__file__).resolve().parent.parent
SMALL = 4096
RECORD = 60  # framed size of each record fill() sends: 52-byte payload + 8-byte header
PER_SEGMENT = (SMALL - SEGMENT_HEADER_SIZE - HEADER_SIZE) // RECORD


def fill(queue_dir: pathlib.Path, count: int, start: int = 0) -> list[bytes]:
    """Send ``count`` numbered 52-byte records; return them."""
    records = [b"record %06d " % number + b"." * 38 for number in range(start, start + count)]
    with segq.Sender(queue_dir, segment_size=SMALL) as sender:
        for record in records:
            sender.send(record)
    return records


def drain(queue_dir: pathlib.Path, name: str = "default") -> tuple[list[bytes], segq.SegqError | None]:
    """Receive and commit until the queue is empty or a record cannot be read."""
    got: list[bytes] = []
    with segq.Receiver(queue_dir, name) as receiver:
        while True:
            try:
                message = receiver.recv(timeout=0.05)
            except segq.Empty:
                return got, None
            except segq.SegqError as error:
                return got, error
            got.append(message.data)
            message.commit()


def consume(queue_dir: pathlib.Path, count: int, name: str = "default") -> None:
    with segq.Receiver(queue_dir, name) as receiver:
        for _ in range(count):
            receiver.recv(timeout=5).commit()


def flip_byte(path: str, offset: int) -> None:
    with open(path, "r+b") as handle:
        handle.seek(offset)
        value = handle.read(1)[0]
        handle.seek(offset)
        handle.write(bytes([value ^ 0x55]))


def snapshot(queue_dir: pathlib.Path) -> dict[str, bytes]:
    return {str(path): path.read_bytes() for path in sorted(queue_dir.rglob("*")) if path.is_file()}


def record_offset(index_in_segment: int) -> int:
    return SEGMENT_HEADER_SIZE + index_in_segment * RECORD


def forget_clean_shutdown(queue_dir: pathlib.Path) -> None:
    """Make the queue look like its processes crashed: the next opener scans instead of trusting the tail."""
    os.unlink(queue_dir / "segq.ctl")


def killed_child(code: str) -> int:
    """Run ``code`` in a child process until it prints "ready", SIGKILL it, and return its PID."""
    child = subprocess.Popen(
        [sys.executable, "-c", code + "\nprint('ready', flush=True)\nimport time\ntime.sleep(60)"],
        stdout=subprocess.PIPE,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline() == b"ready\n"
        return child.pid
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
        if child.stdout is not None:
            child.stdout.close()


# -- unlocking ---------------------------------------------------------------------


def test_a_live_receiver_is_named_and_a_killed_ones_lock_is_removed(queue_dir: pathlib.Path) -> None:
    fill(queue_dir, 5)
    lock = queue_dir / "cursors" / "r.default.lock"
    with segq.Receiver(queue_dir):
        for call in (recovery.unlock_queue, recovery.unlock_for_receiving, recovery.recover):
            with pytest.raises(segq.Locked, match=f"PID {os.getpid()}") as caught:
                call(queue_dir)  # type: ignore[operator]
            assert caught.value.pid == os.getpid()
        with pytest.raises(segq.Locked):
            recovery.unlock(lock)
    pid = killed_child(f"import segq; receiver = segq.Receiver({str(queue_dir)!r})")
    assert lock.exists()
    [holder] = recovery.lock_holders(queue_dir)
    assert (holder.pid, holder.alive, holder.what) == (pid, False, "receiver 'default'")
    assert recovery.unlock_for_receiving(queue_dir) == [holder]
    assert not lock.exists()
    assert recovery.unlock(lock) is False  # absent: a no-op
    assert recovery.unlock_queue(queue_dir) == []


def test_a_reused_pid_counts_as_dead(tmp_path: pathlib.Path) -> None:
    lock = tmp_path / "r.default.lock"
    lock.write_text(f"{os.getpid()} 12345.0\n")  # our PID, but a process that started long ago
    assert recovery.unlock(lock) is True
    assert not lock.exists()


def test_unlock_for_sending_removes_dead_senders_then_names_a_live_one(queue_dir: pathlib.Path) -> None:
    fill(queue_dir, 1)
    dead = killed_child(f"import segq; sender = segq.Sender({str(queue_dir)!r}, segment_size={SMALL})")
    with segq.Sender(queue_dir, segment_size=SMALL):
        with pytest.raises(segq.Locked, match=f"PID {os.getpid()}"):
            recovery.unlock_for_sending(queue_dir)
        assert [holder.pid for holder in recovery.lock_holders(queue_dir)] == [os.getpid()]
    assert dead != os.getpid()
    assert recovery.unlock_for_sending(queue_dir) == []


def test_a_lock_path_that_is_a_directory_is_a_clear_error(tmp_path: pathlib.Path) -> None:
    with pytest.raises(segq.SegqError, match="directory"):
        recovery.unlock(tmp_path)


# -- guessing ------------------------------------------------------------------------


def test_guesses_follow_the_saved_position_or_the_smallest_segment(queue_dir: pathlib.Path) -> None:
    fill(queue_dir, PER_SEGMENT * 4)
    consume(queue_dir, PER_SEGMENT + 3)
    assert recovery.guess_recv_metadata(queue_dir) == segq.Position(1, record_offset(3))
    assert recovery.guess_recv_metadata_with_loss(queue_dir) == segq.Position.bottom(2)
    assert list_segments(queue_dir)[0] == 1
    cursor = queue_dir / "cursors" / "r.default.pos"
    cursor.write_bytes(b"\xff" * 1024)  # both slots damaged
    assert recovery.guess_recv_metadata(queue_dir) == segq.Position.bottom(1)
    assert recovery.guess_recv_metadata_with_loss(queue_dir) == segq.Position.bottom(2)


def test_a_saved_position_inside_a_record_moves_back_to_its_start(queue_dir: pathlib.Path) -> None:
    fill(queue_dir, 10)
    consume(queue_dir, 1)
    recovery._write_cursor(str(queue_dir / "cursors" / "r.default.pos"), segq.Position(0, record_offset(4) + 7))
    assert recovery.guess_recv_metadata(queue_dir) == segq.Position(0, record_offset(4))
    report = recovery.recover(queue_dir)
    assert report.receivers == {"default": segq.Position(0, record_offset(4))}
    got, error = drain(queue_dir)
    assert error is None and got[0].startswith(b"record 000004")


def test_guesses_refuse_what_is_not_a_queue(tmp_path: pathlib.Path) -> None:
    with pytest.raises(segq.SegqError, match="does not exist"):
        recovery.guess_recv_metadata(tmp_path / "missing")
    (tmp_path / "file").write_bytes(b"x")
    with pytest.raises(segq.SegqError, match="is a file"):
        recovery.recover(tmp_path / "file")
    with pytest.raises(segq.SegqError, match="not a segq queue"):
        recovery.info(tmp_path)


# -- recover: queues left by killed processes ---------------------------------------------


def test_a_consumer_killed_with_a_message_pending_loses_nothing(queue_dir: pathlib.Path) -> None:
    records = fill(queue_dir, PER_SEGMENT * 3)
    code = f"""
import segq
receiver = segq.Receiver({str(queue_dir)!r})
for _ in range({PER_SEGMENT + 5}):
    receiver.recv(timeout=5).commit()
pending = receiver.recv(timeout=5)
"""
    pid = killed_child(code)
    report = recovery.recover(queue_dir)
    assert [(holder.pid, holder.what) for holder in report.unlocked] == [(pid, "receiver 'default'")]
    assert report.receivers == {"default": segq.Position(1, record_offset(5))}
    assert not report.cut and not report.damaged
    assert recovery.recover(queue_dir).changed is False  # idempotent
    got, error = drain(queue_dir)
    assert error is None
    assert got == records[PER_SEGMENT + 5 :]  # the pending record came again; nothing was skipped


def test_a_torn_write_of_a_killed_sender_is_cut(queue_dir: pathlib.Path) -> None:
    records = fill(queue_dir, 10)
    killed_child(f"import segq; sender = segq.Sender({str(queue_dir)!r}, segment_size={SMALL})")
    tail = record_offset(10)
    with open(segment_path(queue_dir, 0), "r+b") as segment:
        segment.seek(tail + HEADER_SIZE)
        segment.write(b"a payload whose header was never written")
    forget_clean_shutdown(queue_dir)
    before = snapshot(queue_dir)
    dry = recovery.recover(queue_dir, dry_run=True)
    assert snapshot(queue_dir) == before  # a dry run writes nothing
    assert [(cut.start, cut.reason) for cut in dry.cut] == [(tail, "torn write")]
    assert dry.changed and len(dry.unlocked) == 1
    assert recovery.lock_holders(queue_dir)  # a dry run removes nothing
    report = recovery.recover(queue_dir)
    assert [(cut.path, cut.start, cut.end) for cut in report.cut] == [
        (segment_path(queue_dir, 0), tail, tail + HEADER_SIZE + 40)
    ]
    assert recovery.recover(queue_dir).changed is False
    records += fill(queue_dir, 1, start=10)
    assert drain(queue_dir) == (records, None)


def test_an_unsealed_segment_is_sealed(queue_dir: pathlib.Path) -> None:
    records = fill(queue_dir, PER_SEGMENT // 2)
    # A sender killed between creating the next segment and sealing this one.
    create_segment(queue_dir, 1, SMALL, durable=False)
    forget_clean_shutdown(queue_dir)
    assert [damage.problem for damage in recovery.verify(queue_dir).damaged] == ["no end-of-segment marker"]
    report = recovery.recover(queue_dir)
    assert [(seal.path, seal.start) for seal in report.sealed] == [
        (segment_path(queue_dir, 0), record_offset(PER_SEGMENT // 2))
    ]
    assert recovery.verify(queue_dir).ok
    assert drain(queue_dir) == (records, None)


def test_a_damaged_cursor_is_rebuilt_at_the_replay_position(queue_dir: pathlib.Path) -> None:
    records = fill(queue_dir, PER_SEGMENT * 2)
    consume(queue_dir, PER_SEGMENT + 2)
    (queue_dir / "cursors" / "r.default.pos").write_bytes(bytes(1024))
    with pytest.raises(segq.CorruptionError, match="r.default.pos"):
        segq.Receiver(queue_dir)
    assert not recovery.verify(queue_dir).ok
    report = recovery.recover(queue_dir)
    assert report.previous == {"default": None}
    assert report.receivers == {"default": segq.Position.bottom(1)}
    assert drain(queue_dir) == (records[PER_SEGMENT:], None)  # a few replayed, none lost


def test_recovering_while_a_sender_is_live_moves_the_receiver_but_leaves_segments(queue_dir: pathlib.Path) -> None:
    fill(queue_dir, PER_SEGMENT * 2)
    consume(queue_dir, 3)
    (queue_dir / "cursors" / "r.default.pos").write_bytes(bytes(1024))
    with segq.Sender(queue_dir, segment_size=SMALL) as sender:
        with open(segment_path(queue_dir, 1), "r+b") as segment:  # bytes past the tail, as a live write leaves
            segment.seek(4000)
            segment.write(b"in flight")
        report = recovery.recover(queue_dir)
        assert [holder.pid for holder in report.in_use] == [os.getpid()]
        assert report.receivers == {"default": segq.Position.bottom(0)}
        assert not report.cut and any("skipped" in note for note in report.notes)
        sender.send(b"still works")


def test_loss_refuses_to_skip_the_segment_a_live_sender_writes(queue_dir: pathlib.Path) -> None:
    fill(queue_dir, 5)
    consume(queue_dir, 1)
    (queue_dir / "cursors" / "r.default.pos").write_bytes(bytes(1024))
    with segq.Sender(queue_dir, segment_size=SMALL), pytest.raises(segq.Locked, match="last segment") as caught:
        recovery.recover_with_loss(queue_dir)
    assert caught.value.pid == os.getpid()


def test_an_unregistered_name_is_left_alone(queue_dir: pathlib.Path) -> None:
    fill(queue_dir, 3)
    consume(queue_dir, 1, name="worker")
    report = recovery.recover(queue_dir)
    assert report.receivers == {} and not report.changed
    assert "registered: worker" in report.notes[0]
    assert not (queue_dir / "cursors" / "r.default.pos").exists()


# -- both strategies on a damaged middle segment ----------------------------------------------


def test_replay_stops_at_the_damage_and_loss_skips_the_rest_of_that_segment(queue_dir: pathlib.Path) -> None:
    records = fill(queue_dir, PER_SEGMENT * 5)
    consume(queue_dir, PER_SEGMENT * 2 + 5)  # the receiver is in segment 2
    damaged = segment_path(queue_dir, 2)
    flip_byte(damaged, record_offset(20) + HEADER_SIZE + 3)

    report = recovery.recover(queue_dir)
    assert [(damage.path, damage.offset) for damage in report.damaged] == [(damaged, record_offset(20))]
    assert report.receivers == {"default": segq.Position(2, record_offset(5))} and not report.changed
    assert "will stop at" in report.notes[0]
    got, error = drain(queue_dir)
    assert got == records[PER_SEGMENT * 2 + 5 : PER_SEGMENT * 2 + 20]
    assert isinstance(error, segq.CorruptionError)
    assert (error.path, error.offset) == (damaged, record_offset(20))

    dry = recovery.recover_with_loss(queue_dir, dry_run=True)
    assert dry.receivers == {"default": segq.Position.bottom(3)} and os.path.exists(damaged)
    report = recovery.recover_with_loss(queue_dir)
    assert report.receivers == {"default": segq.Position.bottom(3)}
    assert report.previous == {"default": segq.Position(2, record_offset(20))}
    assert report.dropped_records == PER_SEGMENT - 20  # the damaged record and the intact ones after it
    assert report.dropped_bytes == (PER_SEGMENT - 20) * RECORD
    assert report.deleted_segments == [2]
    assert recovery.recover_with_loss(queue_dir).changed is False  # idempotent: nothing left to skip
    assert drain(queue_dir) == (records[PER_SEGMENT * 3 :], None)


def test_loss_does_not_skip_a_good_segment_for_damage_further_on(queue_dir: pathlib.Path) -> None:
    records = fill(queue_dir, PER_SEGMENT * 4)
    flip_byte(segment_path(queue_dir, 2), record_offset(0) + HEADER_SIZE)
    segq.Receiver(queue_dir).close()
    report = recovery.recover_with_loss(queue_dir)
    assert report.receivers == {"default": segq.Position.bottom(0)} and report.dropped_records == 0
    assert "will stop at" in report.notes[0]
    got, error = drain(queue_dir)
    assert got == records[: PER_SEGMENT * 2] and error is not None
    assert recovery.recover_with_loss(queue_dir).dropped_records == PER_SEGMENT
    assert drain(queue_dir) == (records[PER_SEGMENT * 3 :], None)


def test_a_damaged_last_segment_is_sealed_so_the_queue_opens_again(queue_dir: pathlib.Path) -> None:
    records = fill(queue_dir, PER_SEGMENT + 10)
    segq.Receiver(queue_dir).close()
    flip_byte(segment_path(queue_dir, 1), record_offset(4) + HEADER_SIZE)
    forget_clean_shutdown(queue_dir)
    with pytest.raises(segq.CorruptionError, match="followed by valid records"):
        segq.Sender(queue_dir, segment_size=SMALL)
    report = recovery.recover(queue_dir)
    assert [seal.start for seal in report.sealed] == [record_offset(10)]
    assert report.created == [segment_path(queue_dir, 2)]
    fill(queue_dir, 1, start=999)
    got, error = drain(queue_dir)
    assert got == records[: PER_SEGMENT + 4] and isinstance(error, segq.CorruptionError)
    report = recovery.recover_with_loss(queue_dir)
    assert report.dropped_records == 6 and report.receivers == {"default": segq.Position.bottom(2)}
    assert drain(queue_dir) == ([b"record 000999 " + b"." * 38], None)


def test_a_receiver_that_must_skip_the_last_segment_gets_a_new_one(queue_dir: pathlib.Path) -> None:
    fill(queue_dir, 5)
    consume(queue_dir, 2)
    (queue_dir / "cursors" / "r.default.pos").write_bytes(bytes(1024))
    report = recovery.recover_with_loss(queue_dir)
    assert report.receivers == {"default": segq.Position.bottom(1)}
    assert report.dropped_records == 5 and report.deleted_segments == [0]
    assert report.created == [segment_path(queue_dir, 1)]
    fill(queue_dir, 1, start=5)
    assert drain(queue_dir) == ([b"record 000005 " + b"." * 38], None)


# -- verify, info, clear -----------------------------------------------------------------


def test_verify_finds_each_damaged_span_and_resumes_after_it(queue_dir: pathlib.Path) -> None:
    fill(queue_dir, PER_SEGMENT * 4)
    assert recovery.verify(queue_dir).to_json()["ok"] is True
    flip_byte(segment_path(queue_dir, 0), record_offset(3) + HEADER_SIZE + 10)  # a payload bit
    with open(segment_path(queue_dir, 1), "r+b") as segment:  # garbage over two and a half records
        segment.seek(record_offset(7) + 5)
        segment.write(os.urandom(150))
    os.unlink(segment_path(queue_dir, 2))
    report = recovery.verify(queue_dir)
    found = [(os.path.basename(damage.path), damage.offset, damage.end) for damage in report.damaged]
    assert found == [
        ("000000000002.seg", 0, 0),
        ("000000000000.seg", record_offset(3), record_offset(4)),
        ("000000000001.seg", record_offset(7), record_offset(10)),
    ]
    assert "missing" in report.damaged[0].problem
    assert report.records == PER_SEGMENT * 3 - 4
    assert json.loads(json.dumps(report.to_json()))["damaged"][1]["offset"] == record_offset(3)


def test_a_torn_batch_is_a_torn_tail_not_damage(queue_dir: pathlib.Path) -> None:
    fill(queue_dir, 3)
    batch = encode_batch([b"one", b"two", b"three"])
    with open(segment_path(queue_dir, 0), "r+b") as segment:  # payloads written, first header not yet
        segment.seek(record_offset(3) + HEADER_SIZE)
        segment.write(batch[HEADER_SIZE:])
    report = recovery.verify(queue_dir)
    assert report.ok and report.records == 3
    assert [(torn.start, torn.end) for torn in report.torn] == [(record_offset(3), record_offset(3) + len(batch))]
    with open(segment_path(queue_dir, 0), "r+b") as segment:  # a batch whose last record never came
        segment.seek(record_offset(3))
        segment.write(bytes(len(batch)))
        segment.seek(record_offset(3))
        segment.write(encode_record(b"one", continues=True) + encode_record(b"two", continues=True))
    scan = recovery.scan_segment(queue_dir, 0, last=True)
    assert (scan.records, scan.data_end) == (3, record_offset(3))


def test_every_prefix_of_a_pwrite_cut_short_by_a_kill_is_a_torn_tail(queue_dir: pathlib.Path) -> None:
    # A large append is one pwrite of headers and payloads together; a sender
    # killed inside it leaves any prefix of those bytes past the tail.
    fill(queue_dir, 3)
    batch = encode_batch([b"one" * 200, b"two" * 300, b"three" * 100])
    single = encode_batch([b"x" * 1500])
    for framed in (batch, single):
        for cut in range(1, len(framed), 97):
            with open(segment_path(queue_dir, 0), "r+b") as segment:
                segment.seek(record_offset(3))
                segment.write(bytes(len(framed)))
                segment.seek(record_offset(3))
                segment.write(framed[:cut])
            report = recovery.verify(queue_dir)
            assert report.ok and report.records == 3, (len(framed), cut)
            assert [torn.start for torn in report.torn] == [record_offset(3)], (len(framed), cut)
    forget_clean_shutdown(queue_dir)
    assert [cut.start for cut in recovery.recover(queue_dir).cut] == [record_offset(3)]
    records = fill(queue_dir, 1, start=3)
    assert drain(queue_dir)[0][-1:] == records


def test_info_counts_each_consumers_backlog_and_lists_lock_holders(queue_dir: pathlib.Path) -> None:
    fill(queue_dir, PER_SEGMENT * 2)
    consume(queue_dir, 2, name="slow")
    consume(queue_dir, PER_SEGMENT + 1, name="fast")
    pid = killed_child(f"import segq; sender = segq.Sender({str(queue_dir)!r}, segment_size={SMALL})")
    snapshot = recovery.info(queue_dir, scan=True)
    backlogs = {consumer.name: (consumer.backlog_records, consumer.backlog_bytes) for consumer in snapshot.consumers}
    summary = recovery.info(queue_dir)  # O(segments): the same bytes and tail, no record counts
    assert {consumer.name: (consumer.backlog_records, consumer.backlog_bytes) for consumer in summary.consumers} == {
        name: (None, size) for name, (_, size) in backlogs.items()
    }
    assert summary.records is None and summary.tail == snapshot.tail and not summary.scanned
    assert backlogs == {
        "fast": (PER_SEGMENT - 1, (PER_SEGMENT - 1) * RECORD),
        "slow": (PER_SEGMENT * 2 - 2, (PER_SEGMENT * 2 - 2) * RECORD),
    }
    assert snapshot.records == PER_SEGMENT * 2 and snapshot.format_version == 2
    assert snapshot.tail == segq.Position(1, record_offset(PER_SEGMENT))
    assert [(holder.pid, holder.alive, holder.what) for holder in snapshot.locks] == [(pid, False, "sender")]
    assert snapshot.bytes_on_disk > 0 and snapshot.segment_bytes == 2 * SMALL
    assert json.loads(json.dumps(snapshot.to_json()))["consumers"][1]["name"] == "slow"
    recovery.unlock_queue(queue_dir)  # inspection left the killed sender's lock and semaphore: clean them up


def test_clear_drops_every_record_and_refuses_a_live_receiver(queue_dir: pathlib.Path) -> None:
    fill(queue_dir, PER_SEGMENT * 2)
    consume(queue_dir, 1)
    with segq.Receiver(queue_dir), pytest.raises(segq.Locked, match=f"PID {os.getpid()}"):
        recovery.clear(queue_dir)
    report = recovery.clear(queue_dir)
    assert report.dropped_records == PER_SEGMENT * 2 - 1
    assert report.receivers == {"default": segq.Position.bottom(2)} and report.deleted_segments == [0, 1]
    assert drain(queue_dir) == ([], None)
    assert drain(queue_dir, "new") == ([], None)  # a receiver registered later sees nothing old either
    fill(queue_dir, 1, start=7)
    assert drain(queue_dir) == ([b"record 000007 " + b"." * 38], None)


def test_clear_with_a_live_sender_moves_receivers_to_its_tail(queue_dir: pathlib.Path) -> None:
    fill(queue_dir, PER_SEGMENT * 2)
    consume(queue_dir, 1)
    with segq.Sender(queue_dir, segment_size=SMALL) as sender:
        report = recovery.clear(queue_dir)
        assert report.receivers == {"default": segq.Position(1, record_offset(PER_SEGMENT))}
        sender.send(b"after the clear")
    assert drain(queue_dir) == ([b"after the clear"], None)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(start=st.integers(SEGMENT_HEADER_SIZE, SMALL - 1), garbage=st.binary(min_size=1, max_size=300))
def test_scanning_any_damage_never_raises_and_keeps_what_lies_before_it(
    tmp_path: pathlib.Path, start: int, garbage: bytes
) -> None:
    queue_dir = pathlib.Path(tempfile.mkdtemp(dir=tmp_path)) / "queue"  # hypothesis reuses tmp_path
    fill(queue_dir, PER_SEGMENT)  # one full, sealed segment; the next one is empty
    with open(segment_path(queue_dir, 0), "r+b") as segment:
        segment.seek(start)
        segment.write(garbage[: SMALL - start])
    scan = recovery.scan_segment(queue_dir, 0, last=False)
    intact_before = (start - SEGMENT_HEADER_SIZE) // RECORD
    assert scan.records >= intact_before  # every record before the damage is counted
    spans = [(damage.offset, damage.end) for damage in scan.damage]
    assert spans == sorted(spans) and all(SEGMENT_HEADER_SIZE <= a <= b <= SMALL for a, b in spans)
    assert SEGMENT_HEADER_SIZE <= scan.data_end <= SMALL
    assert recovery.verify(queue_dir).records == scan.records
