"""Power loss at rollover: a new segment whose header page never reached the disk.

Under ``sync="never"`` a Sender creates its rollover segments without a sync,
so after a power loss the newest segment can exist with its header (and with
it page 0, the first records) all zeros or torn, and later pages of records
present or not.  The queue must not be bricked: a plain reopen rewrites the
last segment's header from its file name and cuts the queue back to the
records that reached the disk in order; so does ``segq recover``.  A zero
header in any other segment is damage: ``CorruptionError``, and
``segq recover --loss`` gets past it.
"""

from __future__ import annotations

import mmap
import os
import pathlib
import shutil

import pytest
from click.testing import CliRunner

import segq
from segq import recovery
from segq._format import HEADER_SIZE, SEGMENT_HEADER_SIZE, encode_segment_header
from segq._scan import scan_segment
from segq._segment import list_segments, segment_path
from segq.cli import cli

PAYLOAD = 200
RECORD = HEADER_SIZE + PAYLOAD


def payload(seq: int) -> bytes:
    return f"{seq:08d}".encode().ljust(PAYLOAD, b".")


def build(queue: pathlib.Path, *, segments: int = 3, extra: int = 60) -> list[int]:
    """Fill a queue under sync="never" until it has ``segments`` segments plus ``extra`` records; return records per segment."""
    seq = 0
    with segq.Sender(queue, segment_size=64 << 10, sync="never") as sender:
        while len(list_segments(queue)) < segments:
            sender.send(payload(seq))
            seq += 1
        for _ in range(extra):
            sender.send(payload(seq))
            seq += 1
    numbers = list_segments(queue)
    counts = [scan_segment(str(queue), number, last=number == numbers[-1]).records for number in numbers]
    assert sum(counts) == seq
    return counts


def zero(path: str, start: int, end: int) -> None:
    with open(path, "r+b") as handle:
        handle.seek(start)
        handle.write(bytes(end - start))


def read_all(queue: pathlib.Path, name: str = "check") -> list[int]:
    seqs = []
    with segq.Receiver(queue, name) as receiver:
        while (message := receiver.try_recv()) is not None:
            seqs.append(int(message.data[:8]))
            message.commit()
    return seqs


def still_works(queue: pathlib.Path) -> None:
    """Send after the repair, read it back in order (the survivors were read already), verify the queue clean."""
    with segq.Sender(queue, segment_size=64 << 10, sync="never") as sender:
        for seq in range(1000, 1400):  # enough to roll over again
            sender.send(payload(seq))
    assert read_all(queue) == list(range(1000, 1400))
    report = recovery.verify(queue)
    assert report.ok, report.to_json()


# What a power loss leaves in the last segment, and how many of its records survive:
# page 0 (header and first records) never written back, later pages there;
# only the header sector's first bytes lost; a torn header; nothing of the segment at all.
STATES = {
    "header page zero, later pages present": (lambda size: (0, mmap.PAGESIZE), lambda count: 0),
    "header zero, records present": (lambda size: (0, SEGMENT_HEADER_SIZE), lambda count: count),
    "header torn, records present": (lambda size: (12, SEGMENT_HEADER_SIZE), lambda count: count),
    "whole segment zero": (lambda size: (0, size), lambda count: 0),
}


@pytest.mark.parametrize("control", ["control file kept", "control file lost"])
@pytest.mark.parametrize("state", list(STATES))
def test_a_reopen_restores_the_last_segment_header_and_keeps_what_reached_the_disk(
    tmp_path: pathlib.Path, state: str, control: str
) -> None:
    queue = tmp_path / "queue"
    counts = build(queue)
    last = segment_path(queue, list_segments(queue)[-1])
    span, kept = STATES[state]
    zero(last, *span(os.path.getsize(last)))
    if control == "control file lost":
        os.unlink(queue / "segq.ctl")
    survived = list(range(sum(counts[:-1]) + kept(counts[-1])))
    assert read_all(queue) == survived
    assert pathlib.Path(last).read_bytes()[:SEGMENT_HEADER_SIZE] == encode_segment_header(list_segments(queue)[-1])
    still_works(queue)


@pytest.mark.parametrize("state", list(STATES))
def test_segq_recover_restores_the_last_segment_header_and_keeps_what_reached_the_disk(
    tmp_path: pathlib.Path, state: str
) -> None:
    queue = tmp_path / "queue"
    counts = build(queue)
    segq.Receiver(queue, "check").close()  # registered at the bottom
    last = segment_path(queue, list_segments(queue)[-1])
    span, kept = STATES[state]
    zero(last, *span(os.path.getsize(last)))
    before = recovery.verify(queue)
    assert any(repair.start == 0 and "header" in repair.reason for repair in before.torn), before.to_json()
    dry = recovery.recover(queue, "check", dry_run=True)
    header = encode_segment_header(list_segments(queue)[-1])
    assert dry.headers and pathlib.Path(last).read_bytes()[:SEGMENT_HEADER_SIZE] != header  # a dry run writes nothing
    result = CliRunner().invoke(cli, ["recover", str(queue), "--name", "check"])
    assert result.exit_code == 0, result.output
    assert "rewrote" in result.output and "header" in result.output
    again = recovery.recover(queue, "check")
    assert not again.headers and not again.cut  # idempotent
    survived = list(range(sum(counts[:-1]) + kept(counts[-1])))
    assert read_all(queue) == survived
    still_works(queue)


def test_an_unsealed_segment_before_an_empty_unwritten_one_takes_the_tail_back(tmp_path: pathlib.Path) -> None:
    """The rollover segment never reached the disk at all, nor did the end marker of the one before."""
    queue = tmp_path / "queue"
    counts = build(queue, extra=0)
    numbers = list_segments(queue)
    zero(segment_path(queue, numbers[-1]), 0, os.path.getsize(segment_path(queue, numbers[-1])))
    before = segment_path(queue, numbers[-2])
    scan = scan_segment(str(queue), numbers[-2], last=False)
    assert scan.sealed
    zero(before, scan.data_end, scan.data_end + HEADER_SIZE)  # the end marker was lost too
    survived = list(range(sum(counts[:-1])))  # the last segment's records are gone with it
    assert read_all(queue) == survived
    still_works(queue)


def test_a_zero_header_before_the_last_segment_is_damage_that_recover_loss_skips(tmp_path: pathlib.Path) -> None:
    queue = tmp_path / "queue"
    counts = build(queue, segments=4)
    segq.Receiver(queue, "check").close()
    numbers = list_segments(queue)
    middle = segment_path(queue, numbers[-2])
    zero(middle, 0, SEGMENT_HEADER_SIZE)
    shutil.copy(middle, tmp_path / "evidence")
    seqs = []
    with pytest.raises(segq.CorruptionError), segq.Receiver(queue, "check") as receiver:
        while (message := receiver.try_recv()) is not None:
            seqs.append(int(message.data[:8]))
            message.commit()
    assert seqs == list(range(sum(counts[:-2])))  # everything before the damage
    assert pathlib.Path(middle).read_bytes() == (tmp_path / "evidence").read_bytes()  # never rewritten on open
    assert recovery.recover(queue, "check").headers == []
    report = recovery.recover_with_loss(queue, "check")  # gives up the damaged segment
    assert report.dropped_records >= 1
    assert read_all(queue) == list(range(sum(counts[:-1]), sum(counts)))
    still_works(queue)


def test_only_zeroed_bytes_of_the_right_header_count_as_never_written(tmp_path: pathlib.Path) -> None:
    from segq._segment import header_never_written, restore_unwritten_header

    right = encode_segment_header(7)
    assert header_never_written(bytes(SEGMENT_HEADER_SIZE), 7)
    assert header_never_written(right[:20] + bytes(12), 7)  # torn
    assert not header_never_written(right, 7)  # intact: nothing to do
    assert not header_never_written(encode_segment_header(8)[:20] + bytes(12), 7)  # another segment's
    assert not header_never_written(bytes(8) + b"\xff" + bytes(23), 7)  # a byte no writer puts there
    # A torn version-1 header is restored as version 1, so an older segq reads it still.
    queue = tmp_path / "queue"
    queue.mkdir()
    old = encode_segment_header(7, 1)
    pathlib.Path(segment_path(queue, 7)).write_bytes(old[:12] + bytes(20) + bytes(4096))
    assert restore_unwritten_header(queue, 7)
    assert pathlib.Path(segment_path(queue, 7)).read_bytes()[:SEGMENT_HEADER_SIZE] == old
    assert not restore_unwritten_header(queue, 7)  # idempotent


@pytest.mark.parametrize("state", ["header page zero, later pages present", "whole segment zero"])
def test_clear_drops_a_last_segment_whose_header_never_reached_the_disk(tmp_path: pathlib.Path, state: str) -> None:
    queue = tmp_path / "queue"
    build(queue)
    segq.Receiver(queue, "check").close()
    last = segment_path(queue, list_segments(queue)[-1])
    span, _ = STATES[state]
    zero(last, *span(os.path.getsize(last)))
    recovery.clear(queue)
    assert read_all(queue) == []
    still_works(queue)
