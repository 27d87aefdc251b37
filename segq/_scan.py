"""Scanning segments for verify, info and recover: intact runs, damaged spans, torn tails.

Theory of operation
-------------------
``_segment.scan_records`` walks records until the first one that is not
intact: enough to find a tail.  Recovery needs more: where the damage is,
how long it is, and whether intact records follow it.  :func:`scan_segment`
walks a segment (read-only, through a memory map) checking every checksum;
past a bad record it *resynchronises*: it tries the damaged record's own
length first (a flipped payload bit leaves it right), then every byte, and
accepts a place only if its checksum holds and the headers after it are
plausible.  So damage in the middle of a segment becomes a span (file,
offset, length) and the records after it are still counted.

The last segment follows the rule ``Control`` applies on open: zeros end the
data, and anything after them is the torn remains of an interrupted write,
as is a ``send_batch`` whose last record never came.  In other segments,
bytes that fail are damage.

The walk is the scan's speed.  Small records go through the C speedups'
``decode_run`` when it is built (about 600 MB/s on 100-byte records,
against 280 MB/s for the Python loop); large ones through the Python loop,
whose ``zlib.crc32`` checksums faster (about 2 GB/s on 4 KiB records).
"""

from __future__ import annotations

import itertools
import mmap
import os
import re
import struct
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from . import _format
from ._format import (
    CONTINUES,
    END_MARKER,
    END_OF_SEGMENT,
    HEADED_CRC,
    HEADER_SIZE,
    LENGTH_CRC,
    LENGTH_MASK,
    RECORD_HEADER,
    SEGMENT_HEADER_SIZE,
    RecordStatus,
    decode_record,
)
from ._segment import (
    StrPath,
    dirty_end_in_file,
    header_never_written,
    list_segments,
    open_segment_file,
    read_segment_header,
    segment_path,
)
from ._state import Position
from .errors import CorruptionError

__all__ = [
    "Progress",
    "Damage",
    "Repair",
    "SegmentScan",
    "scan_segment",
    "missing_segments",
    "QueueScans",
    "position_json",
]

Progress = Callable[[int], None]  # called with a number of bytes just scanned


def position_json(position: Position | None) -> dict[str, int] | None:
    """Return ``position`` as the JSON the reports use."""
    return None if position is None else {"segment": position.segment, "offset": position.offset}


@dataclass(frozen=True)
class Damage:
    """Bytes that fail their checksum or framing: ``path``, ``offset`` to ``end``, and why."""

    path: str
    offset: int
    end: int
    problem: str

    def __str__(self) -> str:
        return f"{self.path} offset {self.offset}: {self.problem} ({self.end - self.offset} bytes)"

    def to_json(self) -> dict[str, Any]:
        return {"path": self.path, "offset": self.offset, "end": self.end, "problem": self.problem}


@dataclass(frozen=True)
class Repair:
    """A change to a segment's bytes, ``path`` from ``start`` to ``end``: made by recovery, or due at the next open."""

    path: str
    start: int
    end: int
    reason: str

    def to_json(self) -> dict[str, Any]:
        return {"path": self.path, "start": self.start, "end": self.end, "reason": self.reason}


@dataclass
class SegmentScan:
    """What :func:`scan_segment` found in one segment.

    ``runs`` are the stretches of intact records, ``(start, end, records)``;
    ``damage`` the spans between them.  ``data_end`` is where the records end:
    the end marker of a sealed segment, or where the next record goes.  Bytes
    from ``data_end`` to ``torn_end`` are left-overs of an interrupted write.
    ``header_unwritten`` says the last segment's header never reached the
    disk (all zeros or torn, see ``_segment.header_never_written``): the
    records are scanned as if it were there, and the next open rewrites it.
    ``marks`` maps each offset asked about to ``(boundary, records after)``:
    the last place at or before it a reader can stand, and how many intact
    records follow it.
    """

    number: int
    path: str
    size: int
    records: int = 0
    data_end: int = SEGMENT_HEADER_SIZE
    sealed: bool = False
    torn_end: int = 0
    unreadable: str | None = None
    header_unwritten: bool = False
    runs: list[tuple[int, int, int]] = field(default_factory=list)
    damage: list[Damage] = field(default_factory=list)
    marks: dict[int, tuple[int, int]] = field(default_factory=dict)

    def damage_from(self, offset: int) -> Damage | None:
        """Return the first damage a reader starting at ``offset`` runs into, if any."""
        if self.unreadable:
            return self.damage[0]
        return next((damage for damage in self.damage if damage.end > offset), None)


# The CRC-32 state after a record's length word: the walk's one table lookup.
_LENGTH = struct.Struct("<I")
_START_CRC: dict[int, int] = dict(enumerate(LENGTH_CRC))
_END_CRC = RECORD_HEADER.unpack(END_MARKER)[1]
_WINDOW = 8 << 20  # bytes walked between progress reports
_SMALL = 512  # payload bytes under which the C walk beats zlib's faster checksum
_NON_ZERO = re.compile(rb"[^\x00]")


def _start_crc(word: int) -> int:
    crc = zlib.crc32(_LENGTH.pack(word))
    if len(_START_CRC) < 1 << 16:
        _START_CRC[word] = crc
    return crc


def _walk_python(buffer: mmap.mmap, view: memoryview, offset: int, limit: int) -> tuple[int, int, int]:
    # One iteration per record and as little as possible in it: this loop is
    # the scan's speed.  Records of one size share a length word, so its CRC
    # state is looked up only when the word changes.
    unpack = RECORD_HEADER.unpack_from
    crc32 = zlib.crc32
    known = _START_CRC.get
    last = -1
    records = 0
    previous_word = -1
    start_crc = 0
    try:
        for records in itertools.count():
            word, crc = unpack(buffer, offset)
            if word != previous_word:
                cached = known(word)
                if cached is None:
                    if word == END_OF_SEGMENT:
                        break
                    cached = _start_crc(word)
                start_crc, previous_word = cached, word
            end = offset + HEADER_SIZE + (word & LENGTH_MASK)
            if end > limit:
                break
            computed = crc32(view[offset + HEADER_SIZE : end], start_crc)
            if computed != crc and computed ^ HEADED_CRC != crc:  # neither plain nor with headers
                break
            last = offset
            offset = end
    except struct.error:  # a header would run past the buffer
        pass
    return offset, records, last


def _walk_speedups(buffer: mmap.mmap, view: memoryview, offset: int, limit: int) -> tuple[int, int, int]:
    # The C decode_run reads any buffer; its annotation names the Python twin's bytes.
    payloads, end = _format.decode_run(view[:limit], offset, 1 << 62)  # type: ignore[arg-type]
    if not payloads:
        return offset, 0, -1
    return end, len(payloads), end - HEADER_SIZE - len(payloads[-1])


def _walk(
    buffer: mmap.mmap, view: memoryview, offset: int, limit: int, progress: Progress | None
) -> tuple[int, int, int]:
    """Walk intact records from ``offset``; return (where it stopped, records, offset of the last one or -1)."""
    records = 0
    last = -1
    while True:
        window = min(limit, offset + _WINDOW)
        start = offset
        # Per record, the C walk saves interpreter time and the Python one
        # checksums faster (zlib): pick by the size of the record at hand.
        small = offset + HEADER_SIZE <= limit and _LENGTH.unpack_from(buffer, offset)[0] & LENGTH_MASK < _SMALL
        walk_window = _walk_speedups if _format.SPEEDUPS and small else _walk_python
        offset, count, window_last = walk_window(buffer, view, offset, window)
        if count:
            records += count
            last = window_last
        if progress is not None and offset > start:
            progress(offset - start)
        if window == limit:
            return offset, records, last
        record = decode_record(view, offset, limit)
        if record.status is not RecordStatus.OK:
            return offset, records, last
        if record.end > window:  # one record larger than the window: take it whole
            if progress is not None:
                progress(record.end - offset)
            records += 1
            last = offset
            offset = record.end


def _chain_is_plausible(buffer: mmap.mmap, offset: int, limit: int) -> bool:
    """Tell whether the next few headers from ``offset`` could be records (no checksum: cheap)."""
    for _ in range(4):
        if offset + HEADER_SIZE > limit:
            return True
        word, crc = RECORD_HEADER.unpack_from(buffer, offset)
        if word == END_OF_SEGMENT:
            return bool(crc == _END_CRC)
        if word == 0 and crc == 0:
            return True
        offset += HEADER_SIZE + (word & LENGTH_MASK)
        if offset > limit:
            return False
    return True


def _resynchronise(buffer: mmap.mmap, view: memoryview, offset: int, limit: int, claimed_end: int) -> int | None:
    """Return the first offset past a damaged record where intact records resume, or None.

    The damaged record's own length is tried first (a flipped payload bit
    leaves it right), then every byte.  A candidate must have a valid
    checksum and be followed by plausible headers, so random bytes almost
    never pass, and the cheap test runs before the checksum.
    """
    candidates: Iterator[int] = itertools.count(offset + 1)
    if offset < claimed_end <= limit - HEADER_SIZE:
        candidates = itertools.chain((claimed_end,), candidates)
    unpack = RECORD_HEADER.unpack_from
    for candidate in candidates:
        if candidate > limit - HEADER_SIZE:
            return None
        word, crc = unpack(buffer, candidate)
        if word == END_OF_SEGMENT:
            if crc == _END_CRC:
                return candidate
            continue
        if word == 0 and crc == 0:
            match = _NON_ZERO.search(buffer, candidate, limit)
            if match is None:
                return None
            # A header may start with zero bytes: look from 7 bytes before the first non-zero one.
            candidates = itertools.count(max(candidate + 1, match.start() - HEADER_SIZE + 1))
            continue
        end = candidate + HEADER_SIZE + (word & LENGTH_MASK)
        if end > limit or not _chain_is_plausible(buffer, end, limit):
            continue
        if _format.record_crc(word, view[candidate + HEADER_SIZE : end]) in (crc, crc ^ HEADED_CRC):
            return candidate
    return None


def _open_batch_start(buffer: mmap.mmap, start: int, end: int) -> tuple[int, int]:
    """Return where the unclosed batch at the end of the run ``[start, end)`` begins, and its records."""
    batch_start, batch_records = end, 0
    offset = start
    while offset < end:
        word = _LENGTH.unpack_from(buffer, offset)[0]
        if word & CONTINUES:
            if batch_records == 0:
                batch_start = offset
            batch_records += 1
        else:
            batch_start, batch_records = end, 0
        offset += HEADER_SIZE + (word & LENGTH_MASK)
    return batch_start, batch_records


def _place(buffer: mmap.mmap, scan: SegmentScan, mark: int) -> tuple[int, int]:
    """Return the last reader position at or before ``mark`` and the intact records after it."""
    boundary, before = SEGMENT_HEADER_SIZE, 0
    for start, end, records in scan.runs:
        if mark < start:
            break
        if mark >= end:
            boundary, before = end, before + records
            continue
        offset = start
        while True:
            word = _LENGTH.unpack_from(buffer, offset)[0]
            following = offset + HEADER_SIZE + (word & LENGTH_MASK)
            if following > mark:
                return offset, scan.records - before
            offset = following
            before += 1
    return boundary, scan.records - before


def scan_segment(
    queue_dir: StrPath,
    number: int,
    *,
    last: bool,
    marks: Sequence[int] = (),
    progress: Progress | None = None,
) -> SegmentScan:
    """Check every record of segment ``number``; report intact runs, damaged spans and the tail.

    ``last`` says whether this is the queue's last segment, where zeros end
    the data and anything after them is a torn write (the rule ``Control``
    applies on open).  Elsewhere, bytes that fail are damage, and the scan
    resumes at the next intact record.  Never raises for bad bytes; raises
    ``FileNotFoundError`` if the segment does not exist and
    ``UnsupportedFormat`` if it is of another format version.
    """
    path = segment_path(queue_dir, number)
    fd = open_segment_file(path, writable=False)
    try:
        size = os.fstat(fd).st_size
        scan = SegmentScan(number, path, size)
        if progress is not None:
            progress(min(size, SEGMENT_HEADER_SIZE))
        if size < SEGMENT_HEADER_SIZE + HEADER_SIZE:
            scan.unreadable = f"segment is only {size} bytes long"
        else:
            buffer = mmap.mmap(fd, size, access=mmap.ACCESS_READ)
            try:
                try:
                    found = read_segment_header(path, buffer[:SEGMENT_HEADER_SIZE])
                    if found != number:
                        scan.unreadable = f"header says segment {found}, file name says {number}"
                except CorruptionError as error:
                    if last and header_never_written(buffer[:SEGMENT_HEADER_SIZE], number):
                        # Written but never written back (power loss): the next
                        # open rewrites it, and the records are read as if it were there.
                        scan.header_unwritten = True
                    else:
                        scan.unreadable = error.problem
                if not scan.unreadable:
                    _scan_records(buffer, fd, scan, last, progress)
                    scan.marks = {mark: _place(buffer, scan, mark) for mark in marks}
            finally:
                buffer.close()
        if scan.unreadable:
            scan.damage.append(Damage(path, 0, size, scan.unreadable))
            scan.marks = {mark: (SEGMENT_HEADER_SIZE, 0) for mark in marks}
            if progress is not None:
                progress(size - min(size, SEGMENT_HEADER_SIZE))
        return scan
    finally:
        os.close(fd)


def _scan_records(buffer: mmap.mmap, fd: int, scan: SegmentScan, last: bool, progress: Progress | None) -> None:
    size = scan.size
    view = memoryview(buffer)
    try:
        offset = SEGMENT_HEADER_SIZE
        last_record = -1
        while True:
            run_start = offset
            offset, records, last_record = _walk(buffer, view, offset, size, progress)
            if records:
                scan.runs.append((run_start, offset, records))
                scan.records += records
            record = decode_record(view, offset, size)
            if record.status is RecordStatus.END:
                scan.sealed = True
                scan.data_end = offset
                break
            resume = None
            if not (last and record.status is RecordStatus.EMPTY):
                resume = _resynchronise(buffer, view, offset, size, record.end)
            if resume is None:
                scan.data_end = offset
                break
            scan.damage.append(Damage(scan.path, offset, resume, _PROBLEMS[record.status]))
            if progress is not None:
                progress(resume - offset)
            offset = resume
        if scan.runs and last_record >= 0 and scan.runs[-1][1] == scan.data_end:
            word = _LENGTH.unpack_from(buffer, last_record)[0]
            if word & CONTINUES:
                # A batch whose last record never came: none of it was sent.
                run_start, run_end, records = scan.runs.pop()
                batch_start, batch_records = _open_batch_start(buffer, run_start, run_end)
                if batch_start > run_start:
                    scan.runs.append((run_start, batch_start, records - batch_records))
                scan.records -= batch_records
                scan.data_end = batch_start
        if not scan.sealed:
            dirty = dirty_end_in_file(fd, scan.data_end, size)
            if dirty > scan.data_end:
                scan.torn_end = dirty
        if progress is not None:
            progress(size - scan.data_end)
    finally:
        view.release()


_PROBLEMS = {
    RecordStatus.CORRUPT: "checksum mismatch",
    RecordStatus.INCOMPLETE: "record length runs past the end of the segment",
    RecordStatus.EMPTY: "zeroed bytes where a record should be",
}


def missing_segments(queue_dir: str, segments: list[int]) -> list[Damage]:
    """Return a ``Damage`` for each run of segment numbers missing between those present."""
    found = []
    for previous, number in itertools.pairwise(segments):
        if number > previous + 1:
            missing = f"segment {previous + 1}" if number == previous + 2 else f"segments {previous + 1}-{number - 1}"
            found.append(Damage(segment_path(queue_dir, previous + 1), 0, 0, f"{missing} missing: records lost"))
    return found


class QueueScans:
    """The segment list of one queue and each segment's scan, done once.

    ``marks`` maps a segment number to the offsets whose reader position the
    scan should place (see ``SegmentScan.marks``).
    """

    def __init__(self, queue_dir: str, progress: Progress | None = None) -> None:
        self.queue_dir = queue_dir
        self.segments = list_segments(queue_dir)
        self.last = self.segments[-1] if self.segments else -1  # fixed: segments recovery creates come after
        self.progress = progress
        self.marks: dict[int, set[int]] = {}
        self._done: dict[int, SegmentScan] = {}

    def get(self, number: int) -> SegmentScan:
        wanted = self.marks.get(number, set())
        if number > self.last:  # created by this recovery (or would be, in a dry run): empty
            path = segment_path(self.queue_dir, number)
            return SegmentScan(number, path, 0, marks={mark: (SEGMENT_HEADER_SIZE, 0) for mark in wanted})
        scan = self._done.get(number)
        if scan is None or not wanted <= scan.marks.keys():
            scan = scan_segment(
                self.queue_dir, number, last=number == self.last, marks=sorted(wanted), progress=self.progress
            )
            self._done[number] = scan
        return scan

    def place(self, position: Position) -> tuple[int, int]:
        """Return ``(boundary, records after)`` for an offset in an existing segment."""
        self.marks.setdefault(position.segment, set()).add(position.offset)
        return self.get(position.segment).marks[position.offset]
