"""Record headers: the header block in front of a record's data, bytes in, bytes out.

The layout is specified in ``docs/format.md`` ("Record headers").  A record
with headers stores its CRC-32 complemented (see ``_format``); its body is
the header block followed by the data::

    u32 le  block size B (the bytes of the entries that follow)
    B bytes entries, back to back:
              u16 le key length K, K bytes key (UTF-8, non-empty, no NUL)
              u32 le value length V, V bytes value

A body with headers travels between the framing code and the consumers as a
:class:`Framed` (a ``bytes`` subclass holding the whole body), so record
lengths and positions work unchanged; plain records stay plain ``bytes`` and
never pay for a type they do not need.
"""

from __future__ import annotations

import importlib
import os
import struct
from typing import Any, Callable, Mapping, Union

from .errors import CorruptionError, InvalidArgument

__all__ = ["Framed", "HeaderValue", "RESERVED_PREFIX", "encode_headers", "frame_body", "split_body"]

HeaderValue = Union[bytes, bytearray, memoryview, str]
RESERVED_PREFIX = "segq-"

_BLOCK = struct.Struct("<I")
_KEY = struct.Struct("<H")
_VALUE = struct.Struct("<I")


class Framed(bytes):
    """The body of a record with headers: its header block, then its data."""

    __slots__ = ()


def encode_headers(headers: Mapping[str, HeaderValue], *, allow_reserved: bool = False) -> bytes:
    """Return the header block of ``headers``; raise ``SegqError`` for a bad key or value.

    Names starting with ``segq-`` are reserved for segq itself: refused unless
    ``allow_reserved`` (segq's own code, e.g. job options).
    """
    if _c_encode_headers is not None:
        block = _c_encode_headers(headers, allow_reserved)
        if block is not None:
            return block
    return _encode_headers(headers, allow_reserved)


def _encode_headers(headers: Mapping[str, HeaderValue], allow_reserved: bool) -> bytes:
    # The Python twin: also the one that explains what is wrong with bad input.
    if not isinstance(headers, Mapping):
        raise InvalidArgument(f"headers must be a dict of str to bytes, not {type(headers).__name__}")
    parts: list[bytes] = []
    for key, value in headers.items():
        if not isinstance(key, str) or not key:
            raise InvalidArgument(f"header name {key!r} is not a non-empty str")
        if "\x00" in key:
            raise InvalidArgument(f"header name {key!r} contains a NUL character")
        if key.startswith(RESERVED_PREFIX) and not allow_reserved:
            raise InvalidArgument(f"header name {key!r} is reserved: names starting with {RESERVED_PREFIX!r} are segq's own")
        try:
            name = key.encode("utf-8")
        except UnicodeEncodeError:
            raise InvalidArgument(f"header name {key!r} is not encodable as UTF-8 (a lone surrogate?)") from None
        if len(name) > 0xFFFF:
            raise InvalidArgument(f"header name of {len(name)} bytes is over the 65535-byte limit")
        if isinstance(value, str):
            try:
                raw = value.encode("utf-8")
            except UnicodeEncodeError:
                raise InvalidArgument(f"header {key!r}: value is not encodable as UTF-8 (a lone surrogate?)") from None
        elif isinstance(value, (bytes, bytearray, memoryview)):
            raw = bytes(value)
        else:
            raise InvalidArgument(f"header {key!r}: value must be bytes or str, not {type(value).__name__}")
        parts += (_KEY.pack(len(name)), name, _VALUE.pack(len(raw)), raw)
    entries = b"".join(parts)
    return _BLOCK.pack(len(entries)) + entries


def frame_body(data: bytes, headers: Mapping[str, HeaderValue], *, allow_reserved: bool = False) -> Framed:
    """Return the body of a record with ``headers``: header block then ``data``."""
    return Framed(encode_headers(headers, allow_reserved=allow_reserved) + data)


def split_body(body: bytes, queue_dir: str = "", word: int = 0) -> tuple[bytes, dict[str, bytes]]:
    """Return the data and the headers of a record body with headers.

    A block that does not parse passed its checksum, so it was written that
    way: a ``CorruptionError`` naming the segment of queue ``queue_dir`` and
    the offset of the record (``word`` is its position as a word, ``Position.word``).
    """
    if _c_split_body is not None:
        split = _c_split_body(body)
        if split is not None:
            return split  # type: ignore[no-any-return]
    return _split_body(body, queue_dir, word)


def _split_body(body: bytes, queue_dir: str = "", word: int = 0) -> tuple[bytes, dict[str, bytes]]:
    # The Python twin: also the one that explains a block that does not parse.
    try:
        (size,) = _BLOCK.unpack_from(body, 0)
        end = _BLOCK.size + size
        if end > len(body):
            raise ValueError(f"header block of {size} bytes runs past the {len(body)}-byte record")
        headers: dict[str, bytes] = {}
        at = _BLOCK.size
        while at < end:
            (key_size,) = _KEY.unpack_from(body, at)
            at += _KEY.size
            key = body[at : at + key_size].decode("utf-8")
            at += key_size
            (value_size,) = _VALUE.unpack_from(body, at)
            at += _VALUE.size
            if not key or "\x00" in key or key in headers or at + value_size > end:
                raise ValueError(f"bad header entry {key!r}")
            headers[key] = body[at : at + value_size]
            at += value_size
        if at != end:
            raise ValueError("header entries overrun their block")
    except (struct.error, UnicodeDecodeError, ValueError) as error:
        # Only on damage: _segment and _state import the framing that imports this.
        from ._segment import segment_path
        from ._state import Position

        where = Position.from_word(word)
        raise CorruptionError(
            segment_path(queue_dir, where.segment), where.offset, f"record header block does not parse ({error})"
        ) from None
    return bytes(body[end:]), headers


# C versions of the two functions above, for the common case (see _speedups.c);
# SEGQ_PURE_PYTHON=1 leaves them out, as it does the record framing's.
_c_encode_headers: Callable[[Any, bool], bytes | None] | None = None
_c_split_body: Callable[[bytes], Any] | None = None
if not os.environ.get("SEGQ_PURE_PYTHON"):
    try:
        _speedups = importlib.import_module(f"{__package__}._speedups")
        _c_encode_headers = _speedups.encode_headers
        _c_split_body = _speedups.split_body
    except (ImportError, AttributeError):
        pass  # not built, or built before headers: the Python twins do it
