"""Record framing: round trips, every prefix incomplete, every flipped bit caught."""

from __future__ import annotations

import zlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import segq
from segq import _format
from segq._format import HEADER_SIZE, RecordStatus, decode_record, encode_batch, encode_record
from segq._headers import Framed, frame_body, split_body
from segq.errors import SegqError

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


# -- records with headers ----------------------------------------------------

header_sets = st.dictionaries(
    st.text(st.characters(blacklist_characters="\x00", blacklist_categories=("Cs",)), min_size=1, max_size=12).filter(
        lambda name: not name.startswith("segq-")
    ),
    st.binary(max_size=40),
    min_size=1,
    max_size=5,
)


@given(payloads, header_sets)
def test_a_record_with_headers_round_trips(payload: bytes, headers: dict[str, bytes]) -> None:
    framed = encode_record(frame_body(payload, headers))
    record = decode_record(framed, 0, len(framed))
    assert record.status is RecordStatus.OK and record.headed and record.end == len(framed)
    assert split_body(framed[record.start : record.end]) == (payload, headers)


@given(payloads, header_sets)
def test_every_proper_prefix_of_a_record_with_headers_is_incomplete(payload: bytes, headers: dict[str, bytes]) -> None:
    framed = encode_record(frame_body(payload, headers))
    for cut in range(len(framed)):
        assert decode_record(framed, 0, cut).status is RecordStatus.INCOMPLETE


@given(payloads, header_sets, st.data())
def test_a_flipped_bit_in_a_record_with_headers_is_caught(
    payload: bytes, headers: dict[str, bytes], data: st.DataObject
) -> None:
    framed = bytearray(encode_record(frame_body(payload, headers)))
    bit = data.draw(st.integers(0, len(framed) * 8 - 1))
    framed[bit // 8] ^= 1 << (bit % 8)
    status = decode_record(bytes(framed), 0, len(framed)).status
    assert status in (RecordStatus.CORRUPT, RecordStatus.INCOMPLETE)


@given(payloads)
def test_a_record_without_headers_is_not_one_byte_longer(payload: bytes) -> None:
    length_word = len(payload).to_bytes(4, "little")
    crc = zlib.crc32(payload, zlib.crc32(length_word)).to_bytes(4, "little")
    assert encode_record(payload) == length_word + crc + payload
    assert len(encode_record(payload)) == HEADER_SIZE + len(payload)
    assert not decode_record(encode_record(payload), 0, HEADER_SIZE + len(payload)).headed


def test_headers_have_str_names_and_bytes_or_str_values() -> None:
    assert split_body(frame_body(b"d", {"a": "é", "b": b"\x00\xff"})) == (b"d", {"a": "é".encode(), "b": b"\x00\xff"})
    for bad in ({"": b"v"}, {"a\x00b": b"v"}, {1: b"v"}, {"k": 5}, {"segq-x": b"v"}, {"\ud800": b"v"}):
        with pytest.raises(SegqError):
            frame_body(b"d", bad)  # type: ignore[arg-type]
    assert split_body(frame_body(b"d", {"segq-x": b"v"}, allow_reserved=True)) == (b"d", {"segq-x": b"v"})


def test_a_header_block_that_does_not_parse_is_corruption() -> None:
    body = frame_body(b"data", {"k": b"v"})
    with pytest.raises(segq.CorruptionError, match="header block"):
        split_body(Framed(body[:6]), "/q", 7 << 32 | 100)
