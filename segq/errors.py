"""The segq error tree: every error segq raises is a :class:`SegqError`."""

from __future__ import annotations

import os
import queue

__all__ = [
    "SegqError",
    "Empty",
    "Full",
    "Locked",
    "RecordTooLarge",
    "CorruptionError",
    "UnsupportedFormat",
    "UsageError",
    "InvalidArgument",
    "Closed",
    "ClaimLost",
    "DuplicateJobId",
]


class SegqError(Exception):
    """Base class of every error segq raises."""


class Empty(SegqError, queue.Empty):
    """No record arrived before the timeout ran out."""


class Full(SegqError, queue.Full):
    """The backlog stayed above ``max_queue_bytes`` until the timeout ran out."""


class Locked(SegqError):
    """Another live process holds the lock file; ``pid`` names it."""

    def __init__(self, message: str, *, path: str | os.PathLike[str], pid: int | None) -> None:
        super().__init__(message)
        self.path = os.fspath(path)
        self.pid = pid


class RecordTooLarge(SegqError, ValueError):
    """A record (or a whole batch) is larger than the queue accepts; nothing was written."""

    def __init__(self, message: str, *, size: int, limit: int) -> None:
        super().__init__(message)
        self.size = size
        self.limit = limit


class CorruptionError(SegqError):
    """Bytes on disk fail their checksum or framing; ``path`` and ``offset`` say where."""

    def __init__(self, path: str | os.PathLike[str], offset: int, problem: str, *, hint: str | None = None) -> None:
        self.path = os.fspath(path)
        self.offset = offset
        self.problem = problem
        queue_dir = os.path.dirname(self.path) or "."
        if os.path.basename(queue_dir) == "cursors":
            queue_dir = os.path.dirname(queue_dir) or "."
        self.hint = hint or f"run `segq recover {queue_dir}`"
        super().__init__(f"{self.path} offset {offset}: {problem}; {self.hint}")


class UnsupportedFormat(SegqError):
    """A file was written by another (usually newer) version of the segq format."""


class UsageError(SegqError):
    """The call is not allowed in the object's current state (e.g. ``recv`` while a message is pending)."""


class InvalidArgument(SegqError, ValueError):
    """An argument is out of range or of the wrong type (a NaN timeout, a bad path); ``name`` says which."""

    def __init__(self, message: str, *, name: str | None = None) -> None:
        super().__init__(message)
        self.name = name


class Closed(UsageError):
    """The object was used after ``close()``."""


class ClaimLost(SegqError):
    """A work-queue claim is no longer held: its lease ran out and the record went back."""


class DuplicateJobId(SegqError):
    """``enqueue(job_id=...)`` named an id a job in the dedup window already has; nothing was written."""

    def __init__(self, message: str, *, job_id: str) -> None:
        super().__init__(message)
        self.job_id = job_id
