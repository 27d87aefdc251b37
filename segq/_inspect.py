"""Read-only views of a queue: its lock holders, a snapshot (``info``) and a full check (``verify``).

Nothing here writes, so all of it works while other processes use the
queue: the answers are snapshots.  Segments are read with the one scan,
``_scan.scan_segment``; a segment consumed and deleted while we look is
skipped.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from ._control import existing_queue, read_published_tail
from ._format import END_MARKER, FORMAT_VERSION, HEADER_SIZE, SEGMENT_HEADER_SIZE
from ._fs import open_to_read
from ._lock import read_owner
from ._scan import Damage, Progress, QueueScans, Repair, missing_segments, position_json, scan_segment
from ._segment import StrPath, dirty_end_in_file, list_segments, segment_path
from ._state import CURSOR_DIR, ConsumerKind, Position, cursor_path, list_cursors, read_position
from .errors import CorruptionError, SegqError

__all__ = [
    "existing_queue",
    "saved_position",
    "LockHolder",
    "lock_holders",
    "VerifyReport",
    "verify",
    "queue_bytes",
    "ConsumerInfo",
    "QueueInfo",
    "info",
]


def saved_position(queue_dir: str, kind: ConsumerKind, name: str) -> tuple[bool, Position | None, str | None]:
    """Return (registered, saved position or None, why it could not be read); reads only."""
    path = cursor_path(queue_dir, kind, name)
    if not os.path.exists(path):
        return False, None, None
    try:
        return True, read_position(path), None
    except CorruptionError as error:
        return True, None, error.problem


@dataclass(frozen=True)
class LockHolder:
    """A lock file, whom it names (``pid``) and whether that process lives."""

    path: str
    what: str
    pid: int | None
    alive: bool

    def describe(self) -> str:
        state = "alive" if self.alive else "dead"
        return f"{self.what}: PID {self.pid} ({state})"

    def to_json(self) -> dict[str, Any]:
        return {"path": self.path, "what": self.what, "pid": self.pid, "alive": self.alive}


def _lock_role(queue_dir: str, path: str) -> str:
    relative = os.path.relpath(path, queue_dir)
    directory, name = os.path.split(relative)
    if directory == CURSOR_DIR and name[1:2] == ".":
        kind = next((known.role for known in ConsumerKind if known.value == name[0]), "consumer")
        return f"{kind} {name[2 : -len('.lock')]!r}"
    if directory == "senders":
        return "sender"
    return relative


def lock_holders(path: StrPath) -> list[LockHolder]:
    """Return every lock file in the queue that names a process, live or dead.

    Looks under ``cursors/``, ``senders/`` and ``groups/`` for ``*.lock``
    files carrying a PID; flock-only helper files carry none and are skipped.
    """
    queue_dir = existing_queue(path)
    found = []
    for directory in (CURSOR_DIR, "senders", "groups"):
        for root, _, names in os.walk(os.path.join(queue_dir, directory)):
            for name in sorted(names):
                if not name.endswith(".lock"):
                    continue
                owner = read_owner(os.path.join(root, name))
                if owner is None or owner.pid is None:
                    continue
                found.append(LockHolder(owner.path, _lock_role(queue_dir, owner.path), owner.pid, owner.alive))
    return found


@dataclass
class VerifyReport:
    """What :func:`verify` found: every segment scanned, every record's checksum checked.

    ``damaged`` lists spans that fail (file, offset, length, problem) and
    consumer metadata that cannot be read; ``torn`` lists bytes past the last
    record of the last segment (a write in progress, or a torn write that the
    next opener cuts), which are not damage.
    """

    path: str
    segments: int = 0
    records: int = 0
    bytes: int = 0
    damaged: list[Damage] = field(default_factory=list)
    torn: list[Repair] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.damaged

    def to_json(self) -> dict[str, Any]:
        """Return the report as a JSON-ready dict (the stable ``segq verify --json`` output)."""
        return {
            "path": self.path,
            "ok": self.ok,
            "segments": self.segments,
            "records": self.records,
            "bytes": self.bytes,
            "damaged": [damage.to_json() for damage in self.damaged],
            "torn": [torn.to_json() for torn in self.torn],
        }


def queue_bytes(path: StrPath) -> int:
    """Return the total size of the queue's segment files: what a full scan reads (for progress bars)."""
    queue_dir = existing_queue(path)
    total = 0
    for number in list_segments(queue_dir):
        try:
            total += os.path.getsize(segment_path(queue_dir, number))
        except FileNotFoundError:
            continue
    return total


def verify(path: StrPath, *, progress: Progress | None = None) -> VerifyReport:
    """Check every record's checksum and every consumer's metadata; report damage with file and offset.

    Reads only, and works while other processes use the queue (a segment
    consumed and deleted meanwhile is skipped).  ``progress(n)`` is called
    as each ``n`` bytes are scanned.
    """
    queue_dir = existing_queue(path)
    report = VerifyReport(queue_dir)
    segments = list_segments(queue_dir)
    report.damaged.extend(missing_segments(queue_dir, segments))
    for number in segments:
        try:
            scan = scan_segment(queue_dir, number, last=number == segments[-1], progress=progress)
        except FileNotFoundError:
            continue
        report.segments += 1
        report.records += scan.records
        report.bytes += max(0, scan.data_end - SEGMENT_HEADER_SIZE)
        report.damaged.extend(scan.damage)
        if scan.unreadable:
            continue
        if scan.header_unwritten:
            report.torn.append(Repair(scan.path, 0, SEGMENT_HEADER_SIZE, "segment header never reached the disk"))
        if number != segments[-1] and not scan.sealed:
            report.damaged.append(
                Damage(scan.path, scan.data_end, scan.torn_end or scan.data_end, "no end-of-segment marker")
            )
        elif scan.torn_end:
            report.torn.append(Repair(scan.path, scan.data_end, scan.torn_end, "bytes past the last record"))
    for kind, name, cursor in list_cursors(queue_dir):
        _, saved, problem = saved_position(queue_dir, kind, name)
        if problem is not None:
            report.damaged.append(Damage(cursor, 0, 1024, problem))
        elif saved is not None and segments and saved.segment < segments[0]:
            report.damaged.append(
                Damage(cursor, 0, 1024, f"points at {saved}, but segments before {segments[0]} are deleted")
            )
    return report


@dataclass(frozen=True)
class ConsumerInfo:
    """A registered consumer, where it is, and what it has not committed yet."""

    kind: str  # "receiver" or "group"
    name: str
    position: Position | None
    backlog_records: int | None  # None unless the records were counted (``info(scan=True)``)
    backlog_bytes: int
    problem: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "name": self.name,
            "position": position_json(self.position),
            "backlog_records": self.backlog_records,
            "backlog_bytes": self.backlog_bytes,
            "problem": self.problem,
        }


@dataclass
class QueueInfo:
    """A snapshot of a queue: segments, disk use, tail, consumers' backlogs, lock holders.

    ``segments`` lists ``(number, records, data bytes)``; ``groups`` holds
    each work-queue group's description (claims in flight, dead letters).
    Record counts (``records``, each segment's, each backlog's) are None
    unless ``scanned``: counting them reads every byte.
    """

    path: str
    format_version: int
    segments: list[tuple[int, int | None, int]]
    segment_bytes: int
    bytes_on_disk: int
    tail: Position
    records: int | None
    consumers: list[ConsumerInfo]
    locks: list[LockHolder]
    groups: list[dict[str, Any]] = field(default_factory=list)
    scanned: bool = True

    def to_json(self) -> dict[str, Any]:
        """Return the snapshot as a JSON-ready dict (the stable ``segq info --json`` output)."""
        return {
            "path": self.path,
            "scanned": self.scanned,
            "format_version": self.format_version,
            "segments": [
                {"number": number, "records": records, "bytes": size} for number, records, size in self.segments
            ],
            "segment_bytes": self.segment_bytes,
            "bytes_on_disk": self.bytes_on_disk,
            "tail": position_json(self.tail),
            "records": self.records,
            "consumers": [consumer.to_json() for consumer in self.consumers],
            "locks": [holder.to_json() for holder in self.locks],
            "groups": self.groups,
        }


def _disk_usage(queue_dir: str) -> int:
    total = 0
    for root, _, names in os.walk(queue_dir):
        for name in names:
            try:
                total += os.lstat(os.path.join(root, name)).st_blocks * 512
            except (FileNotFoundError, AttributeError):
                continue
    return total


def _data_end(queue_dir: str, number: int, tail: Position | None) -> int:
    """Return where segment ``number``'s records end, without reading them (its end marker not counted).

    In the tail segment that is the published ``tail``.  Past the last
    record a segment is zero (preallocated), so elsewhere the last non-zero
    byte is found from the end, holes skipped: a look at the end of each
    segment (the space a segment's last record did not fit into).
    """
    if tail is not None and tail.segment == number:
        return tail.offset
    fd = open_to_read(segment_path(queue_dir, number))
    try:
        size = os.fstat(fd).st_size
        # A sealed segment's unused end is smaller than one record: the last
        # 64 KiB usually hold the end marker; otherwise search from the end.
        start = max(SEGMENT_HEADER_SIZE, size - (64 << 10))
        last = os.pread(fd, size - start, start).rstrip(b"\x00")
        end = start + len(last) if last else dirty_end_in_file(fd, SEGMENT_HEADER_SIZE, start)
        if end - HEADER_SIZE >= SEGMENT_HEADER_SIZE and os.pread(fd, HEADER_SIZE, end - HEADER_SIZE) == END_MARKER:
            end -= HEADER_SIZE
    finally:
        os.close(fd)
    return end


def _summary(queue_dir: str) -> QueueInfo:
    """Describe the queue from segment sizes and positions alone: O(segments), no record is read."""
    table: list[tuple[int, int | None, int]] = []
    sizes = {}
    published = read_published_tail(queue_dir)
    for number in list_segments(queue_dir):
        try:
            sizes[number] = os.path.getsize(segment_path(queue_dir, number))
            if (
                published is not None
                and published.segment == number
                and not SEGMENT_HEADER_SIZE <= published.offset <= sizes[number]
            ):
                published = None  # not a tail in this file: look at the bytes instead
            table.append((number, None, _data_end(queue_dir, number, published) - SEGMENT_HEADER_SIZE))
        except FileNotFoundError:
            continue  # consumed and deleted meanwhile
    tail = Position(table[-1][0], table[-1][2] + SEGMENT_HEADER_SIZE) if table else Position.bottom(0)
    consumers = []
    for kind, name, _ in list_cursors(queue_dir):
        role = kind.role
        _, saved, problem = saved_position(queue_dir, kind, name)
        if saved is None:
            consumers.append(ConsumerInfo(role, name, None, None, 0, problem))
            continue
        size = 0
        for number, _, data in table:
            if number >= saved.segment:
                start = saved.offset if number == saved.segment else SEGMENT_HEADER_SIZE
                size += max(0, data + SEGMENT_HEADER_SIZE - start)
        consumers.append(ConsumerInfo(role, name, saved, None, size))
    return QueueInfo(
        path=queue_dir,
        format_version=FORMAT_VERSION,
        segments=table,
        segment_bytes=sum(sizes.values()),
        bytes_on_disk=_disk_usage(queue_dir),
        tail=tail,
        records=None,
        consumers=consumers,
        locks=lock_holders(queue_dir),
        groups=_groups(queue_dir, [kind for kind, _, _ in list_cursors(queue_dir)]),
        scanned=False,
    )


def _groups(queue_dir: str, kinds: list[ConsumerKind]) -> list[dict[str, Any]]:
    """Describe each work-queue group; one that cannot be read (permissions) says why instead."""
    if ConsumerKind.GROUP not in kinds and not os.path.isdir(os.path.join(queue_dir, "groups")):
        return []
    from .workqueue._admin import group_info, list_groups

    described = []
    for group in list_groups(queue_dir):
        try:
            described.append(group_info(queue_dir, group))
        except SegqError as error:
            described.append({"group": group, "problem": str(error)})
    return described


def info(path: StrPath, *, scan: bool = False, progress: Progress | None = None) -> QueueInfo:
    """Describe the queue: segments, bytes, tail, each consumer's backlog, locks.

    By default the summary costs O(segments): sizes and positions, no record
    read, and record counts are None.  ``scan=True`` counts every record
    with a checksummed scan (``progress(n)`` is called as ``n`` bytes are
    read).  Reads only, so a user who may only read the queue can run it;
    works while other processes use the queue, as a snapshot.
    """
    queue_dir = existing_queue(path)
    if not scan:
        return _summary(queue_dir)
    scans = QueueScans(queue_dir, progress)
    cursors = [(kind, name, saved_position(queue_dir, kind, name)) for kind, name, _ in list_cursors(queue_dir)]
    for _, _, (_, saved, _) in cursors:
        if saved is not None and saved.segment in scans.segments:
            scans.marks.setdefault(saved.segment, set()).add(saved.offset)
    table: list[tuple[int, int | None, int]] = []
    for number in list(scans.segments):
        try:
            found = scans.get(number)
        except FileNotFoundError:
            scans.segments.remove(number)  # consumed and deleted meanwhile
            continue
        table.append((number, found.records, max(0, found.data_end - SEGMENT_HEADER_SIZE)))
    if scans.segments:
        last = scans.get(scans.segments[-1])
        tail = Position.bottom(last.number + 1) if last.sealed else Position(last.number, last.data_end)
    else:
        tail = Position.bottom(0)
    consumers = []
    for kind, name, (_, saved, problem) in cursors:
        role = kind.role
        if saved is None:
            consumers.append(ConsumerInfo(role, name, None, 0, 0, problem))
            continue
        records = size = 0
        for number in scans.segments:
            if number < saved.segment:
                continue
            try:
                found = scans.get(number)
                start, after = scans.place(saved) if number == saved.segment else (SEGMENT_HEADER_SIZE, found.records)
            except FileNotFoundError:
                continue  # consumed and deleted meanwhile
            records += after
            size += max(0, found.data_end - start)
        consumers.append(ConsumerInfo(role, name, saved, records, size))
    groups = _groups(queue_dir, [kind for kind, _, _ in cursors])
    return QueueInfo(
        path=queue_dir,
        format_version=FORMAT_VERSION,
        segments=table,
        segment_bytes=sum(scans.get(number).size for number in scans.segments),
        bytes_on_disk=_disk_usage(queue_dir),
        tail=tail,
        records=sum(records or 0 for _, records, _ in table),
        consumers=consumers,
        locks=lock_holders(queue_dir),
        groups=groups,
    )
