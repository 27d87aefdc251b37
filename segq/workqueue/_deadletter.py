"""Dead letters: the envelope a record gets when it runs out of attempts.

A dead-letter queue is an ordinary segq queue (``<queue>/dead/<group>`` by
default); each of its records is one :class:`DeadLetter` envelope:

====== ==== ==========================================================
offset size field (little-endian)
====== ==== ==========================================================
0      4    magic ``sqDL``
4      2    envelope version, 1
6      2    header size H (40 in version 1; a reader skips to H)
8      4    attempts the record had
12     4    reason length R (bytes of UTF-8)
16     8    the record's position in its queue as a word, ``segment << 32 | offset``
24     8    when it was dead-lettered, seconds since the epoch (float64)
32     2    group name length G
34     6    reserved, zero
H      G    group name (UTF-8)
H+G    R    reason (UTF-8)
H+G+R  ...  the original payload, unchanged
====== ==== ==========================================================

The original record's headers, reserved ones included, are the dead letter's
own record headers: a Receiver on the dead-letter queue sees them as
``msg.headers``, and a requeue sends them on with the data.
"""

from __future__ import annotations

import logging
import os
import struct
from dataclasses import dataclass, field
from typing import Mapping

from .._args import SyncPolicy
from .._headers import Framed, frame_body, split_body
from .._segment import DEFAULT_SEGMENT_SIZE, StrPath, queue_segment_size
from .._state import Position, check_name
from ..errors import SegqError
from ..sender import Sender

__all__ = ["DeadLetter", "DeadLetterSender", "dead_letter_path", "dead_letter_segment_size"]

log = logging.getLogger(__name__)

_LETTER = struct.Struct("<4sHHIIQdH6x")
_LETTER_MAGIC = b"sqDL"
_LETTER_VERSION = 1


def dead_letter_path(path: StrPath, group: str = "default") -> str:
    """Return the default dead-letter queue of ``group``: ``<path>/dead/<group>``."""
    return os.path.join(path, "dead", check_name(group, "group name"))


def dead_letter_segment_size(path: StrPath) -> int:
    """Bound dead-letter segments: the segment size of the queue at ``path``, at least the default, plus an envelope.

    A bound only: the dead-letter queue's segments start at 1 MiB and grow
    with its traffic (``_segment.next_segment_size``), so one dead letter
    costs 1 MiB of disk.  The queue's segment size is read by the one rule,
    ``_segment.queue_segment_size``.
    """
    return max(DEFAULT_SEGMENT_SIZE, queue_segment_size(path)) + 8192


@dataclass(frozen=True)
class DeadLetter:
    """A record that ran out of attempts, as stored in the dead-letter queue.

    >>> letter = DeadLetter(b"job", attempts=5, reason="ValueError: bad", group="default")
    >>> DeadLetter.decode(letter.encode()).data
    b'job'
    """

    data: bytes
    attempts: int
    reason: str
    group: str
    position: Position = Position(0, 0)  # where the record was in its queue
    dead_at: float = 0.0  # when it was dead-lettered (seconds since the epoch)
    headers: Mapping[str, bytes] = field(default_factory=dict)  # the original record's

    def __post_init__(self) -> None:
        if type(self.data) is Framed:  # a record with headers, as a reader returns it
            data, headers = split_body(self.data)
            object.__setattr__(self, "data", data)
            object.__setattr__(self, "headers", headers)

    def original(self) -> bytes:
        """Return the original record as a ``Sender`` takes it: its data, with its headers if it had any."""
        if not self.headers:
            return bytes(self.data)
        return frame_body(bytes(self.data), self.headers, allow_reserved=True)

    def encode(self) -> bytes:
        """Return the dead letter's record: the envelope, with the original headers as its headers.

        The envelope is a 40-byte header, the group name, the reason, then the payload.
        """
        group = self.group.encode("utf-8", "replace")
        reason = self.reason.encode("utf-8", "replace")
        word = self.position.word
        header = _LETTER.pack(
            _LETTER_MAGIC, _LETTER_VERSION, _LETTER.size, self.attempts, len(reason), word, self.dead_at, len(group)
        )
        envelope = header + group + reason + bytes(self.data)
        if not self.headers:
            return envelope
        return frame_body(envelope, self.headers, allow_reserved=True)

    @classmethod
    def decode(
        cls, raw: bytes | bytearray | memoryview, headers: Mapping[str, bytes] | None = None
    ) -> "DeadLetter":
        """Decode a dead-letter record (``msg.data`` and ``msg.headers`` of a Receiver on the dead-letter queue).

        Raises ``SegqError`` if ``raw`` is not a dead letter.
        """
        if type(raw) is Framed:
            raw, headers = split_body(raw)
        raw = bytes(raw)
        if len(raw) < _LETTER.size or raw[:4] != _LETTER_MAGIC:
            raise SegqError("not a segq dead letter (bad magic number)")
        _, version, header_size, attempts, reason_size, word, dead_at, group_size = _LETTER.unpack_from(raw, 0)
        if version != _LETTER_VERSION or header_size < _LETTER.size:
            raise SegqError(f"dead letter of envelope version {version}; this segq reads {_LETTER_VERSION}")
        body = header_size + group_size + reason_size
        if body > len(raw):
            raise SegqError(f"dead letter cut short: {len(raw)} bytes, its header needs {body}")
        group = raw[header_size : header_size + group_size].decode("utf-8", "replace")
        reason = raw[header_size + group_size : body].decode("utf-8", "replace")
        position = Position.from_word(word)
        return cls(raw[body:], attempts, reason, group, position, dead_at, dict(headers or {}))


class DeadLetterSender:
    """Send the records of ``group`` (of the queue at ``path``) that ran out of attempts to ``dead_letter``.

    The dead-letter queue is opened on the first letter, with segments sized
    for the queue's largest record and the group's ``sync`` policy.
    """

    def __init__(self, path: StrPath, group: str, dead_letter: str, sync: SyncPolicy) -> None:
        self.path = os.fspath(path)
        self.group = group
        self.dead_letter = dead_letter
        self._sync = sync
        self._sender: Sender | None = None

    def send(self, data: bytes, attempts: int, reason: str, start: int, now: float) -> None:
        """Send the record that starts at word ``start`` with its last ``reason``; returns once it is queued."""
        letter = DeadLetter(data, attempts, reason, self.group, Position.from_word(start), now)
        if self._sender is None:
            self._sender = Sender(self.dead_letter, segment_size=dead_letter_segment_size(self.path), sync=self._sync)
        self._sender.send(letter.encode())
        log.info("%s: record at %s dead-lettered after %d attempts: %s", self.group, letter.position, attempts, reason)

    def close(self) -> None:
        """Close the dead-letter queue's Sender if one was opened; idempotent."""
        if self._sender is not None:
            self._sender.close()
            self._sender = None
