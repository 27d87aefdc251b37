"""Segment files: naming, the one directory scan, creation, and torn-tail detection.

Theory of operation
-------------------
A segment is a preallocated file ``NNNNNNNNNNNN.seg`` (12 decimal digits, so
name order is append order) holding a header and then records back to back
(``docs/format.md``).  A segment comes into being complete: it is written under
a temporary name, preallocated (so a full disk fails here, with a clear error,
and never later as a SIGBUS inside a memory-mapped write), given its header,
and only then linked under its final name.  Bytes past the last record are
zero; a crash mid-append can leave a torn record there, which
:func:`scan_records` tells apart from damage in the middle of the data.
"""

from __future__ import annotations

import errno
import logging
import mmap
import os
import re
from dataclasses import dataclass
from typing import Union

from . import _format
from ._format import HEADER_SIZE, SEGMENT_HEADER_SIZE, Buffer, RecordStatus, SegmentHeaderError
from ._fs import create_whole, open_file
from .errors import CorruptionError, SegqError, UnsupportedFormat

__all__ = [
    "StrPath",
    "segment_path",
    "list_segments",
    "OFFSET_BITS",
    "MIN_SEGMENT_SIZE",
    "SEGMENT_SIZE_LIMIT",
    "FIRST_SEGMENT_SIZE",
    "DEFAULT_SEGMENT_SIZE",
    "next_segment_size",
    "queue_segment_size",
    "create_segment",
    "preallocate",
    "open_segment_file",
    "open_segment",
    "MappedSegment",
    "SegmentWindow",
    "read_segment_header",
    "header_never_written",
    "restore_unwritten_header",
    "ScanResult",
    "scan_records",
    "dirty_end_in_file",
    "os_error",
]

log = logging.getLogger(__name__)

StrPath = Union[str, "os.PathLike[str]"]

_SEGMENT_NAME = re.compile(r"^(\d{12})\.seg$")


def segment_path(queue_dir: StrPath, number: int) -> str:
    """Return the path of segment ``number`` inside ``queue_dir``."""
    return os.path.join(queue_dir, f"{number:012d}.seg")


def os_error(error: OSError, action: str, path: StrPath) -> SegqError:
    """Turn an ``OSError`` into a ``SegqError`` that says what failed, where, and what to do."""
    if error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        advice = "check the permissions of the queue directory"
    elif error.errno in (errno.ENOSPC, errno.EDQUOT):
        advice = "the disk is full: free some space and retry"
    else:
        advice = error.strerror or str(error)
    return SegqError(f"cannot {action} {os.fspath(path)}: {advice}")


def list_segments(queue_dir: StrPath) -> list[int]:
    """Return the numbers of the segments in ``queue_dir``, oldest first.

    Files that are not segments (including leftover ``*.tmp`` files of an
    interrupted creation) are ignored: a queue directory may hold other things.
    """
    try:
        names = os.listdir(queue_dir)
    except FileNotFoundError:
        return []
    except NotADirectoryError:
        raise SegqError(f"{os.fspath(queue_dir)} is a file, not a queue directory") from None
    except OSError as error:
        raise os_error(error, "list", queue_dir) from None
    numbers = [int(match.group(1)) for match in map(_SEGMENT_NAME.match, names) if match]
    numbers.sort()
    return numbers


def preallocate(fd: int, size: int) -> None:
    """Reserve ``size`` bytes of disk for ``fd`` now, so a full disk fails here and not at write-back."""
    if hasattr(os, "posix_fallocate"):
        try:
            os.posix_fallocate(fd, 0, size)
            return
        except OSError as error:
            if error.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                raise
    # No fallocate (macOS, some filesystems): a sparse file, so a full disk is
    # only found when pages are written back.  docs/format.md says so.
    os.ftruncate(fd, size)


# An offset in a segment is 32 bits (of a position word, ``_state.Position``),
# so a segment stays below 4 GiB.
OFFSET_BITS = 32
SEGMENT_SIZE_LIMIT = 1 << OFFSET_BITS  # exclusive
MIN_SEGMENT_SIZE = 256
FIRST_SEGMENT_SIZE = 1 << 20
DEFAULT_SEGMENT_SIZE = 64 << 20


def next_segment_size(previous: int | None, segment_size: int, needed: int = 0) -> int:
    """Return the size of a new segment: 1 MiB for a queue's first, then double the one before, up to ``segment_size``.

    The sizing policy of every segment a queue grows: a queue that holds
    three records (a dead-letter queue, one a consumer created) takes 1 MiB
    of disk, not ``segment_size``, and one under load reaches
    ``segment_size`` within a few segments.  ``previous`` is the size of the
    segment before (None for a queue's first); the result always holds
    ``needed`` bytes of records with the segment header and end marker.
    """
    grown = FIRST_SEGMENT_SIZE if previous is None else max(FIRST_SEGMENT_SIZE, 2 * previous)
    # A larger append (a big batch) gets a segment of its own, page-rounded,
    # the way a log rolls after a large append.
    size = min(segment_size, grown)
    fitting = SEGMENT_HEADER_SIZE + needed + HEADER_SIZE
    if fitting <= size:
        return size
    return -(-fitting // mmap.PAGESIZE) * mmap.PAGESIZE


def queue_segment_size(queue_dir: StrPath, default: int = DEFAULT_SEGMENT_SIZE) -> int:
    """Return the segment_size of the queue at ``queue_dir`` as its segments tell it; ``default`` where they do not.

    The one reading of "the queue's segment size", for whoever writes to a
    queue without being told (``segq send``, a requeue, recovery, a
    dead-letter queue).  Segments grow from ``FIRST_SEGMENT_SIZE`` by
    doubling up to segment_size, and a batch larger than that gets a segment
    of its own, so a last segment of ``FIRST_SEGMENT_SIZE`` or more tells
    nothing (still growing, at the limit, or a big batch's): ``default``.  A
    smaller one was chosen on purpose, and is the answer.  No segment, or a
    last one too small to be a segment (damaged): ``default``.
    """
    segments = list_segments(queue_dir) if os.path.isdir(queue_dir) else []
    if not segments:
        return default
    try:
        size = os.path.getsize(segment_path(queue_dir, segments[-1]))
    except OSError:
        return default  # deleted meanwhile, or unreadable: nothing to go by
    return size if MIN_SEGMENT_SIZE <= size < FIRST_SEGMENT_SIZE else default


def create_segment(queue_dir: StrPath, number: int, size: int, *, durable: bool) -> bool:
    """Create segment ``number`` of ``size`` bytes; return False if it already exists.

    ``durable`` syncs the file and the directory so the new segment survives
    power loss.  A full disk raises ``SegqError`` and leaves nothing behind.
    """
    final = segment_path(queue_dir, number)

    def fill(fd: int) -> None:
        preallocate(fd, size)
        os.pwrite(fd, _format.encode_segment_header(number), 0)

    try:
        return create_whole(final, fill, durable=durable)
    except OSError as error:
        if error.errno in (errno.ENOSPC, errno.EDQUOT):
            raise _no_room_for_segment(queue_dir, final, size) from None
        raise os_error(error, "create segment", final) from None


def _no_room_for_segment(queue_dir: StrPath, path: str, size: int) -> SegqError:
    """Say that a ``size``-byte segment does not fit, and which segment_size would."""
    try:
        stats = os.statvfs(queue_dir)
        free = stats.f_bavail * stats.f_frsize
    except OSError:
        return SegqError(f"cannot create segment {path}: the disk is full: free some space and retry")
    # Half the free space, as a power of two: the queue can then roll over
    # into a second segment while a consumer still reads the first.
    fit = 1 << max(0, (free // 2).bit_length() - 1)
    advice = "free some space and retry"
    if fit >= 64 << 10:
        advice += f", or use a smaller segment_size: {_megabytes(fit)} would fit (`segq send --segment-size {_megabytes(fit).replace(' ', '')}`)"
    return SegqError(
        f"cannot create segment {path}: the disk is full: a {_megabytes(size)} segment does not fit "
        f"in the {_megabytes(free)} free; {advice}"
    )


def _megabytes(size: int) -> str:
    if size >= 1 << 20 and size % (1 << 20) == 0:
        return f"{size >> 20} MiB"
    if size >= 1 << 20:
        return f"{size / (1 << 20):.1f} MiB"
    return f"{size >> 10} KiB"


def read_segment_header(path: str, data: Buffer) -> int:
    """Return the segment number in ``data``'s header, or raise a ``SegqError`` naming ``path``."""
    try:
        return _format.decode_segment_header(data)
    except SegmentHeaderError as error:
        if error.unsupported:
            raise UnsupportedFormat(f"{path}: {error}; upgrade segq to read this queue") from None
        raise CorruptionError(path, 0, f"segment header: {error}") from None


def open_segment_file(path: str, *, writable: bool) -> int:
    """Open the segment file at ``path`` as it is (no check of its contents); return the fd.

    Raises ``FileNotFoundError`` if it is missing (consumed meanwhile, for
    most callers), a ``SegqError`` naming it for any other failure.
    """
    try:
        return open_file(path, os.O_RDWR if writable else os.O_RDONLY, create=False)
    except FileNotFoundError:
        raise
    except OSError as error:
        raise os_error(error, "open segment", path) from None


def header_never_written(data: Buffer, number: int) -> bool:
    """Tell whether ``data`` is segment ``number``'s header as a power loss leaves one never written back.

    That is: all zeros, or torn, each byte either zero or the byte a writer
    of a version this segq reads puts there.  Such a header was written (a
    segment is linked only after its header) but its page never reached the
    disk; a header with any other byte is damage.
    """
    return _unwritten_header_version(bytes(data[:SEGMENT_HEADER_SIZE]), number) is not None


def _unwritten_header_version(header: bytes, number: int) -> int | None:
    """Return the format version whose header ``header`` is a torn or zeroed copy of (newest first), or None."""
    if len(header) < SEGMENT_HEADER_SIZE:
        return None
    for version in sorted(_format.READ_VERSIONS, reverse=True):
        expected = _format.encode_segment_header(number, version)
        if header != expected and all(byte in (0, wanted) for byte, wanted in zip(header, expected)):
            return version
    return None


def restore_unwritten_header(queue_dir: StrPath, number: int) -> bool:
    """Rewrite the header of segment ``number`` if it never reached the disk; return whether it did.

    For the *last* segment only, and only by a caller that holds the queue
    alone: the header is rebuilt from the file name (in the format version
    its surviving bytes show, else the current one), and the records after it are then
    judged by the usual tail rules, so nothing unreadable is ever kept.
    """
    path = segment_path(queue_dir, number)
    try:
        fd = open_file(path, os.O_RDWR, create=False)
    except FileNotFoundError:
        return False
    except OSError as error:
        raise os_error(error, "open segment", path) from None
    try:
        size = os.fstat(fd).st_size
        if size < SEGMENT_HEADER_SIZE + HEADER_SIZE:
            return False
        version = _unwritten_header_version(os.pread(fd, SEGMENT_HEADER_SIZE, 0), number)
        if version is None:
            return False
        # The version its own bytes still show (a torn version-1 header stays
        # version 1); an all-zero one gets the current, which reads every older.
        os.pwrite(fd, _format.encode_segment_header(number, version), 0)
        os.fsync(fd)
    except OSError as error:
        raise os_error(error, "repair the header of", path) from None
    finally:
        os.close(fd)
    log.warning("%s: segment header never reached the disk (power loss); rewritten from the file name", path)
    return True


def open_segment(path: str, number: int, *, writable: bool) -> tuple[int, int]:
    """Open segment ``number`` at ``path`` and check its header; return ``(fd, size)``.

    Raises ``FileNotFoundError`` if it is missing, ``CorruptionError`` or
    ``UnsupportedFormat`` if its header is not one of ours.
    """
    fd = open_segment_file(path, writable=writable)
    try:
        size = os.fstat(fd).st_size
        if size < SEGMENT_HEADER_SIZE + HEADER_SIZE:
            raise CorruptionError(path, 0, f"segment is only {size} bytes long")
        found = read_segment_header(path, os.pread(fd, SEGMENT_HEADER_SIZE, 0))
        if found != number:
            raise CorruptionError(path, 0, f"header says segment {found}, file name says {number}")
    except BaseException:
        os.close(fd)
        raise
    return fd, size


class MappedSegment:
    """One segment file, open and memory-mapped (read-write or read-only)."""

    def __init__(self, queue_dir: StrPath, number: int, *, writable: bool) -> None:
        self.number = number
        self.path = segment_path(queue_dir, number)
        self.fd, self.size = open_segment(self.path, number, writable=writable)
        try:
            access = mmap.ACCESS_WRITE if writable else mmap.ACCESS_READ
            self.map = mmap.mmap(self.fd, self.size, access=access)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Unmap and close; safe to call twice."""
        mapping = getattr(self, "map", None)
        if mapping is not None:
            try:
                mapping.close()
            except BufferError:
                # A memoryview of the map is still alive somewhere; the mapping
                # goes away with it.
                pass
            self.map = None  # type: ignore[assignment]
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class SegmentWindow:
    """A writable segment whose memory map covers only a window around the tail.

    Mapping a whole 64 MiB segment would make every page a sender ever
    touched count in its resident memory; a window keeps that flat however
    long the queue grows.  Moving the window costs one mmap per ``WINDOW``
    bytes appended.
    """

    WINDOW = 1 << 20

    def __init__(self, queue_dir: StrPath, number: int) -> None:
        self.number = number
        self.path = segment_path(queue_dir, number)
        self.map: mmap.mmap | None = None
        self.start = self.end = 0  # the file range the map covers
        self.fd, self.size = open_segment(self.path, number, writable=True)

    def show(self, offset: int, length: int) -> mmap.mmap:
        """Map a window that covers ``[offset, offset + length)``; return the map (file offset ``start`` is map offset 0)."""
        if self.map is not None and self.start <= offset and offset + length <= self.end:
            return self.map
        start = offset - offset % mmap.ALLOCATIONGRANULARITY
        end = min(self.size, max(start + self.WINDOW, offset + length))
        if self.map is not None:
            self.map.close()
            self.map = None
        self.map = mmap.mmap(self.fd, end - start, access=mmap.ACCESS_WRITE, offset=start)
        self.start, self.end = start, end
        return self.map

    def close(self) -> None:
        """Unmap and close; safe to call twice."""
        if self.map is not None:
            self.map.close()
            self.map = None
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


@dataclass(frozen=True)
class ScanResult:
    """Where a walk over a segment's records stopped, and why.

    ``end`` is the offset just past the last complete record (a torn batch is
    rewound to its first record); ``status`` is what was found at ``stop``:
    ``END`` for a sealed segment, ``EMPTY`` for a clean tail, otherwise a torn
    or damaged record whose claimed extent ends at ``stop_extent``.
    """

    end: int
    stop: int
    status: RecordStatus
    stop_extent: int
    records: int


def scan_records(buffer: Buffer, start: int, limit: int) -> ScanResult:
    """Walk the records from ``start`` until one is not ``OK``; never raises on bad bytes."""
    decode = _format.decode_record
    offset = start
    batch_start = None
    records = 0
    batch_records = 0
    while True:
        record = decode(buffer, offset, limit)
        if record.status is not RecordStatus.OK:
            break
        if record.continues:
            if batch_start is None:
                batch_start = offset
                batch_records = 0
            batch_records += 1
        else:
            batch_start = None
        records += 1
        offset = record.end
    end = offset
    if batch_start is not None:
        # The last batch never got its final record: none of it was sent.
        end = batch_start
        records -= batch_records
    return ScanResult(end, offset, record.status, min(max(record.end, offset + HEADER_SIZE), limit), records)


_FILE_CHUNK = 1 << 20


def _end_of_data(fd: int, start: int, limit: int) -> int:
    """Return where the file's last data region before ``limit`` ends (``limit`` if unknown).

    Preallocated, never-written space reads as zeros and is a hole to
    ``SEEK_DATA``/``SEEK_HOLE`` (ext4, xfs, tmpfs), so it need not be read.
    """
    if not hasattr(os, "SEEK_DATA"):
        return limit
    end = start
    position = start
    try:
        while position < limit:
            data = os.lseek(fd, position, os.SEEK_DATA)
            if data >= limit:
                break
            position = os.lseek(fd, data, os.SEEK_HOLE)
            end = min(position, limit)
    except OSError as error:
        if error.errno != errno.ENXIO:  # ENXIO: no data past position
            return limit
    return end


def dirty_end_in_file(fd: int, start: int, limit: int) -> int:
    """Return the offset just past the last non-zero byte of ``fd`` in ``[start, limit)`` (``start`` if none).

    Read with ``pread``, holes skipped: reading a whole preallocated segment
    through a memory map would put every page of it in resident memory.
    """
    position = min(limit, _end_of_data(fd, start, limit))
    while position > start:
        low = max(start, position - _FILE_CHUNK)
        stripped = os.pread(fd, position - low, low).rstrip(b"\x00")
        if stripped:
            return low + len(stripped)
        position = low
    return start
