"""Reading records in order: the one record reader Receiver and WorkQueue share.

Theory of operation
-------------------
A reader reads segments with ``pread`` into a buffer (never through a memory
map, so a segment truncated by someone else is an error, not a SIGBUS), and
never past the tail published in the control file: everything below it is
complete, so a checksum mismatch there is damage, not a write in progress.
The read position is a tail-style word (``Position.word``).
"""

from __future__ import annotations

import os
import time
from typing import Any

from . import _format, _segment
from ._control import TAIL_INDEX, Control
from ._format import (
    END_OF_SEGMENT,
    HEADED_CRC,
    HEADER_SIZE,
    LENGTH_MASK,
    RECORD_HEADER,
    record_crc,
)
from ._headers import Framed
from ._messages import decode_messages as _decode_messages
from ._messages import new_message as _new_message
from ._state import Position, word_offset, word_segment
from .errors import CorruptionError, SegqError

__all__ = ["RecordReader"]

_CHUNK = 1 << 17
_read_record = _format.read_record


class RecordReader:
    """Reads the records of a queue from ``position`` on; ``position`` advances past each one."""

    def __init__(self, control: Control, position: int, *, consumer: str) -> None:
        self.path = control.queue_dir
        self.position = position
        self._control = control
        self._words = control.words
        self._consumer = consumer  # for error messages: which consumer to recover
        self._fd = -1
        self._fd_segment = -1
        self._segment_size = 0
        self._buffer = b""
        self._buffer_start = 0  # segment offset of self._buffer[0]
        self._buffer_word = 0  # the same as a position word

    def available(self) -> bool:
        """Tell whether a record lies past ``position``."""
        return self._words[TAIL_INDEX] > self.position

    def next(self) -> bytes | None:
        """Return the record at ``position`` and advance past it; None if there is none yet."""
        # Fast path: the whole record is in the buffer and its checksum holds.
        read = self.position
        if read >= self._words[TAIL_INDEX]:
            return None
        data = _read_record(self._buffer, read - self._buffer_word)
        if data is not None:
            self.position = read + HEADER_SIZE + len(data)
            return data
        return self._next_slow()

    def next_messages(self, max_count: int, cls: type, owner: object) -> tuple[list[Any], int]:
        """Return up to ``max_count`` records that are there now as messages, and how many have headers.

        Each message is a ``cls`` (a ``MessageFields``) settled by ``owner``;
        its data is a ``Framed`` body if the record has headers (the caller
        splits those).  The messages of one run of records in the read
        buffer are built in one C call (``_messages.decode_messages``).
        """
        messages: list[Any] = []
        framed = 0
        words = self._words
        while len(messages) < max_count:
            read = self.position
            if read >= words[TAIL_INDEX]:
                break
            base = self._buffer_word
            found, end, headed = _decode_messages(
                self._buffer, read - base, max_count - len(messages), cls, owner, base
            )
            if found:
                self.position = base + end
                if not messages and (len(found) == max_count or self.position >= words[TAIL_INDEX]):
                    return found, headed  # the common case: one walk of the buffer gave them all
                messages += found
                framed += headed
                continue
            try:
                record = self._next_slow()
            except CorruptionError:
                if messages:
                    break  # return the records before the damage; the next call raises at it
                raise
            if record is None:
                break
            end = self.position
            framed += type(record) is not bytes
            messages.append(_new_message(cls, owner, record, end - HEADER_SIZE - len(record), end))
        return messages, framed

    def _next_slow(self) -> bytes | None:
        """Read the next record when the fast path cannot: refill, cross segments, check damage."""
        words = self._words
        while True:
            read = self.position
            tail = words[TAIL_INDEX]
            if read >= tail:
                return None
            segment = word_segment(read)
            offset = word_offset(read)
            relative = offset - self._buffer_start
            buffer = self._buffer
            if segment != self._fd_segment or relative < 0 or relative + HEADER_SIZE > len(buffer):
                buffer = self._fill(segment, offset, HEADER_SIZE, tail)
                relative = 0
            length_word, crc = RECORD_HEADER.unpack_from(buffer, relative)
            if length_word == END_OF_SEGMENT:
                self.position = Position.bottom(segment + 1).word
                continue
            size = length_word & LENGTH_MASK
            start = relative + HEADER_SIZE
            end = start + size
            if end > len(buffer):
                buffer = self._fill(segment, offset, HEADER_SIZE + size, tail)
                start, end = HEADER_SIZE, HEADER_SIZE + size
            data = buffer[start:end]
            computed = record_crc(length_word, data)
            if computed ^ HEADED_CRC == crc:
                data = Framed(data)
            elif computed != crc:
                data = self._reread_damaged(segment, offset, length_word, tail)
            self.position = read + HEADER_SIZE + size
            return data

    def _fill(self, segment: int, offset: int, needed: int, tail: int) -> bytes:
        """Read from ``offset`` of ``segment``: at least ``needed`` bytes, not past the tail."""
        if segment != self._fd_segment:
            self._open_segment(segment)
        limit = word_offset(tail) if word_segment(tail) == segment else self._segment_size
        if offset + needed > limit:
            # A record never runs past the tail or the file: its length is
            # damaged (or the file was cut), and reading it would allocate it.
            raise CorruptionError(
                _segment.segment_path(self.path, segment),
                offset,
                f"a record of {needed - HEADER_SIZE} bytes would run past the end of the data at offset {limit}"
                " (a damaged length, or a file truncated by another program)",
            )
        count = max(min(_CHUNK, limit - offset), needed)
        try:
            buffer = os.pread(self._fd, count, offset)
        except OSError as error:
            raise _segment.os_error(error, "read segment", _segment.segment_path(self.path, segment)) from None
        if len(buffer) < needed:
            raise CorruptionError(
                _segment.segment_path(self.path, segment),
                offset,
                f"segment ends after {offset + len(buffer)} bytes but its records go on "
                "(was the file truncated by another program?)",
            )
        self._buffer = buffer
        self._buffer_start = offset
        self._buffer_word = Position(segment, offset).word
        return buffer

    def _open_segment(self, number: int) -> None:
        self.close()
        path = _segment.segment_path(self.path, number)
        try:
            fd, self._segment_size = _segment.open_segment(path, number, writable=False)
        except FileNotFoundError:
            raise SegqError(
                f"{path} is missing but {self._consumer} reads from it; run `segq recover {self.path}`"
            ) from None
        self._fd = fd
        self._fd_segment = number

    def _reread_damaged(self, segment: int, offset: int, length_word: int, tail: int) -> bytes:
        # On weakly ordered CPUs a record's bytes may become visible a moment
        # after the tail that covers them; only a mismatch that persists is damage.
        size = length_word & LENGTH_MASK
        for pause in (0.0, 0.001, 0.01):
            time.sleep(pause)
            buffer = self._fill(segment, offset, HEADER_SIZE + size, tail)
            again_word, again_crc = RECORD_HEADER.unpack_from(buffer, 0)
            data = buffer[HEADER_SIZE : HEADER_SIZE + size]
            if again_word == length_word:
                computed = record_crc(length_word, data)
                if computed == again_crc:
                    return data
                if computed ^ HEADED_CRC == again_crc:
                    return Framed(data)
        raise CorruptionError(_segment.segment_path(self.path, segment), offset, "record checksum mismatch")

    def close(self) -> None:
        """Close the open segment, if any; the reader can go on reading afterwards."""
        if self._fd >= 0:
            os.close(self._fd)
        self._fd = -1
        self._fd_segment = -1
        self._buffer = b""
        self._buffer_start = 0
        self._buffer_word = 0
