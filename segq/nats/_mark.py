"""A forwarder's mark: how far into the stream its queue's records can be, kept crash-atomically.

Theory of operation
-------------------
``forward`` needs, on restart, the stream sequence after which every record
of its queue that it has not committed locally must be, if it landed at all
(``_forward`` explains why).  It keeps that in ``QUEUE/forward.NAME.mark``
(``NAME`` the forwarder's receiver name) as a *mark*: the stream sequence
``seq`` and the queue position ``position`` such that

* every record before ``position`` is in the stream (it was acknowledged);
* every record at or after ``position`` that is in the stream was stored
  at a sequence above ``seq``.

The file is two 64-byte slots.  Each holds magic, version, a CRC-32 of the
stream's name (a mark made for another stream is not used), a counter, the
sequence, the position, and a CRC-32 of all that.  A write goes to slot
``counter & 1`` with one ``pwrite``: a kill at any instant can damage only
the slot being written, and the reader takes the valid slot with the higher
counter, so it sees the old mark or the new one.  Only the first mark is
fsynced (with its directory entry), so a forwarder that published has a
mark even after a power loss.  Later ones are not: a mark older than the
receiver's cursor only makes the restart read further back, and one newer
than the cursor (the cursor's write lost with the page cache) is honoured
by committing up to its position, so either order of loss is safe.  A
file with no valid slot reads as no mark.
"""

from __future__ import annotations

import os
import struct
import zlib

from .._fs import fsync_directory, open_file
from .._state import Position

__all__ = ["MarkFile", "Mark", "mark_path"]

_MAGIC = b"segqfwm\x00"
_VERSION = 1
_BODY = struct.Struct("<8sIIQQQQ")  # magic, version, stream crc, counter, stream seq, segment, offset
_CRC = struct.Struct("<I")
_SLOT = 64

Mark = tuple[int, Position]
"""(stream sequence, queue position): see the module's docstring."""


def mark_path(queue_dir: str, name: str) -> str:
    """Return the path of receiver ``name``'s forward mark in ``queue_dir``."""
    return os.path.join(queue_dir, f"forward.{name}.mark")


class MarkFile:
    """The open mark file of one forwarder, for one stream."""

    def __init__(self, queue_dir: str, name: str, stream: str) -> None:
        self.path = mark_path(queue_dir, name)
        self._stream = zlib.crc32(stream.encode())
        self._fd = open_file(self.path, os.O_RDWR)
        self._counter = 0
        self.mark: Mark | None = None
        self.foreign = False  # a valid mark made for another stream was found
        self._read()

    def _read(self) -> None:
        data = os.pread(self._fd, 2 * _SLOT, 0)
        best: tuple[int, int, Mark] | None = None
        for slot in range(2):
            raw = data[slot * _SLOT:(slot + 1) * _SLOT]
            if len(raw) < _BODY.size + _CRC.size:
                continue
            (crc,) = _CRC.unpack_from(raw, _BODY.size)
            if zlib.crc32(raw[:_BODY.size]) != crc:
                continue
            magic, version, stream, counter, sequence, segment, offset = _BODY.unpack_from(raw)
            if magic != _MAGIC or version != _VERSION:
                continue
            if best is None or counter > best[0]:
                best = (counter, stream, (sequence, Position(segment, offset)))
        if best is None:
            return
        self._counter = best[0]
        if best[1] == self._stream:
            self.mark = best[2]
        else:
            self.foreign = True

    def write(self, sequence: int, position: Position, *, durable: bool = False) -> None:
        """Store the mark (``sequence``, ``position``) in the slot the last write did not use.

        With ``durable`` the file and its directory entry are synced too: for
        the first mark, so that power lost right after it cannot leave a
        forwarder that published with no mark at all.
        """
        self._counter += 1
        body = _BODY.pack(_MAGIC, _VERSION, self._stream, self._counter, sequence, position.segment, position.offset)
        slot = body + _CRC.pack(zlib.crc32(body))
        os.pwrite(self._fd, slot.ljust(_SLOT, b"\x00"), (self._counter & 1) * _SLOT)
        self.mark = (sequence, position)
        if durable:
            os.fsync(self._fd)
            fsync_directory(os.path.dirname(self.path))

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
