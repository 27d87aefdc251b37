"""Enqueue a job: options checked, carried as reserved headers, and deduplicated across processes.

Theory of operation
-------------------
A job is an ordinary record whose options ride in ``segq-`` headers
(``_options``).  ``dedup_key`` and ``job_id`` need a memory of the jobs
already enqueued; the queue itself is that memory, and ``dedup.journal``
in the queue directory only keeps what the queue forgets:

1. an enqueue with a key or an id takes ``dedup.lock`` (an ``flock``), so
   keyed enqueues of every process run one at a time;
2. it catches up: reads the records sent since its index last looked (each
   once per process) and files every one that carries a key or an id;
3. it checks the key (``duplicate=True`` with the existing id) and the id
   (``DuplicateJobId``): nothing is written then;
4. it sends the record, reads it back in the catch-up (which gives its exact
   position, hence its id) and drops the lock.

The record is the commit.  A sender killed after its record is in the queue
and before anything else leaves the record, which the next keyed enqueue
reads in step 2: no duplicate gets through, and the original keeps its key.
Killed before its record is in the queue, it leaves nothing.

A job blocks its key while any consumer (receiver or group) has not passed
it, and for ``dedup_window`` seconds after a keyed enqueue first sees it
passed (a conservative settle time: the window never ends early).  The
journal gets a line per job filed, per job seen settled, and the position
read up to, so a process opened later, or after the job's segment was
deleted, still knows the key for the rest of its window.  Its lines carry a
CRC-32 each; a torn last line (a crash mid-write) is ignored.  It is
rewritten without expired jobs when it passes 1 MiB.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import threading
import time
import zlib
from dataclasses import dataclass
from typing import Any, Mapping, Protocol

from ._control import Control
from ._flock import wait_flock
from ._format import HEADER_SIZE
from ._fs import open_file, open_to_read
from ._headers import Framed, HeaderValue, frame_body, split_body
from ._options import (
    DEDUP_KEY,
    JOB_ID,
    Enqueued,
    JobOptions,
    TimeLike,
    check_options,
    check_user_headers,
    decode_options,
    default_job_id,
    encode_options,
    job_id_of,
)
from ._reader import RecordReader
from ._segment import list_segments, os_error
from ._state import Position, list_cursors, read_position
from .errors import DuplicateJobId, SegqError


class Appender(Protocol):
    """What an enqueue needs of the ``Sender`` it goes through (no import: the Sender imports this module)."""

    def _append_one(self, payload: bytes) -> int: ...

    def _dedup_index(self) -> "DedupIndex": ...

__all__ = ["enqueue", "DedupIndex", "DEDUP_JOURNAL", "DEDUP_LOCK"]

log = logging.getLogger(__name__)

DEDUP_JOURNAL = "dedup.journal"
DEDUP_LOCK = "dedup.lock"
_COMPACT_AT = 1 << 20
_KEY_NAME = DEDUP_KEY.encode("ascii")
_ID_NAME = JOB_ID.encode("ascii")


def enqueue(
    sender: Appender,
    data: bytes,
    *,
    run_at: TimeLike | None,
    delay: float | None,
    priority: int,
    dedup_key: str | None,
    job_id: str | None,
    headers: Mapping[str, HeaderValue] | None,
) -> Enqueued:
    """Send ``data`` as a job with options; see ``Sender.enqueue``."""
    options = check_options(
        run_at=run_at, delay=delay, priority=priority, dedup_key=dedup_key, job_id=job_id, now=time.time()
    )
    reserved = encode_options(options)
    combined: dict[str, HeaderValue] = {**check_user_headers(headers), **reserved}
    body: bytes = frame_body(bytes(data), combined, allow_reserved=True) if combined else bytes(data)
    if options.dedup_key is None and options.job_id is None:
        return Enqueued(default_job_id(sender._append_one(body)), False)
    index = sender._dedup_index()
    return index.enqueue(sender, body, options)


@dataclass
class _Job:
    id: str
    key: str | None
    end: int  # position word just past its record
    settled_at: float | None = None  # when a keyed enqueue first saw every consumer past it


class DedupIndex:
    """The keys and ids of the jobs in one queue's dedup window, kept by one process."""

    def __init__(self, control: Control, window: float) -> None:
        self.queue_dir = control.queue_dir
        self.window = window
        self._control = control
        self._thread_lock = threading.Lock()
        self._lock_path = os.path.join(self.queue_dir, DEDUP_LOCK)
        self._journal_path = os.path.join(self.queue_dir, DEDUP_JOURNAL)
        self._reader = RecordReader(control, 0, consumer="dedup")
        self._jobs: dict[str, _Job] = {}
        self._keys: dict[str, str] = {}  # dedup key -> job id
        self._pending: collections.deque[_Job] = collections.deque()  # not yet seen settled, by position
        self._settled: collections.deque[_Job] = collections.deque()  # by settle time
        self._scan = 0
        self._journal_size = -1  # bytes of the journal this index has read; -1: not loaded
        self._journal_inode = 0  # a rewrite replaces the file: start over

    # -- the transaction ---------------------------------------------------

    def enqueue(self, sender: Appender, body: bytes, options: JobOptions) -> Enqueued:
        """Check ``options``' key and id, send ``body`` if neither is taken; under the dedup lock."""
        with self._thread_lock:
            fd = self._take_lock()
            try:
                now = time.time()
                self._catch_up(now)
                key = options.dedup_key
                if key is not None and key in self._keys:
                    return Enqueued(self._keys[key], True)
                if options.job_id is not None and options.job_id in self._jobs:
                    raise DuplicateJobId(
                        f"job id {options.job_id!r} is already used by a job in the dedup window "
                        f"({self.window:g} s) of {self.queue_dir}; nothing was written",
                        job_id=options.job_id,
                    )
                start = sender._append_one(body)
                self._catch_up(now)  # files the record just sent (and journals it)
                return Enqueued(job_id_of(options, start), False)
            finally:
                os.close(fd)  # drops the flock

    def _take_lock(self) -> int:
        try:
            fd = open_file(self._lock_path, os.O_RDWR, private=True)
        except OSError as error:
            raise os_error(error, "open", self._lock_path) from None
        try:
            wait_flock(fd, self._lock_path, what="the dedup index")
        except BaseException:
            os.close(fd)
            raise
        return fd

    # -- keeping up with the queue and the journal -------------------------

    def _catch_up(self, now: float) -> None:
        lines: list[dict[str, Any]] = []
        self._load_journal()
        bottom = self._bottom()
        if self._scan < bottom:
            self._scan = bottom
        reader = self._reader
        reader.position = self._scan
        while True:
            data = reader.next()
            if data is None:
                break
            end = reader.position
            if type(data) is Framed and (data.find(_KEY_NAME) >= 0 or data.find(_ID_NAME) >= 0):
                start = end - HEADER_SIZE - len(data)
                options = decode_options(split_body(data, self.queue_dir, start)[1])
                if options.dedup_key is not None or options.job_id is not None:
                    job_id = job_id_of(options, start)
                    if job_id not in self._jobs:
                        self._file(_Job(job_id, options.dedup_key, end))
                        lines.append({"id": job_id, "key": options.dedup_key, "end": end})
        if reader.position != self._scan:
            self._scan = reader.position
            lines.append({"covered": self._scan})
        lines.extend(self._settle(now))
        self._expire(now)
        if lines:
            self._write(lines)

    def _bottom(self) -> int:
        segments = list_segments(self.queue_dir)
        return Position.bottom(segments[0]).word if segments else 0

    def _file(self, job: _Job) -> None:
        self._jobs[job.id] = job
        if job.key is not None:
            self._keys[job.key] = job.id
        if job.settled_at is None:
            self._pending.append(job)
        else:
            self._settled.append(job)

    def _settle(self, now: float) -> list[dict[str, Any]]:
        """Mark settled the jobs every consumer has passed; return their journal lines."""
        if not self._pending:
            return []
        passed = self._consumed_up_to()
        lines = []
        while self._pending and self._pending[0].end <= passed:
            job = self._pending.popleft()
            if self._jobs.get(job.id) is job:
                job.settled_at = now
                self._settled.append(job)
                lines.append({"settled": job.id, "at": now})
        return lines

    def _consumed_up_to(self) -> int:
        """Return the lowest committed position of every consumer (0 when there is none)."""
        positions = []
        for _, _, path in list_cursors(self.queue_dir):
            try:
                position = read_position(path)
            except (SegqError, FileNotFoundError):
                return 0  # unreadable: count nothing as passed (the window never ends early)
            positions.append(position.word)
        return min(positions) if positions else 0

    def _expire(self, now: float) -> None:
        settled = self._settled
        while settled and settled[0].settled_at is not None and settled[0].settled_at + self.window <= now:
            job = settled.popleft()
            if self._jobs.get(job.id) is job:
                del self._jobs[job.id]
                if job.key is not None and self._keys.get(job.key) == job.id:
                    del self._keys[job.key]

    # -- the journal -------------------------------------------------------

    def _load_journal(self) -> None:
        """Read the journal lines other processes wrote since this index last looked."""
        try:
            with open(open_to_read(self._journal_path), "rb") as handle:
                stat = os.fstat(handle.fileno())
                size = stat.st_size
                if self._journal_size < 0 or size < self._journal_size or stat.st_ino != self._journal_inode:
                    self._journal_inode = stat.st_ino
                    self._reset()
                    start = 0
                else:
                    start = self._journal_size
                handle.seek(start)
                raw = handle.read()
        except FileNotFoundError:
            if self._journal_size < 0:
                self._journal_size = 0
            return
        except OSError as error:
            raise os_error(error, "read", self._journal_path) from None
        consumed = 0
        for line in raw.splitlines(keepends=True):
            if not line.endswith(b"\n"):
                break  # torn by a crash mid-write: ignored, and overwritten by the next rewrite
            consumed += len(line)
            self._apply(line)
        self._journal_size = start + consumed

    def _reset(self) -> None:
        self._jobs.clear()
        self._keys.clear()
        self._pending.clear()
        self._settled.clear()
        self._scan = 0

    def _apply(self, line: bytes) -> None:
        crc, _, text = line.rstrip(b"\n").partition(b" ")
        try:
            if int(crc, 16) != zlib.crc32(text):
                raise ValueError("checksum mismatch")
            item = json.loads(text)
            if "covered" in item:
                self._scan = max(self._scan, int(item["covered"]))
            elif "settled" in item:
                job = self._jobs.get(item["settled"])
                if job is not None and job.settled_at is None:
                    job.settled_at = float(item["at"])
                    self._settled.append(job)
            elif item["id"] not in self._jobs:
                self._file(_Job(str(item["id"]), item.get("key"), int(item["end"]), item.get("settled_at")))
        except (ValueError, KeyError, TypeError) as error:
            log.warning("%s: ignoring a damaged line (%s)", self._journal_path, error)

    def _write(self, lines: list[dict[str, Any]]) -> None:
        if self._journal_size >= _COMPACT_AT:
            self._rewrite()
        data = b"".join(_line(item) for item in lines)
        try:
            fd = open_file(self._journal_path, os.O_WRONLY | os.O_APPEND)
            try:
                os.write(fd, data)
            finally:
                os.close(fd)
        except OSError as error:
            raise os_error(error, "write", self._journal_path) from None
        self._journal_size += len(data)

    def _rewrite(self) -> None:
        """Replace the journal with the jobs still in the window (lock held)."""
        items = [
            {"id": job.id, "key": job.key, "end": job.end, "settled_at": job.settled_at} for job in self._jobs.values()
        ]
        items.append({"covered": self._scan})
        data = b"".join(_line(item) for item in items)
        temporary = f"{self._journal_path}.{os.urandom(4).hex()}.tmp"
        try:
            with open(open_file(temporary, os.O_WRONLY), "wb") as handle:
                handle.write(data)
            os.replace(temporary, self._journal_path)
            self._journal_inode = os.stat(self._journal_path).st_ino
        except OSError as error:
            raise os_error(error, "rewrite", self._journal_path) from None
        self._journal_size = len(data)

    def close(self) -> None:
        """Release the reader."""
        self._reader.close()


def _line(item: dict[str, Any]) -> bytes:
    text = json.dumps(item, separators=(",", ":")).encode("utf-8")
    return b"%08x %s\n" % (zlib.crc32(text), text)

