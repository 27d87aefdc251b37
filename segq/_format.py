"""Record framing and checksums: bytes in, bytes out, no I/O.

The byte layout is specified in ``docs/format.md``; this module is its only
encoder and decoder.  A record is an 8-byte header followed by its payload::

    u32 le  length | flags      (bit 31: "the batch continues in the next record")
    u32 le  CRC-32 of the 4 length bytes followed by the payload
    ...     payload

A record with headers (see ``_headers``) stores the complement of that CRC-32
and its payload is the header block followed by the data; it travels as a
``Framed`` body.  A length word of ``0xFFFFFFFF`` is the end-of-segment marker.  Because
segment files are preallocated with zeros and the CRC-32 of four zero bytes is
not zero, an all-zero header never decodes as a record: it means "nothing
written here yet".
"""

from __future__ import annotations

import enum
import importlib
import mmap
import os
import struct
import zlib
from typing import Any, Callable, NamedTuple, Union

from ._headers import Framed

__all__ = [
    "FORMAT_VERSION",
    "Buffer",
    "RECORD_HEADER",
    "LENGTH_CRC",
    "HEADER_SIZE",
    "CONTINUES",
    "HEADED_CRC",
    "READ_VERSIONS",
    "LENGTH_MASK",
    "END_OF_SEGMENT",
    "END_MARKER",
    "SEGMENT_HEADER_SIZE",
    "RecordStatus",
    "Record",
    "record_crc",
    "as_payload",
    "encode_record",
    "encode_batch",
    "decode_record",
    "encode_segment_header",
    "decode_segment_header",
    "SegmentHeaderError",
    "frame_into",
    "read_record",
    "decode_run",
    "frame_batch",
    "SPEEDUPS",
]

FORMAT_VERSION = 2
READ_VERSIONS = (1, 2)  # version 1 is version 2 without records with headers

Buffer = Union[bytes, bytearray, memoryview, mmap.mmap]

RECORD_HEADER = struct.Struct("<II")
HEADER_SIZE = RECORD_HEADER.size
CONTINUES = 0x8000_0000
LENGTH_MASK = 0x7FFF_FFFF
END_OF_SEGMENT = 0xFFFF_FFFF
HEADED_CRC = 0xFFFF_FFFF  # XORed into the CRC-32 of a record with headers

_LENGTH = struct.Struct("<I")
# CRC-32 state after the four length bytes, precomputed for the common small
# lengths so the hot path costs one zlib call per record.
LENGTH_CRC = [zlib.crc32(_LENGTH.pack(n)) for n in range(4096)]


def record_crc(length_word: int, payload: Buffer) -> int:
    """Return the CRC-32 of ``length_word`` (4 bytes, little-endian) followed by ``payload``."""
    if length_word < 4096:
        return zlib.crc32(payload, LENGTH_CRC[length_word])
    return zlib.crc32(payload, zlib.crc32(_LENGTH.pack(length_word)))


END_MARKER = RECORD_HEADER.pack(END_OF_SEGMENT, zlib.crc32(_LENGTH.pack(END_OF_SEGMENT)))


def as_payload(data: object) -> bytes:
    """Return a bytes-like ``data`` as bytes; refuse ``str`` and non-buffers with a clear TypeError."""
    if isinstance(data, str):
        raise TypeError("segq records are bytes, not str: encode the text first (e.g. text.encode())")
    try:
        return bytes(memoryview(data))  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(f"segq records are bytes-like objects, not {type(data).__name__}") from None


def encode_record(payload: bytes, *, continues: bool = False) -> bytes:
    """Return the framed bytes of one record (header and payload); a ``Framed`` payload has headers."""
    length_word = len(payload) | (CONTINUES if continues else 0)
    crc = record_crc(length_word, payload)
    if type(payload) is Framed:
        crc ^= HEADED_CRC
    return RECORD_HEADER.pack(length_word, crc) + payload


def encode_batch(payloads: list[bytes]) -> bytes:
    """Return one contiguous frame sequence; every record but the last is marked ``CONTINUES``."""
    pack = RECORD_HEADER.pack
    crc32 = zlib.crc32
    length_crc = LENGTH_CRC
    parts: list[bytes] = []
    append = parts.append
    last = len(payloads) - 1
    for index, payload in enumerate(payloads):
        length_word = len(payload) if index == last else len(payload) | CONTINUES
        if length_word < 4096:
            crc = crc32(payload, length_crc[length_word])
        else:
            crc = record_crc(length_word, payload)
        if type(payload) is not bytes:  # a Framed body: a record with headers
            crc ^= HEADED_CRC
        append(pack(length_word, crc))
        append(payload)
    return b"".join(parts)


class RecordStatus(enum.Enum):
    """What :func:`decode_record` found at an offset."""

    OK = "ok"
    END = "end of segment"
    EMPTY = "nothing written yet"
    INCOMPLETE = "record runs past the end of the data"
    CORRUPT = "checksum mismatch"


class Record(NamedTuple):
    """One decoded frame: its status, payload bounds and flags."""

    status: RecordStatus
    start: int  # offset of the payload
    end: int  # offset just past the payload (the next header)
    continues: bool
    headed: bool = False  # the payload is a header block, then the data

    @property
    def length(self) -> int:
        return self.end - self.start


_ZERO_HEADER = bytes(HEADER_SIZE)


def decode_record(buffer: Buffer, offset: int, limit: int) -> Record:
    """Decode the frame at ``offset``; bytes at ``limit`` and beyond are not looked at.

    A header or payload cut by ``limit`` is ``INCOMPLETE``; a CRC mismatch is
    ``CORRUPT``; an all-zero header is ``EMPTY``.  Never raises for any input.
    """
    payload_start = offset + HEADER_SIZE
    if payload_start > limit:
        return Record(RecordStatus.INCOMPLETE, payload_start, payload_start, False)
    length_word, crc = RECORD_HEADER.unpack_from(buffer, offset)
    if length_word == END_OF_SEGMENT:
        status = RecordStatus.END if crc == _END_CRC else RecordStatus.CORRUPT
        return Record(status, payload_start, payload_start, False)
    if length_word == 0 and crc == 0:
        return Record(RecordStatus.EMPTY, payload_start, payload_start, False)
    end = payload_start + (length_word & LENGTH_MASK)
    continues = bool(length_word & CONTINUES)
    if end > limit:
        return Record(RecordStatus.INCOMPLETE, payload_start, end, continues)
    computed = record_crc(length_word, memoryview(buffer)[payload_start:end])
    if computed == crc:
        return Record(RecordStatus.OK, payload_start, end, continues)
    if computed ^ HEADED_CRC == crc:
        return Record(RecordStatus.OK, payload_start, end, continues, True)
    return Record(RecordStatus.CORRUPT, payload_start, end, continues)


_END_CRC = RECORD_HEADER.unpack(END_MARKER)[1]

# Segment header: magic, format version, header size, segment number, CRC-32
# of the preceding 24 bytes, 4 reserved zero bytes.  Records start right after.
SEGMENT_MAGIC = b"segq\x00seg"
_SEGMENT_HEADER = struct.Struct("<8sIIQII")
SEGMENT_HEADER_SIZE = _SEGMENT_HEADER.size


class SegmentHeaderError(ValueError):
    """The segment header is not one this version reads; the message says why.

    ``unsupported`` is true when the header is intact but of another format
    version (a newer segq wrote it), false when it is damaged.
    """

    def __init__(self, message: str, *, unsupported: bool = False) -> None:
        super().__init__(message)
        self.unsupported = unsupported


def encode_segment_header(number: int, version: int = FORMAT_VERSION) -> bytes:
    """Return the header bytes of segment ``number`` (in format ``version``)."""
    body = _SEGMENT_HEADER.pack(SEGMENT_MAGIC, version, SEGMENT_HEADER_SIZE, number, 0, 0)[:24]
    return _SEGMENT_HEADER.pack(SEGMENT_MAGIC, version, SEGMENT_HEADER_SIZE, number, zlib.crc32(body), 0)


def decode_segment_header(data: Buffer) -> int:
    """Return the segment number stored in a header, or raise :class:`SegmentHeaderError`."""
    if len(data) < SEGMENT_HEADER_SIZE:
        raise SegmentHeaderError(f"file is {len(data)} bytes, shorter than the {SEGMENT_HEADER_SIZE}-byte header")
    magic, version, header_size, number, crc, _ = _SEGMENT_HEADER.unpack_from(data, 0)
    if magic != SEGMENT_MAGIC:
        raise SegmentHeaderError(f"bad magic {bytes(magic)!r}, not a segq segment")
    if version not in READ_VERSIONS:
        raise SegmentHeaderError(
            f"format version {version}, this segq reads versions {READ_VERSIONS[0]} to {READ_VERSIONS[-1]}",
            unsupported=True,
        )
    if zlib.crc32(bytes(data[:24])) != crc or header_size != SEGMENT_HEADER_SIZE:
        raise SegmentHeaderError("header checksum mismatch")
    return int(number)


# -- hot-path primitives ---------------------------------------------------
#
# ``frame_into``, ``read_record``, ``decode_run`` and ``encode_batch`` come in
# two versions with the same behaviour: the pure-Python ones below, and C ones
# in the optional ``_speedups`` extension (three interpreter operations become
# one call).  SEGQ_PURE_PYTHON=1 in the environment forces the Python ones.


def _frame_into(target: Buffer, offset: int, payload: bytes) -> int:
    """Write ``payload`` at ``offset + 8`` and then its header at ``offset``; return the end offset."""
    size = len(payload)
    end = offset + HEADER_SIZE + size
    target[offset + HEADER_SIZE : end] = payload  # type: ignore[index]
    crc = record_crc(size, payload)
    if type(payload) is Framed:
        crc ^= HEADED_CRC
    RECORD_HEADER.pack_into(target, offset, size, crc)
    return end


def _read_record(buffer: bytes, offset: int) -> bytes | None:
    """Return the payload of the intact record at ``offset``, or None (short, damaged, end marker).

    The payload of a record with headers comes back as a ``Framed``.
    """
    if offset < 0 or offset + HEADER_SIZE > len(buffer):
        return None
    length_word, crc = RECORD_HEADER.unpack_from(buffer, offset)
    end = offset + HEADER_SIZE + (length_word & LENGTH_MASK)
    if length_word == END_OF_SEGMENT or end > len(buffer):
        return None
    payload = buffer[offset + HEADER_SIZE : end]
    computed = record_crc(length_word, payload)
    if computed == crc:
        return payload
    if computed ^ HEADED_CRC == crc:
        return Framed(payload)
    return None


def _decode_run(buffer: bytes, offset: int, max_count: int) -> tuple[list[bytes], int]:
    """Return up to ``max_count`` payloads of intact records from ``offset``, and the offset after them."""
    payloads: list[bytes] = []
    while len(payloads) < max_count:
        payload = _read_record(buffer, offset)
        if payload is None:
            break
        payloads.append(payload)
        offset += HEADER_SIZE + len(payload)
    return payloads, offset


def _frame_batch(records: list[object], limit: int) -> bytes | int | None:
    """Validate and frame ``records`` in one pass, as ``encode_batch`` frames them.

    Returns the framed bytes; or, framing nothing, the size of the first
    record over ``limit`` (an int); or None if an item is not exactly bytes
    (the caller converts the items and calls again).
    """
    limit = min(limit, LENGTH_MASK)
    payloads: list[bytes] = []
    for record in records:
        if type(record) is not bytes:
            return None
        payloads.append(record)
    for payload in payloads:
        if len(payload) > limit:
            return len(payload)
    return _python_encode_batch(payloads)


_python_encode_batch = encode_batch
frame_batch: Callable[[list[object], int], "bytes | int | None"] = _frame_batch
frame_into: Callable[[Buffer, int, bytes], int] = _frame_into
read_record: Callable[[bytes, int], bytes | None] = _read_record
appender_class: Any = None  # _speedups.Appender: the whole append of a small record (Sender.send)
decode_run: Callable[[bytes, int, int], tuple[list[bytes], int]] = _decode_run
SPEEDUPS = False
if not os.environ.get("SEGQ_PURE_PYTHON"):
    try:
        _speedups = importlib.import_module(f"{__package__}._speedups")
    except ImportError:
        pass
    else:
        _speedups.set_framed_type(Framed)
        frame_into = _speedups.frame_into
        read_record = _speedups.read_record
        decode_run = _speedups.decode_run
        encode_batch = _speedups.encode_batch  # noqa: F811 (the C twin of the function above)
        frame_batch = _speedups.frame_batch
        appender_class = getattr(_speedups, "Appender", None)  # POSIX only: it takes a sem_t*
        SPEEDUPS = True
