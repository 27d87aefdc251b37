"""A work-queue group's journal: an append-only log of claims, acks and returns.

Theory of operation
-------------------
A group's state (claim head, low-water mark, claims in flight, records given
back, records done above the mark) is the result of replaying the entries of
``groups/<group>/journal`` in order.  Every process of the group keeps that
result in memory (a *replica*, ``_claims.GroupState``) and changes it only
while holding the group lock (``groups/<group>/lock``, an ``flock``):

1. take the lock;
2. replay the entries other processes appended since this process last looked
   (the header's *end* word says how far the journal goes);
3. append this operation's entry, then publish it by storing the new end word
   (one aligned 8-byte store: the commit point);
4. drop the lock.

The journal is memory-mapped (MAP_SHARED): an append is a memory copy, no
system call, and the page cache keeps it when the process is killed.  A
process killed mid-append leaves bytes past the end word, which nobody reads
and the next append overwrites.  So a SIGKILL at any instant leaves every
operation that returned, and no half of any.  Each entry carries a CRC-32, so
a page lost to power failure is found by the replay (``CorruptionError``, or a
repair by ``recover_group``) instead of being read as state.

When an append does not fit, the lock holder *compacts*: it writes a new
journal holding only the current state (a snapshot made of the same entry
types) under a temporary name, sets the *sealed* word of the old journal, and
renames the new one over it.  A process that finds its journal sealed reopens
the file by name and rebuilds its replica from the snapshot.  A crash between
sealing and renaming leaves the old journal, sealed but still current; the
next lock holder sees that the file at the name is the one it has and clears
the word.

Byte layout (``docs/workqueue.md``): a 128-byte header, then entries back to
back.  An entry is an 8-byte header, ``u32 kind << 24 | body length`` and
``u32 CRC-32`` of those 4 bytes and the body, then the body; integers in
bodies are little-endian.  The header's mutable words are native 64-bit
words written with one aligned store (segq runs on little-endian hosts).
"""

from __future__ import annotations

import mmap
import os
import struct
import sys
import zlib
from typing import Iterator

from .._fs import open_file, replace_into_place, write_temporary
from .._segment import StrPath, os_error, preallocate
from ..errors import CorruptionError, SegqError, UnsupportedFormat

__all__ = [
    "JOURNAL_NAME",
    "HEADER_SIZE",
    "DEFAULT_CAPACITY",
    "END",
    "SEALED",
    "SEALED_MARK",
    "RETURNS",
    "WORD",
    "ENTRY_HEADER",
    "Kind",
    "entry",
    "entry_prefix_crc",
    "Journal",
    "prepare_journal",
    "install_journal",
    "write_journal",
    "remove_leftovers",
    "scan_entries",
    "recover_hint",
]

JOURNAL_NAME = "journal"
_MAGIC = b"segq\x00jnl"
_VERSION = 1
HEADER_SIZE = 128
DEFAULT_CAPACITY = 1 << 20

# The fixed part of the header, covered by a CRC-32.
_FIXED = struct.Struct("<8sIIQQ")  # magic, version, header size, generation, capacity
_FIXED_CRC = struct.Struct("<I")
# Mutable native words (offsets into the header).
END = 40  # end of the last committed entry: the commit point
SEALED = 48  # non-zero: a newer journal replaced this one
RETURNS = 56  # bumped when a record becomes claimable again: waiting claimers watch it (not durable)
SEALED_MARK = 0xFFFF_FFFF_FFFF_FFFF  # the END word of a journal a newer one replaced
WORD = struct.Struct("@Q")

ENTRY_HEADER = struct.Struct("<II")
_KIND_WORD = struct.Struct("<I")
_LENGTH_MASK = 0xFF_FFFF
_MAX_BODY = _LENGTH_MASK


class Kind:
    """Entry kinds (the ``kind`` byte of an entry header); bodies in docs/workqueue.md."""

    STATE = 1  # head, mark, next token, dead-letter total: starts every journal
    CLAIM = 2  # one claim (token, lease, owner) of one or more records
    ACK = 3  # records done by their claimer
    DEAD = 4  # records sent to the dead-letter queue
    RETURN = 5  # a claimed record given back (nack, lease run out, owner dead)
    RENEW = 6  # claims given a new lease
    WAITING = 7  # snapshot only: a given-back record
    DONE = 8  # snapshot only: records done above the mark
    HELD = 9  # snapshot only: a claim in flight (the body of a CLAIM)
    SKIP = 10  # records a claim went past (lower priority or not yet due), each with its priority and run_at
    PENDING = 11  # snapshot only: records below the head never claimed (the body of a SKIP)
    OUTBOX = 12  # an ack with follow-ups to deliver (segq._outbox)
    SENT = 13  # the follow-ups of the OUTBOX before it are all delivered
    OPEN_OUTBOX = 14  # snapshot only: an OUTBOX whose follow-ups may not all be delivered

    NAMES = {
        1: "STATE",
        2: "CLAIM",
        3: "ACK",
        4: "DEAD",
        5: "RETURN",
        6: "RENEW",
        7: "WAITING",
        8: "DONE",
        9: "HELD",
        10: "SKIP",
        11: "PENDING",
        12: "OUTBOX",
        13: "SENT",
        14: "OPEN_OUTBOX",
    }


def entry_prefix_crc(kind: int, length: int) -> tuple[bytes, int]:
    """Return the 4-byte kind/length word of an entry and the CRC-32 state after it."""
    word = _KIND_WORD.pack(kind << 24 | length)
    return word, zlib.crc32(word)


def entry(kind: int, body: bytes) -> bytes:
    """Return one framed entry."""
    if len(body) > _MAX_BODY:
        raise SegqError(f"journal entry of {len(body)} bytes is too large")
    word, state = entry_prefix_crc(kind, len(body))
    return word + _FIXED_CRC.pack(zlib.crc32(body, state)) + body


def _check_byte_order() -> None:
    if sys.byteorder != "little":
        raise UnsupportedFormat("segq work-queue journals need a little-endian host")


def _encode_header(generation: int, capacity: int, end: int) -> bytes:
    fixed = _FIXED.pack(_MAGIC, _VERSION, HEADER_SIZE, generation, capacity)
    header = bytearray(HEADER_SIZE)
    header[: _FIXED.size] = fixed
    _FIXED_CRC.pack_into(header, _FIXED.size, zlib.crc32(fixed))
    WORD.pack_into(header, END, end)
    return bytes(header)


def _decode_header(path: str, data: bytes) -> tuple[int, int]:
    """Return ``(generation, capacity)`` of a journal header, or raise naming ``path``."""
    if len(data) < HEADER_SIZE:
        raise CorruptionError(path, 0, f"journal is {len(data)} bytes, shorter than its header")
    magic, version, header_size, generation, capacity = _FIXED.unpack_from(data, 0)
    if magic != _MAGIC:
        raise CorruptionError(path, 0, "not a segq journal (bad magic number)", hint=recover_hint(path))
    (crc,) = _FIXED_CRC.unpack_from(data, _FIXED.size)
    if zlib.crc32(data[: _FIXED.size]) != crc:
        raise CorruptionError(path, 0, "journal header checksum mismatch", hint=recover_hint(path))
    if version != _VERSION or header_size != HEADER_SIZE:
        raise UnsupportedFormat(f"{path}: journal format {version}, this segq reads {_VERSION}")
    return generation, capacity


def recover_hint(path: str) -> str:
    """Return the command that repairs the group whose journal is at ``path``."""
    group_dir = os.path.dirname(path)
    queue_dir = os.path.dirname(os.path.dirname(group_dir)) or "."
    return f"run `segq recover {queue_dir} --group {os.path.basename(group_dir)}`"


def scan_entries(buffer: bytes | mmap.mmap, start: int, end: int, path: str) -> Iterator[tuple[int, bytes, int]]:
    """Yield ``(kind, body, offset)`` of each entry in ``[start, end)``; raise on a bad one."""
    offset = start
    unpack = ENTRY_HEADER.unpack_from
    crc32 = zlib.crc32
    while offset < end:
        if offset + 8 > end:
            raise CorruptionError(path, offset, "journal entry header cut short", hint=recover_hint(path))
        word, crc = unpack(buffer, offset)
        body_end = offset + 8 + (word & _LENGTH_MASK)
        if body_end > end:
            raise CorruptionError(path, offset, "journal entry runs past the journal's end", hint=recover_hint(path))
        body = buffer[offset + 8 : body_end]
        if crc32(body, crc32(buffer[offset : offset + 4])) != crc:
            raise CorruptionError(path, offset, "journal entry checksum mismatch", hint=recover_hint(path))
        yield word >> 24, body, offset
        offset = body_end


def prepare_journal(group_dir: StrPath, generation: int, body: bytes, *, capacity: int, durable: bool) -> str:
    """Write a complete journal holding the entries ``body`` under a temporary name; return that name.

    The file is preallocated to ``capacity`` bytes, so a full disk fails here
    and never later inside a mapped write.
    """
    _check_byte_order()
    final = os.path.join(group_dir, JOURNAL_NAME)
    capacity = max(capacity, HEADER_SIZE + len(body))

    def fill(fd: int) -> None:
        preallocate(fd, capacity)
        os.pwrite(fd, _encode_header(generation, capacity, HEADER_SIZE + len(body)) + body, 0)

    try:
        return write_temporary(final, fill, durable=durable)
    except OSError as error:
        raise os_error(error, "write journal", final) from None


def install_journal(group_dir: StrPath, temporary: str, *, durable: bool) -> None:
    """Rename a prepared journal to its final name (atomically replacing the old one)."""
    final = os.path.join(group_dir, JOURNAL_NAME)
    try:
        replace_into_place(temporary, final, durable=durable)
    except OSError as error:
        raise os_error(error, "install journal", final) from None


def write_journal(group_dir: StrPath, generation: int, body: bytes, *, capacity: int, durable: bool) -> None:
    """Write a complete journal holding the entries ``body`` and give it its final name."""
    install_journal(
        group_dir, prepare_journal(group_dir, generation, body, capacity=capacity, durable=durable), durable=durable
    )


def remove_leftovers(group_dir: StrPath) -> list[str]:
    """Remove temporary journals left by interrupted compactions; return their paths."""
    removed = []
    try:
        names = os.listdir(group_dir)
    except FileNotFoundError:
        return []
    for name in names:
        if name.startswith(JOURNAL_NAME + ".") and name.endswith(".tmp"):
            path = os.path.join(group_dir, name)
            if _remove_quietly(path):
                removed.append(path)
    return removed


def _remove_quietly(path: str) -> bool:
    try:
        os.unlink(path)
        return True
    except OSError:
        return False  # already gone (another process cleaned up), or not ours to remove


class Journal:
    """One journal file, open and memory-mapped read-write.

    Call only with the group lock held, except for reading the cache words.
    """

    def __init__(self, group_dir: StrPath) -> None:
        _check_byte_order()
        self.path = os.path.join(group_dir, JOURNAL_NAME)
        try:
            self.fd = open_file(self.path, os.O_RDWR, create=False)
        except FileNotFoundError:
            raise
        except OSError as error:
            raise os_error(error, "open journal", self.path) from None
        try:
            stat = os.fstat(self.fd)
            self.inode = (stat.st_dev, stat.st_ino)
            self.generation, self.capacity = _decode_header(self.path, os.pread(self.fd, HEADER_SIZE, 0))
            if stat.st_size < self.capacity:
                raise CorruptionError(
                    self.path, stat.st_size, f"journal is {stat.st_size} bytes, its header says {self.capacity}"
                )
            self.map = mmap.mmap(self.fd, self.capacity)
        except BaseException:
            os.close(self.fd)
            raise
        end = self.end if not self.sealed else self.word(SEALED)
        if not HEADER_SIZE <= end <= self.capacity:
            self.close()
            raise CorruptionError(
                self.path, END, f"journal end word {end} is outside the file", hint=recover_hint(self.path)
            )

    @property
    def end(self) -> int:
        """The offset just past the last committed entry."""
        value: int = WORD.unpack_from(self.map, END)[0]
        return value

    def word(self, offset: int) -> int:
        value: int = WORD.unpack_from(self.map, offset)[0]
        return value

    def store(self, offset: int, value: int) -> None:
        WORD.pack_into(self.map, offset, value)

    def entries(self, start: int = HEADER_SIZE, end: int | None = None) -> Iterator[tuple[int, bytes, int]]:
        """Yield ``(kind, body, offset)`` of the committed entries from ``start``."""
        return scan_entries(self.map, start, self.end if end is None else end, self.path)

    def append(self, data: bytes) -> bool:
        """Append framed entries and commit them; False (nothing written) if they do not fit."""
        start = WORD.unpack_from(self.map, END)[0]
        stop = start + len(data)
        if stop > self.capacity:
            return False
        self.map[start:stop] = data
        WORD.pack_into(self.map, END, stop)
        return True

    @property
    def sealed(self) -> bool:
        """Tell whether a compaction replaced this journal (or was interrupted doing so)."""
        return self.end == SEALED_MARK

    def seal(self) -> None:
        """Mark this journal replaced; its true end is kept in the SEALED word for ``unseal``."""
        WORD.pack_into(self.map, SEALED, self.end)
        WORD.pack_into(self.map, END, SEALED_MARK)

    def unseal(self) -> None:
        """Clear the seal of a journal whose compactor died before renaming its successor in."""
        WORD.pack_into(self.map, END, WORD.unpack_from(self.map, SEALED)[0])
        WORD.pack_into(self.map, SEALED, 0)

    def is_current(self) -> bool:
        """Tell whether the file at the journal's name is still this one."""
        try:
            stat = os.stat(self.path)
        except FileNotFoundError:
            return False
        return (stat.st_dev, stat.st_ino) == self.inode

    def sync(self) -> None:
        """Make the committed entries survive power loss."""
        self.map.flush()

    def close(self) -> None:
        """Unmap and close; safe to call twice."""
        mapping = getattr(self, "map", None)
        if mapping is not None and not mapping.closed:
            mapping.close()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
