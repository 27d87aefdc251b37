"""Segment retention: which segments a queue keeps, and deleting the rest.

Theory of operation
-------------------
A segment is kept while a registered consumer (a receiver name or a
work-queue group: a cursor file in ``cursors/``, ``_state``) has not
committed past it.  A committer that leaves a segment behind calls
:func:`delete_consumed_segments`, which unlinks, oldest first, every segment
below the lowest one any cursor is in; a crash midway leaves the oldest of
them gone and the rest as they were, which the next deletion finishes.  A
cursor that cannot be read keeps everything: nothing is deleted on a guess.

A new consumer starts at the oldest retained record (:func:`register_cursor`).
Registration and deletion hold the same ``flock``, ``segq.gc.lock``, so a
new consumer never starts in a segment that is being deleted.
"""

from __future__ import annotations

import logging
import os
from io import FileIO

from ._flock import wait_flock
from ._fs import open_file
from ._segment import StrPath, list_segments, segment_path
from ._state import RELEASED_SEGMENT, ConsumerKind, CursorFile, Position, cursor_path, list_cursors, read_position
from .errors import SegqError

__all__ = ["retention_lock", "register_cursor", "delete_consumed_segments", "delete_segments_below"]

log = logging.getLogger(__name__)

RETENTION_LOCK_NAME = "segq.gc.lock"


def retention_lock(queue_dir: StrPath) -> FileIO:
    """Take the queue's retention lock; return the open file that holds it (closing it lets go).

    Use it as ``with retention_lock(queue_dir): ...``.
    """
    path = os.path.join(queue_dir, RETENTION_LOCK_NAME)
    handle = os.fdopen(open_file(path, os.O_RDWR, private=True), "r+b", buffering=0)
    try:
        wait_flock(handle.fileno(), path, what="segment deletion lock")
    except BaseException:
        handle.close()
        raise
    return handle


def register_cursor(queue_dir: StrPath, kind: ConsumerKind, name: str) -> CursorFile:
    """Open consumer ``name``'s cursor, creating it at the oldest retained record if new."""
    path = cursor_path(queue_dir, kind, name)
    if os.path.exists(path):
        return CursorFile(path)
    with retention_lock(queue_dir):
        if os.path.exists(path):
            return CursorFile(path)
        segments = list_segments(queue_dir)
        return CursorFile(path, initial=Position.bottom(segments[0] if segments else 0))


def delete_consumed_segments(queue_dir: StrPath) -> list[int]:
    """Delete every segment all registered consumers have committed past; return their numbers."""
    with retention_lock(queue_dir):
        floor = None
        for _, _, path in list_cursors(queue_dir):
            try:
                position = read_position(path)
            except SegqError:
                return []
            if position.segment == RELEASED_SEGMENT:
                continue  # a released pin is no consumer: with no other, nothing is deleted
            floor = position.segment if floor is None else min(floor, position.segment)
        if floor is None:
            return []
        return _unlink_below(queue_dir, floor)


def delete_segments_below(queue_dir: StrPath, segment: int) -> list[int]:
    """Delete every segment numbered below ``segment``, whatever the cursors say; return their numbers.

    For ``clear`` on a queue with no consumer registered.
    """
    with retention_lock(queue_dir):
        return _unlink_below(queue_dir, segment)


def _unlink_below(queue_dir: StrPath, segment: int) -> list[int]:
    """Unlink the segments below ``segment``, oldest first (hold the retention lock)."""
    deleted = []
    for number in list_segments(queue_dir):
        if number >= segment:
            break
        try:
            os.unlink(segment_path(queue_dir, number))
        except FileNotFoundError:
            continue  # another process got there first
        deleted.append(number)
    if deleted:
        log.debug("%s: deleted consumed segments %s", queue_dir, deleted)
    return deleted
