"""Record framing: round trips, every prefix incomplete, every flipped bit caught."""

from __future__ import annotations

import zlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from segq import _format
from segq._format import HEADER_SIZE, RecordStatus, decode_record, encode_batch, encode_record

payloads = st.binary(max_size=300)


@given(payloads)
def test_a_record_round_trips(payload: bytes) -> None:
    framed = encode_record(payload)
    record = decode_record(framed, 0, len(framed))
    assert record.status is RecordStatus.OK
    assert framed[record.start : record.end] == payload
    assert record.end == len(framed)
    assert not record.continues


@given(payloads)
def test_every_proper_prefix_is_incomplete(payload: bytes) -> None:
    framed = encode_record(payload)
    for cut in range(len(framed)):
        assert decode_record(framed, 0, cut).status is RecordStatus.INCOMPLETE


@given(payloads, st.data())
def test_a_flipped_bit_is_caught(payload: bytes, data: st.DataObject) -> None:
    framed = bytearray(encode_record(payload))
    bit = data.draw(st.integers(0, len(framed) * 8 - 1))
    framed[bit // 8] ^= 1 << (bit % 8)
    # A flip in the length field may make the record claim more bytes than
    # exist (incomplete); anything else must fail the checksum.
    status = decode_record(bytes(framed), 0, len(framed)).status
    assert status in (RecordStatus.CORRUPT, RecordStatus.INCOMPLETE)


@given(st.lists(payloads, min_size=1, max_size=20))
def test_a_batch_is_a_run_of_continuing_records(batch: list[bytes]) -> None:
    framed = encode_batch(batch)
    offset, seen = 0, []
    for index, payload in enumerate(batch):
        record = decode_record(framed, offset, len(framed))
        assert record.status is RecordStatus.OK
        assert record.continues == (index < len(batch) - 1)
        seen.append(framed[record.start : record.end])
        offset = record.end
    assert seen == batch and offset == len(framed)


@given(payloads, st.binary(max_size=50))
def test_trailing_bytes_are_not_read(payload: bytes, trailing: bytes) -> None:
    framed = encode_record(payload)
    record = decode_record(framed + trailing, 0, len(framed) + len(trailing))
    assert record.status is RecordStatus.OK and record.end == len(framed)


def test_zeros_are_empty_and_an_empty_record_is_not_zeros() -> None:
    assert decode_record(bytes(64), 0, 64).status is RecordStatus.EMPTY
    assert encode_record(b"") != bytes(HEADER_SIZE)
    assert decode_record(encode_record(b""), 0, HEADER_SIZE).status is RecordStatus.OK


def test_the_end_marker_decodes_as_end() -> None:
    assert decode_record(_format.END_MARKER, 0, HEADER_SIZE).status is RecordStatus.END


def test_the_checksum_covers_the_length_then_the_payload() -> None:
    # The spec in docs/format.md, restated independently of the encoder.
    payload = b"hello"
    length = len(payload).to_bytes(4, "little")
    framed = encode_record(payload)
    assert framed[4:8] == zlib.crc32(length + payload).to_bytes(4, "little")
    big = bytes(5000)
    assert _format.record_crc(len(big), big) == zlib.crc32(len(big).to_bytes(4, "little") + big)


def test_segment_headers_round_trip_and_refuse_strangers() -> None:
    header = _format.encode_segment_header(42)
    assert _format.decode_segment_header(header) == 42
    with pytest.raises(_format.SegmentHeaderError, match="magic"):
        _format.decode_segment_header(b"x" * len(header))
    future = bytearray(header)
    future[8] = 99
    with pytest.raises(_format.SegmentHeaderError) as caught:
        _format.decode_segment_header(bytes(future))
    assert caught.value.unsupported
    damaged = bytearray(header)
    damaged[17] ^= 1
    with pytest.raises(_format.SegmentHeaderError, match="checksum"):
        _format.decode_segment_header(bytes(damaged))


@settings(max_examples=50)
@given(st.binary(min_size=0, max_size=64), st.integers(0, 64))
def test_decoding_garbage_never_raises(garbage: bytes, offset: int) -> None:
    decode_record(garbage, min(offset, len(garbage)), len(garbage))
