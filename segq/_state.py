"""Consumer positions: crash-atomic O(1) writes of a small metadata file.

Theory of operation
-------------------
Each consumer (a receiver name, a work-queue group) has a cursor file,
``cursors/<kind>.<name>.pos``, of two 512-byte sectors.  Each sector holds a
*slot*: magic, version, a sequence number, the position, and a CRC-32 of all
that.  A write goes to the slot the previous write did not use, with the next
sequence number, through a shared memory map: one memory copy, no system
call.  A crash at any instant (the process killed mid-copy, power lost
mid-sector) can only damage the slot being written, and the reader takes the
valid slot with the higher sequence number: the old position or the new one,
never garbage.  Durability against power loss comes from ``sync`` (msync).
"""

from __future__ import annotations

import enum
import errno
import mmap
import os
import re
import struct
import zlib
from dataclasses import dataclass

from . import _format
from ._format import SEGMENT_HEADER_SIZE
from ._fs import create_whole, make_dir, open_file, open_to_read
from ._segment import OFFSET_BITS, StrPath, os_error
from .errors import CorruptionError, InvalidArgument, SegqError, UnsupportedFormat

__all__ = [
    "Position",
    "word_segment",
    "word_offset",
    "same_segment",
    "CursorFile",
    "ConsumerKind",
    "cursor_path",
    "receiver_lock_path",
    "list_cursors",
    "check_name",
    "CURSOR_DIR",
    "RELEASED_SEGMENT",
    "read_position",
]

CURSOR_DIR = "cursors"
#: A cursor at this segment holds nothing back: a released outbox pin (workqueue._outbox).
RELEASED_SEGMENT = 0xFFFF_FFFF
_MAGIC = b"segq\x00pos"
_VERSION = 1
_BODY = struct.Struct("<8sIIQQQ")  # magic, version, reserved, sequence, segment, offset
_CRC = struct.Struct("<I")
_SLOT_SIZE = 512
_SLOT_WORDS = _SLOT_SIZE // 8
_PREFIX = _BODY.pack(_MAGIC, _VERSION, 0, 0, 0, 0)[:16]
_crc32 = zlib.crc32
# One C call stores a slot's words and CRC (about a third of the memoryview way's cost).
_c_write_slot = _format._speedups.write_slot if _format.SPEEDUPS else None
_FILE_SIZE = 2 * _SLOT_SIZE
_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,99}$")


# A position as one 64-bit *word*: ``segment << OFFSET_BITS | offset``.  Words
# compare in queue order and a record's end is its start plus its length, so
# the control file's tail, readers and work-queue journals keep positions as
# words; ``Position.word``/``Position.from_word`` are the one encoding of it.
_OFFSET_MASK = (1 << OFFSET_BITS) - 1


@dataclass(frozen=True, order=True)
class Position:
    """A place in the queue: a segment number and a byte offset inside it.

    Positions compare in queue order.  ``Position(3, 4096)`` prints as
    ``segment 3 offset 4096``; as a word (``.word``) it is
    ``3 << 32 | 4096``.
    """

    segment: int
    offset: int

    def __str__(self) -> str:
        return f"segment {self.segment} offset {self.offset}"

    @classmethod
    def bottom(cls, segment: int) -> "Position":
        """Return the position of the first record of ``segment``."""
        return cls(segment, SEGMENT_HEADER_SIZE)

    @property
    def word(self) -> int:
        """The position as one word, ``segment << 32 | offset``: words compare in queue order too."""
        return self.segment << OFFSET_BITS | self.offset

    @classmethod
    def from_word(cls, word: int) -> "Position":
        """Return the position a word (``segment << 32 | offset``) stands for."""
        return cls(word >> OFFSET_BITS, word & _OFFSET_MASK)


def word_segment(word: int) -> int:
    """Return the segment of a position word, without making a Position (for paths run per record)."""
    return word >> OFFSET_BITS


def word_offset(word: int) -> int:
    """Return the offset of a position word, without making a Position (for paths run per record)."""
    return word & _OFFSET_MASK


def same_segment(word: int, other: int) -> bool:
    """Tell whether two position words lie in the same segment (for paths run per record)."""
    return not (word ^ other) >> OFFSET_BITS


def check_name(name: str, what: str = "receiver name") -> str:
    """Return ``name`` if it is usable in a file name, else raise ``SegqError``."""
    if not isinstance(name, str) or not _NAME.match(name):
        shown = repr(name) if not isinstance(name, str) or len(name) <= 60 else f"{name[:40]!r}... ({len(name):,} characters)"
        raise InvalidArgument(
            f"bad {what} {shown}: use 1-100 letters, digits, '.', '_' or '-', not starting with '.' or '-'", name=what
        )
    return name


class ConsumerKind(str, enum.Enum):
    """What a consumer is; the value is the first letter of its cursor file's name."""

    RECEIVER = "r"
    GROUP = "g"
    PIN = "o"  # an outbox pin: keeps a queue's segments while follow-ups are in doubt (workqueue._outbox)

    @property
    def role(self) -> str:
        """The word for it in reports: "receiver" or "group"."""
        return self.name.lower()


def cursor_path(queue_dir: StrPath, kind: ConsumerKind, name: str) -> str:
    """Return the cursor file of consumer ``name`` of ``kind``."""
    return os.path.join(queue_dir, CURSOR_DIR, f"{ConsumerKind(kind).value}.{name}.pos")


def receiver_lock_path(queue_dir: StrPath, name: str) -> str:
    """Return the lock file a live Receiver of ``name`` holds: its cursor's name, ending ``.lock``."""
    return cursor_path(queue_dir, ConsumerKind.RECEIVER, name)[: -len(".pos")] + ".lock"


_KIND_LETTERS = {kind.value for kind in ConsumerKind}


def list_cursors(queue_dir: StrPath) -> list[tuple[ConsumerKind, str, str]]:
    """Return ``(kind, name, path)`` of every consumer registered in ``queue_dir``."""
    directory = os.path.join(queue_dir, CURSOR_DIR)
    try:
        names = sorted(os.listdir(directory))
    except FileNotFoundError:
        return []
    except OSError as error:
        raise os_error(error, "list", directory) from None
    found = []
    for file_name in names:
        if file_name.endswith(".pos") and file_name[1:2] == "." and file_name[0] in _KIND_LETTERS:
            found.append((ConsumerKind(file_name[0]), file_name[2:-4], os.path.join(directory, file_name)))
    return found


def _decode_slot(data: bytes) -> tuple[int, Position] | None:
    magic, version, _, sequence, segment, offset = _BODY.unpack_from(data, 0)
    if magic != _MAGIC:
        return None
    (crc,) = _CRC.unpack_from(data, _BODY.size)
    if zlib.crc32(data[: _BODY.size]) != crc:
        return None
    if version != _VERSION:
        raise UnsupportedFormat(f"cursor format {version}, this segq reads {_VERSION}")
    return sequence, Position(segment, offset)


class CursorFile:
    """A consumer's saved position, memory-mapped for O(1) crash-atomic writes."""

    def __init__(self, path: StrPath, *, initial: Position | None = None) -> None:
        """Open the cursor at ``path``; create it at ``initial`` if missing (else raise)."""
        self.path = os.fspath(path)
        try:
            if initial is not None:
                _create_cursor_file(self.path, initial)
            self.fd = open_file(self.path, os.O_RDWR, create=False)
        except FileNotFoundError:
            raise SegqError(f"no consumer state at {self.path}") from None
        except OSError as error:
            raise os_error(error, "open cursor", self.path) from None
        try:
            size = os.fstat(self.fd).st_size
            fresh = size == 0
            if fresh:
                os.ftruncate(self.fd, _FILE_SIZE)
            elif size != _FILE_SIZE:
                raise CorruptionError(self.path, 0, f"cursor file is {size} bytes, expected {_FILE_SIZE}")
            self.map = mmap.mmap(self.fd, _FILE_SIZE)
            self._words = memoryview(self.map).cast("Q")
            self._crcs = memoryview(self.map).cast("I")
            self._bodies = [memoryview(self.map)[base : base + _BODY.size] for base in (0, _SLOT_SIZE)]
            self._prefixed = False
            if fresh:
                if initial is None:
                    raise CorruptionError(self.path, 0, "cursor file is empty")
                self._sequence = self._segment = self._offset = 0
                self.write(initial)
                self.sync()
            else:
                self._load()
        except BaseException:
            self.close()
            raise

    def _read(self) -> tuple[int, Position]:
        return _newest_slot(self.path, self.map)

    def _load(self) -> None:
        self._sequence, position = self._read()
        self._segment, self._offset = position.segment, position.offset

    def reload(self) -> Position:
        """Re-read the position (another process, e.g. recovery, may have written it)."""
        self._load()
        return self.position

    @property
    def position(self) -> Position:
        """The position saved last."""
        return Position(self._segment, self._offset)

    def write(self, position: Position) -> None:
        """Save ``position``: one memory copy into the slot not holding the current one."""
        self.write_word(position.word)

    def write_over(self, segment: int, offset: int) -> None:
        """Save ``(segment, offset)`` over whatever another process wrote last (the caller serialises writers).

        Only the two slots' sequence numbers are read, not their checksums:
        the write takes a sequence above both, so it wins whatever they hold.
        """
        words = self._words
        self._sequence = max(words[2], words[_SLOT_WORDS + 2]) & 0x7FFF_FFFF_FFFF_FFFF
        self.write_at(segment, offset)

    def write_at(self, segment: int, offset: int) -> None:
        """Save ``(segment, offset)``."""
        self.write_word(segment << OFFSET_BITS | offset)

    def write_word(self, word: int) -> bool:
        """Save position word ``word``, the allocation-free form of :meth:`write`; return whether its segment changed.

        A commit's one call: True tells the committer it left a segment behind
        (time to delete consumed ones).
        """
        if not self._prefixed:
            self._write_prefixes()
        sequence = self._sequence + 1
        segment = word >> OFFSET_BITS
        offset = word & _OFFSET_MASK
        if _c_write_slot is not None:
            _c_write_slot(self.map, (sequence & 1) * _SLOT_SIZE, sequence, segment, offset)
        else:
            self._write_slot_words((sequence & 1) * _SLOT_SIZE, sequence, segment, offset)
        self._sequence = sequence
        moved = segment != self._segment
        self._segment = segment
        self._offset = offset
        return moved

    def _write_slot_words(self, base: int, sequence: int, segment: int, offset: int) -> None:
        # The Python twin of _speedups.write_slot: word stores through a
        # memoryview, then the CRC of the slot's first 40 bytes.
        words = self._words
        index = base // 8
        words[index + 2] = sequence
        words[index + 3] = segment
        words[index + 4] = offset
        self._crcs[base // 4 + 10] = _crc32(self._bodies[base // _SLOT_SIZE])

    def _write_prefixes(self) -> None:
        # Magic and version never change: they are written before the first
        # write, so every write is three word stores and a CRC.  A slot whose
        # prefix differs is invalid anyway (the valid one was checked on open).
        for base in (0, _SLOT_SIZE):
            if self.map[base : base + 16] != _PREFIX:
                self.map[base : base + 16] = _PREFIX
        self._prefixed = True

    def sync(self) -> None:
        """Make the last write survive power loss."""
        self.map.flush()

    def close(self) -> None:
        """Unmap and close; safe to call twice."""
        for view in (getattr(self, "_words", None), getattr(self, "_crcs", None), *getattr(self, "_bodies", ())):
            if view is not None:
                view.release()
        mapping = getattr(self, "map", None)
        if mapping is not None and not mapping.closed:
            mapping.close()
        if getattr(self, "fd", -1) >= 0:
            os.close(self.fd)
            self.fd = -1


def _create_cursor_file(path: str, initial: Position) -> None:
    """Create the cursor file at ``path`` holding ``initial``, whole or not at all.

    Like a segment it is written under a temporary name, synced and linked
    into place: a crash never leaves an empty cursor behind, a full disk fails
    here with an error (not later, as SIGBUS in a write to a mapped hole),
    and the new name survives power loss.  If the file exists, it is kept.
    """
    directory = os.path.dirname(path)
    if os.path.exists(path):
        return
    make_dir(os.path.dirname(directory), os.path.basename(directory))
    content = bytearray(_FILE_SIZE)
    content[0:16] = _PREFIX
    body = _BODY.pack(_MAGIC, _VERSION, 0, 1, initial.segment, initial.offset)
    content[_SLOT_SIZE : _SLOT_SIZE + _BODY.size] = body
    _CRC.pack_into(content, _SLOT_SIZE + _BODY.size, zlib.crc32(body))

    def fill(fd: int) -> None:
        if os.write(fd, content) != _FILE_SIZE:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    # Another process may create it first: then theirs is kept.  The cursor
    # directory may be new too, so its own entry is synced as well.
    create_whole(path, fill, durable=True, new_directories=1)


def _newest_slot(path: str, data: bytes | mmap.mmap) -> tuple[int, Position]:
    """Return ``(sequence, position)`` of the newest sound slot in a cursor file's bytes ``data``."""
    best = None
    for base in (0, _SLOT_SIZE):
        try:
            slot = _decode_slot(data[base : base + _SLOT_SIZE])
        except UnsupportedFormat as error:
            raise UnsupportedFormat(f"{path}: {error}") from None
        if slot is not None and (best is None or slot[0] > best[0]):
            best = slot
    if best is None:
        raise CorruptionError(path, 0, "both position slots are damaged")
    return best


def read_position(path: StrPath) -> Position:
    """Return the position saved at ``path``, reading it read-only (inspection needs no write access)."""
    path = os.fspath(path)
    try:
        fd = open_to_read(path)
    except FileNotFoundError:
        raise SegqError(f"no consumer state at {path}") from None
    except OSError as error:
        raise os_error(error, "read cursor", path) from None
    try:
        size = os.fstat(fd).st_size
        data = os.pread(fd, _FILE_SIZE, 0)
    finally:
        os.close(fd)
    if size == 0:
        raise CorruptionError(path, 0, "cursor file is empty")
    if size != _FILE_SIZE:
        raise CorruptionError(path, 0, f"cursor file is {size} bytes, expected {_FILE_SIZE}")
    return _newest_slot(path, data)[1]
