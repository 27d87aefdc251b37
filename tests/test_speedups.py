"""The optional C speedups behave exactly like their pure-Python twins."""

from __future__ import annotations

import os
import subprocess
import sys
import zlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from segq import _format, _messages
from segq._headers import frame_body

speedups = pytest.importorskip("segq._speedups")
if os.environ.get("SEGQ_PURE_PYTHON"):
    # segq then never wires the C module up (set_framed_type), so C and Python cannot be compared.
    pytest.skip("SEGQ_PURE_PYTHON=1: segq does not load its C speedups", allow_module_level=True)

payloads = st.binary(max_size=300)
# A record body: plain bytes, or a Framed body (a record with headers).
bodies = st.one_of(
    payloads,
    st.builds(
        frame_body,
        payloads,
        st.dictionaries(st.sampled_from(["trace-id", "k", "é", "content-type"]), st.binary(max_size=20), min_size=1),
    ),
)


def typed(payloads: list[bytes]) -> list[tuple[type, bytes]]:
    """Compare bodies with their types: a Framed equals the bytes it holds."""
    return [(type(payload), payload) for payload in payloads]


@given(st.binary(max_size=2000), st.integers(0, 2**32 - 1))
def test_crc32_matches_zlib(data: bytes, value: int) -> None:
    assert speedups.crc32(data, value) == zlib.crc32(data, value)


@given(st.lists(bodies, max_size=30))
def test_encode_batch_matches_python(batch: list[bytes]) -> None:
    assert speedups.encode_batch(batch) == _format._python_encode_batch(batch)


@given(st.lists(st.one_of(payloads, payloads.map(bytearray)), max_size=30), st.integers(-1, 320))
def test_frame_batch_matches_python(batch: list[object], limit: int) -> None:
    assert speedups.frame_batch(batch, limit) == _format._frame_batch(batch, limit)


def test_frame_batch_frames_checks_sizes_and_leaves_other_types_to_the_caller() -> None:
    assert speedups.frame_batch([b"a", b"bc"], 2) == _format._python_encode_batch([b"a", b"bc"])
    assert speedups.frame_batch([b"a", b"bcd", b"efgh"], 2) == 3
    assert speedups.frame_batch([b"a", memoryview(b"b")], 10) is None
    assert speedups.frame_batch([], 10) == b""
    with pytest.raises(TypeError):
        speedups.frame_batch((b"a",), 10)


@given(bodies, st.integers(0, 40))
def test_frame_into_matches_python(payload: bytes, offset: int) -> None:
    size = offset + len(payload) + 8 + 5
    c_target, py_target = bytearray(size), bytearray(size)
    assert speedups.frame_into(c_target, offset, payload) == _format._frame_into(py_target, offset, payload)
    assert c_target == py_target


def test_frame_into_refuses_what_does_not_fit() -> None:
    with pytest.raises(ValueError):
        speedups.frame_into(bytearray(10), 0, b"abc")
    with pytest.raises(ValueError):
        speedups.frame_into(bytearray(100), -1, b"abc")


@given(st.binary(max_size=200), st.integers(-5, 210), st.integers(0, 10))
def test_decoding_any_bytes_matches_python(buffer: bytes, offset: int, count: int) -> None:
    c_record, py_record = speedups.read_record(buffer, offset), _format._read_record(buffer, offset)
    assert (type(c_record), c_record) == (type(py_record), py_record)
    c_run, py_run = speedups.decode_run(buffer, offset, count), _format._decode_run(buffer, offset, count)
    assert (typed(c_run[0]), c_run[1]) == (typed(py_run[0]), py_run[1])


@given(st.lists(bodies, min_size=1, max_size=10), st.data())
def test_decoding_framed_records_matches_python(batch: list[bytes], data: st.DataObject) -> None:
    framed = _format._python_encode_batch(batch)
    cut = data.draw(st.integers(0, len(framed)))
    damaged = bytearray(framed[:cut])
    if damaged and data.draw(st.booleans()):
        damaged[data.draw(st.integers(0, len(damaged) - 1))] ^= 0x40
    buffer = bytes(damaged)
    c_run, py_run = speedups.decode_run(buffer, 0, 100), _format._decode_run(buffer, 0, 100)
    assert (typed(c_run[0]), c_run[1]) == (typed(py_run[0]), py_run[1])
    if cut == len(framed) and buffer == framed:
        assert typed(c_run[0]) == typed(batch) and c_run[1] == len(framed)


class _CMessage(speedups.MessageFields):
    __slots__ = ()


class _PyMessage(_messages._PyMessageFields):
    __slots__ = ()


def fields(messages: list) -> list[tuple[type, bytes, object, int, int]]:
    return [(type(m.data), m.data, m._receiver, m._start, m._end) for m in messages]


@given(st.lists(bodies, min_size=1, max_size=10), st.data())
def test_decoding_messages_matches_python(batch: list[bytes], data: st.DataObject) -> None:
    framed = _format._python_encode_batch(batch)
    cut = data.draw(st.integers(0, len(framed)))
    damaged = bytearray(framed[:cut])
    if damaged and data.draw(st.booleans()):
        damaged[data.draw(st.integers(0, len(damaged) - 1))] ^= 0x40
    buffer, count = bytes(damaged), data.draw(st.integers(0, 12))
    base = data.draw(st.sampled_from([0, 5 << 32 | 4096]))
    owner = object()
    c_found = speedups.decode_messages(buffer, 0, count, _CMessage, owner, base)
    py_found = _messages._decode_messages(buffer, 0, count, _PyMessage, owner, base)
    assert (fields(c_found[0]), c_found[1:]) == (fields(py_found[0]), py_found[1:])
    assert all(type(m) is _CMessage for m in c_found[0])
    assert c_found[2] == sum(type(m.data) is not bytes for m in c_found[0])


def test_a_c_message_has_its_fields_and_no_headers_until_set() -> None:
    owner = object()
    message = speedups.new_message(_CMessage, owner, b"abc", 1 << 32 | 64, 1 << 32 | 75)
    assert (message.data, message._receiver, message._start, message._end) == (b"abc", owner, 1 << 32 | 64, 1 << 32 | 75)
    with pytest.raises(AttributeError):
        message._headers
    message._headers = {"k": b"v"}
    assert message._headers == {"k": b"v"}
    with pytest.raises(TypeError):
        speedups.new_message(object, owner, b"abc", 0, 11)


@given(st.integers(0, 2**64 - 1), st.integers(0, 2**64 - 1), st.integers(0, 2**32 - 1), st.booleans())
def test_write_slot_matches_python(sequence: int, segment: int, offset: int, second: bool) -> None:
    import tempfile

    from segq import _state

    with tempfile.TemporaryDirectory() as directory:
        path = os.path.join(directory, "c.pos")
        cursor = _state.CursorFile(path, initial=_state.Position(0, 64))
        try:
            base = 512 if second else 0
            before = bytes(cursor.map)
            speedups.write_slot(cursor.map, base, sequence, segment, offset)
            c_bytes = bytes(cursor.map)
            cursor.map[:] = before
            cursor._write_slot_words(base, sequence, segment, offset)
            assert c_bytes == bytes(cursor.map)
        finally:
            cursor.close()
    with pytest.raises(ValueError):
        speedups.write_slot(bytearray(100), 80, 1, 2, 3)


def test_the_core_suite_passes_in_pure_python() -> None:
    """Run the core tests again without the extension: the fallback must pass them too."""
    here = os.path.dirname(__file__)
    env = dict(os.environ, SEGQ_PURE_PYTHON="1")
    tests = ["test_format.py", "test_queue.py", "test_statemachine.py", "test_golden.py", "test_state.py"]
    tests.append("test_headers.py")
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *(os.path.join(here, t) for t in tests)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


header_names = st.one_of(st.text(max_size=8), st.sampled_from(["segq-x", "a\x00b", "\ud800", "trace-id"]), st.just(b"k"))
header_values = st.one_of(st.binary(max_size=20), st.text(max_size=8), st.just(5), st.just(bytearray(b"v")))


@given(st.dictionaries(header_names, header_values, max_size=5), st.booleans())
def test_encode_headers_matches_python_or_leaves_the_error_to_it(headers: dict, allow_reserved: bool) -> None:
    from segq import _headers
    from segq.errors import SegqError

    block = speedups.encode_headers(headers, allow_reserved)
    try:
        expected = _headers._encode_headers(headers, allow_reserved)
    except SegqError:
        assert block is None
    else:
        assert block is None or block == expected


@given(st.binary(max_size=80), st.dictionaries(st.text(min_size=1, max_size=6), st.binary(max_size=10), max_size=4))
def test_split_body_matches_python_on_any_bytes(noise: bytes, headers: dict[str, bytes]) -> None:
    from segq import _headers
    from segq.errors import CorruptionError

    headers = {name: value for name, value in headers.items() if "\x00" not in name}
    for body in (noise, _headers._encode_headers(headers, True) + noise):
        split = speedups.split_body(body)
        try:
            expected = _headers._split_body(body)
        except CorruptionError:
            assert split is None
        else:
            assert split == expected
_CRC_CHECK = """
import os, random, zlib
from segq import _speedups
rng = random.Random(14)
data = bytes(rng.getrandbits(8) for _ in range(70000))
for start in range(0, 17):
    for length in list(range(0, 260)) + [1023, 1024, 4096, 4104, 10800, 65536]:
        view = memoryview(data)[start : start + length]
        value = rng.getrandbits(32)
        assert _speedups.crc32(view, value) == zlib.crc32(view, value), (start, length)
"""


@pytest.mark.parametrize("table_only", [False, True], ids=["clmul-if-the-cpu-has-it", "table"])
def test_crc32_matches_zlib_at_every_length_and_alignment_on_both_paths(table_only: bool) -> None:
    # The carry-less-multiply path takes runs of 64 bytes and more, in 16-byte
    # steps from any alignment; SEGQ_NO_CLMUL forces the table path.
    env = dict(os.environ)
    env.pop("SEGQ_NO_CLMUL", None)
    if table_only:
        env["SEGQ_NO_CLMUL"] = "1"
    root = os.path.dirname(os.path.dirname(os.path.abspath(_format.__file__)))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    result = subprocess.run([sys.executable, "-c", _CRC_CHECK], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
