"""The bad-input catalogue: each bad path, file or environment gets a clear ``SegqError``.

"Clear" means: a ``segq.SegqError`` (never ``KeyError``, ``struct.error``,
``MemoryError``, a signal or a hang) whose message says what is wrong and
names the file or directory concerned.
"""

from __future__ import annotations

import errno
import os
import pathlib
import shutil
import struct
import subprocess
import tempfile
import tracemalloc
import zlib
from collections.abc import Iterator

import pytest
from _calls import call_in_child, open_receiver_and_read, open_sender_and_send
from _harness import drain, record_figure

import segq
from segq import _format, _segment

SEGMENT_SIZE = 4096
NOBODY = 65534


def records(count: int, size: int = 40) -> list[bytes]:
    return [b"%04d:" % i + b"x" * size for i in range(count)]


def fill(path: pathlib.Path, count: int = 200, segment_size: int = SEGMENT_SIZE) -> list[bytes]:
    """Create a queue at ``path`` holding ``count`` records over several segments; return them."""
    sent = records(count)
    with segq.Sender(path, segment_size=segment_size) as sender:
        segq.Receiver(path).close()  # registered before anything is sent
        for record in sent:
            sender.send(record)
    return sent


def assert_names(error: BaseException, *paths: object) -> None:
    """The message names one of ``paths``."""
    text = str(error)
    assert any(os.fspath(path) in text for path in paths), f"{text!r} names none of {paths}"  # type: ignore[arg-type]


@pytest.fixture(autouse=True)
def count_bad_inputs() -> Iterator[None]:
    yield
    record_figure("bad inputs tried", 1)


# -- the path ------------------------------------------------------------------


def test_path_is_a_file(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "file"
    path.write_text("not a queue")
    for opener in (segq.Sender, segq.Receiver):
        with pytest.raises(segq.SegqError, match="is a file") as caught:
            opener(path)
        assert_names(caught.value, path)
    assert path.read_text() == "not a queue"


def test_path_below_a_file(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "file"
    path.write_text("")
    with pytest.raises(segq.SegqError) as caught:
        segq.Sender(path / "queue")
    assert_names(caught.value, path)


def _read_only_tree(root: pathlib.Path, writable: bool) -> None:
    for directory, _, names in os.walk(root):
        for name in names:
            path = os.path.join(directory, name)
            if os.path.isfile(path):
                os.chmod(path, 0o644 if writable else 0o444)
        os.chmod(directory, 0o755 if writable else 0o555)


def test_directory_not_writable(tmp_path: pathlib.Path) -> None:
    """A queue the caller may read but not write: a SegqError about permissions, nothing changed.

    As root (who may write anything) the opening happens in a child running as
    user nobody; otherwise the queue is made read-only with chmod.
    """
    if os.geteuid() == 0:
        parent = pathlib.Path(tempfile.mkdtemp(prefix="segq-perm-"))
        parent.chmod(0o755)  # nobody must be able to reach it
        queue = parent / "queue"
        user: int | None = NOBODY
    else:
        parent, queue, user = tmp_path, tmp_path / "queue", None
    try:
        fill(queue, 20)
        if user is None:
            _read_only_tree(queue, writable=False)
            parent.chmod(0o555)
        attempts = [
            call_in_child(open_receiver_and_read, str(queue), "default", user=user),
            call_in_child(_send_one, str(queue), user=user),
            call_in_child(_send_one, str(parent / "new" / "queue"), user=user),
        ]
        for outcome in attempts:
            assert outcome.error_type == "SegqError", outcome
            assert "permission" in outcome.error and str(parent) in outcome.error, outcome
        if user is None:
            parent.chmod(0o755)
            _read_only_tree(queue, writable=True)
        assert drain(queue) == records(20)  # nothing was changed
    finally:
        if user is None:
            parent.chmod(0o755)
            _read_only_tree(queue, writable=True)
        else:
            shutil.rmtree(parent)


def _send_one(path: str) -> None:
    with segq.Sender(path, segment_size=SEGMENT_SIZE) as sender:
        sender.send(b"x")


# -- versions and foreign files ------------------------------------------------------


def _rewrite_segment_header(path: pathlib.Path, version: int, magic: bytes = b"segq\x00seg") -> None:
    with open(path, "r+b") as handle:
        header = bytearray(handle.read(_format.SEGMENT_HEADER_SIZE))
        header[0:8] = magic
        header[8:12] = struct.pack("<I", version)
        header[24:28] = struct.pack("<I", zlib.crc32(bytes(header[:24])))
        handle.seek(0)
        handle.write(header)


@pytest.mark.parametrize("which", ["first", "last"])
def test_future_segment_format_version(tmp_path: pathlib.Path, which: str) -> None:
    queue = tmp_path / "queue"
    fill(queue)
    segments = _segment.list_segments(queue)
    number = segments[0] if which == "first" else segments[-1]
    _rewrite_segment_header(pathlib.Path(_segment.segment_path(queue, number)), version=3)
    with pytest.raises(segq.UnsupportedFormat, match="version 3") as caught:
        drain(queue)
    assert_names(caught.value, _segment.segment_path(queue, number))
    if which == "last":
        with pytest.raises(segq.UnsupportedFormat):
            segq.Sender(queue, segment_size=SEGMENT_SIZE)


def test_future_cursor_format_version(tmp_path: pathlib.Path) -> None:
    queue = tmp_path / "queue"
    fill(queue, 10)
    drain(queue)
    cursor = queue / "cursors" / "r.default.pos"
    data = bytearray(cursor.read_bytes())
    for base in (0, 512):
        data[base + 8 : base + 12] = struct.pack("<I", 7)
        data[base + 40 : base + 44] = struct.pack("<I", zlib.crc32(bytes(data[base : base + 40])))
    cursor.write_bytes(bytes(data))
    with pytest.raises(segq.UnsupportedFormat, match="7") as caught:
        segq.Receiver(queue)
    assert_names(caught.value, cursor)


def test_segment_with_a_bad_magic(tmp_path: pathlib.Path) -> None:
    queue = tmp_path / "queue"
    sent = fill(queue)
    segments = _segment.list_segments(queue)
    middle = pathlib.Path(_segment.segment_path(queue, segments[1]))
    _rewrite_segment_header(middle, version=1, magic=b"NOTSEGQ!")
    got = []
    with pytest.raises(segq.CorruptionError, match="magic") as caught:
        with segq.Receiver(queue) as receiver:
            while (message := receiver.try_recv()) is not None:
                got.append(message.data)
                message.commit()
    assert caught.value.path == str(middle) and caught.value.offset == 0
    assert got == sent[: len(got)] and got  # the first segment was read, then the error
    last = pathlib.Path(_segment.segment_path(queue, segments[-1]))
    _rewrite_segment_header(last, version=1, magic=b"NOTSEGQ!")
    with pytest.raises(segq.CorruptionError, match="magic") as caught:
        segq.Sender(queue, segment_size=SEGMENT_SIZE)
    assert caught.value.path == str(last)


def test_stray_files_in_the_queue_directory(tmp_path: pathlib.Path) -> None:
    queue = tmp_path / "queue"
    sent = fill(queue, 50)
    (queue / "notes.txt").write_text("a note")
    (queue / "00000000001.seg").write_bytes(b"eleven digits")  # not a segment name
    (queue / "000000000001.seg.abcd1234.tmp").write_bytes(b"left by an interrupted creation")
    (queue / "123456789012.segment").write_bytes(b"")
    (queue / "subdirectory").mkdir()
    (queue / "cursors" / "README").write_text("not a cursor")
    (queue / "senders").mkdir(exist_ok=True)
    (queue / "senders" / "garbage.lock").write_bytes(b"\x00\xff garbage")
    assert drain(queue) == sent
    with segq.Sender(queue, segment_size=SEGMENT_SIZE) as sender:
        sender.send(b"after")
    assert drain(queue) == [b"after"]
    assert (queue / "notes.txt").read_text() == "a note"


def test_a_directory_where_a_segment_should_be(tmp_path: pathlib.Path) -> None:
    queue = tmp_path / "queue"
    fill(queue, 10)
    last = _segment.list_segments(queue)[-1]
    impostor = pathlib.Path(_segment.segment_path(queue, last + 5))
    impostor.mkdir()
    with pytest.raises(segq.SegqError) as caught:
        drain(queue)
    assert_names(caught.value, impostor)


def test_an_empty_file_where_the_last_segment_should_be(tmp_path: pathlib.Path) -> None:
    queue = tmp_path / "queue"
    fill(queue, 10)
    impostor = pathlib.Path(_segment.segment_path(queue, _segment.list_segments(queue)[-1] + 1))
    impostor.write_bytes(b"")
    with pytest.raises(segq.CorruptionError, match="bytes long") as caught:
        drain(queue)
    assert caught.value.path == str(impostor)


# -- metadata that points nowhere ------------------------------------------------


def _write_cursor(path: pathlib.Path, segment: int, offset: int) -> None:
    from segq._state import CursorFile, Position

    cursor = CursorFile(path)
    try:
        cursor.write(Position(segment, offset))
        cursor.sync()
    finally:
        cursor.close()


@pytest.mark.parametrize(
    "where",
    [
        "past the end of its segment",
        "inside a record",
        "inside the header",
        "in a missing later segment",
        "in a deleted earlier segment",
        "past the tail",
    ],
)
def test_cursor_pointing_nowhere(tmp_path: pathlib.Path, where: str) -> None:
    queue = tmp_path / "queue"
    sent = fill(queue)
    segq.Receiver(queue, "lost").close()  # registered at the start
    drain(queue, "ahead")  # a second consumer, so segments stay
    segments = _segment.list_segments(queue)
    first, last = segments[0], segments[-1]
    tail_segment, tail_offset = _tail(queue)
    position = {
        "past the end of its segment": (first, SEGMENT_SIZE + 100),
        "inside a record": (first, _format.SEGMENT_HEADER_SIZE + 3),
        "inside the header": (first, 0),
        "in a missing later segment": (last + 3, _format.SEGMENT_HEADER_SIZE),
        "in a deleted earlier segment": (first - 1 if first else 0, _format.SEGMENT_HEADER_SIZE),
        "past the tail": (tail_segment, tail_offset + 48),
    }[where]
    if where == "in a deleted earlier segment" and first == 0:
        os.unlink(_segment.segment_path(queue, 0))
        position = (0, _format.SEGMENT_HEADER_SIZE)
    cursor = queue / "cursors" / "r.lost.pos"
    _write_cursor(cursor, *position)
    with pytest.raises(segq.SegqError) as caught, segq.Receiver(queue, "lost") as receiver:
        receiver.try_recv()
    assert_names(caught.value, queue)
    recover = getattr(pytest.importorskip("segq.recovery"), "recover", None)
    if recover is not None:  # the error says "run `segq recover`": that must be enough
        recover(queue, "lost")
        got = drain(queue, "lost")
        assert got == sent[len(sent) - len(got) :]


def _tail(queue: pathlib.Path) -> tuple[int, int]:
    from segq._control import Control

    control = Control(queue)
    try:
        tail = control.tail()
        return tail.segment, tail.offset
    finally:
        control.close()


def test_length_field_past_the_end_allocates_nothing(tmp_path: pathlib.Path) -> None:
    """A damaged length word claiming ~2 GiB is reported without reading (allocating) it."""
    for which in ("sealed", "last"):
        queue = tmp_path / which
        sent = fill(queue)
        segments = _segment.list_segments(queue)
        number = segments[0] if which == "sealed" else segments[-1]
        path = pathlib.Path(_segment.segment_path(queue, number))
        data = bytearray(path.read_bytes())
        first = _format.SEGMENT_HEADER_SIZE
        skip = 3 if which == "sealed" else 1  # damage the fourth record, or the second of the last segment
        for _ in range(skip):
            first += _format.HEADER_SIZE + struct.unpack_from("<I", data, first)[0]
        struct.pack_into("<I", data, first, 0x7FFF_FFF0)
        path.write_bytes(bytes(data))
        tracemalloc.start()
        try:
            with pytest.raises(segq.CorruptionError) as caught:
                drain(queue)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert peak < 8 << 20, f"reading a damaged length allocated {peak} bytes"
        assert caught.value.path == str(path)
        del sent


def test_zero_length_and_maximum_size_records(tmp_path: pathlib.Path) -> None:
    queue = tmp_path / "queue"
    with segq.Sender(queue, segment_size=SEGMENT_SIZE) as sender:
        largest = sender.max_record_size
        assert largest == SEGMENT_SIZE - 48  # docs/format.md: a segment of size S holds S - 48 bytes
        sent = [b"", b"x" * largest, b"", b"y" * largest, b"z" * largest, b""]
        for record in sent:
            sender.send(record)
        sender.send_batch([b"", b""])
        sender.send_batch([b"w" * (largest - 8), b""])  # a batch that exactly fills a segment
        with pytest.raises(segq.RecordTooLarge):
            sender.send(b"v" * (largest + 1))
        with pytest.raises(segq.RecordTooLarge):
            sender.send_batch([b"", b"v" * (largest + 1)])
        sender.send_batch([b"u" * (largest - 7), b""])  # one byte too many for a segment: it gets a larger one
        sender.send(b"last")
    assert drain(queue) == [*sent, b"", b"", b"w" * (largest - 8), b"", b"u" * (largest - 7), b"", b"last"]


@pytest.mark.parametrize(
    "garbage",
    [b"", b"\x00\x00\x00", b"not a pid\n", b"-5 abc\n", b"999999999 1.0\n", b"1 1.0\n", b"\xff" * 4096],
    ids=["empty", "zeros", "words", "negative", "huge-pid", "pid-1", "binary"],
)
def test_lock_file_holding_garbage(tmp_path: pathlib.Path, garbage: bytes) -> None:
    """A lock file whose flock is free is stale, whatever it says; opening takes it over."""
    queue = tmp_path / "queue"
    sent = fill(queue, 10)
    (queue / "cursors" / "r.default.lock").write_bytes(garbage)
    (queue / "senders").mkdir(exist_ok=True)
    (queue / "senders" / "1-0.lock").write_bytes(garbage)
    assert drain(queue) == sent
    with segq.Sender(queue, segment_size=SEGMENT_SIZE) as sender:
        sender.send(b"more")
    assert drain(queue) == [b"more"]


def test_recovery_unlock_removes_a_garbage_lock_file(tmp_path: pathlib.Path) -> None:
    recovery = pytest.importorskip("segq.recovery")
    if not hasattr(recovery, "unlock"):
        pytest.skip("segq.recovery.unlock is not there yet")
    queue = tmp_path / "queue"
    fill(queue, 3)
    lock = queue / "cursors" / "r.default.lock"
    lock.write_bytes(b"\xff garbage \x00")
    recovery.unlock(lock)
    assert not lock.exists()


# -- a full disk ------------------------------------------------------------------


@pytest.fixture
def small_tmpfs(tmp_path: pathlib.Path) -> Iterator[pathlib.Path]:
    """A 1 MiB tmpfs, where the machine lets us mount one."""
    mount_point = tmp_path / "tmpfs"
    mount_point.mkdir()
    try:
        result = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount_point)],
            capture_output=True,
            timeout=30,
        )
    except (OSError, subprocess.TimeoutExpired) as error:
        pytest.skip(f"cannot mount a tmpfs here: {error}")
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.decode().strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], capture_output=True, timeout=30)


def _fill_the_disk(directory: pathlib.Path) -> pathlib.Path:
    ballast = directory / "ballast"
    fd = os.open(ballast, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        chunk = b"\xaa" * 4096
        while True:
            try:
                os.write(fd, chunk)
            except OSError as error:
                assert error.errno == errno.ENOSPC
                return ballast
    finally:
        os.close(fd)


def _send_until_full(queue: pathlib.Path, sender: segq.Sender) -> tuple[list[bytes], segq.SegqError]:
    acknowledged = []
    for index in range(100_000):
        record = b"%06d" % index + b"r" * 500
        try:
            sender.send(record)
        except segq.SegqError as error:
            return acknowledged, error
        acknowledged.append(record)
    raise AssertionError("the disk never filled up")


def test_full_disk_on_a_small_tmpfs(small_tmpfs: pathlib.Path) -> None:
    queue = small_tmpfs / "queue"
    with segq.Sender(queue, segment_size=64 * 1024) as sender:
        segq.Receiver(queue).close()  # the consumer exists before the disk fills
        # A stale lock file: rewriting it reuses its own page, so the cursor is the first allocation.
        (queue / "cursors" / "r.second.lock").write_text("1 1.0\n")
        other = small_tmpfs / "other"
        segq.Sender(other, segment_size=4096).close()
        (other / "segq.ctl").unlink()  # to be rebuilt on the full disk
        ballast = _fill_the_disk(small_tmpfs)
        outcome = call_in_child(open_sender_and_send, str(other), [b"x"], 4096)
        assert outcome.signal is None, f"rebuilding a control file on a full disk died of signal {outcome.signal}"
        assert outcome.error_type == "SegqError" and "disk is full" in outcome.error, outcome
        acknowledged, error = _send_until_full(queue, sender)
        assert "disk is full" in str(error)
        assert_names(error, queue)
        with pytest.raises(segq.SegqError, match="disk is full"):
            sender.send(b"s" * 506)  # needs a new segment too: keeps failing cleanly
        assert not [name for name in os.listdir(queue) if name.endswith(".tmp")]
        # A new receiver on the full disk: a clear error, not a SIGBUS.
        for name in ("newcomer", "second"):
            outcome = call_in_child(open_receiver_and_read, str(queue), name)
            assert outcome.signal is None, f"a new receiver on a full disk died of signal {outcome.signal}"
            assert outcome.error_type == "SegqError" and "disk is full" in outcome.error, outcome
        assert drain(queue) == acknowledged
        ballast.unlink()
        more = records(300, size=300)
        for record in more:
            sender.send(record)
    assert drain(queue) == more


def test_full_disk_by_fault_injection(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same promise where no tmpfs can be mounted: preallocation fails with ENOSPC."""
    queue = tmp_path / "queue"
    real_fallocate = os.posix_fallocate

    def no_space(fd: int, offset: int, length: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with segq.Sender(queue, segment_size=SEGMENT_SIZE) as sender:
        segq.Receiver(queue).close()
        monkeypatch.setattr(os, "posix_fallocate", no_space)
        acknowledged, error = _send_until_full(queue, sender)
        assert "disk is full" in str(error)
        with pytest.raises(segq.SegqError, match="disk is full"):
            sender.send(b"s" * 506)
        assert not [name for name in os.listdir(queue) if name.endswith(".tmp")]
        assert drain(queue) == acknowledged
        monkeypatch.setattr(os, "posix_fallocate", real_fallocate)
        more = records(100)
        for record in more:
            sender.send(record)
    assert drain(queue) == more


# -- files changed behind an open receiver --------------------------------------------


def test_segment_truncated_while_a_receiver_reads_it(tmp_path: pathlib.Path) -> None:
    """Truncated past what the receiver has buffered: the next read reports it (pread, no SIGBUS)."""
    queue = tmp_path / "queue"
    sent = [b"%04d" % i + b"r" * 1000 for i in range(900)]  # one segment, far more than one read-ahead
    with segq.Sender(queue, segment_size=1 << 20) as sender:
        segq.Receiver(queue).close()
        for record in sent:
            sender.send(record)
    segment = pathlib.Path(_segment.segment_path(queue, 0))
    with segq.Receiver(queue) as receiver:
        got = [receiver.recv(timeout=1).data]
        receiver.commit()
        os.truncate(segment, 32 * 1024)
        with pytest.raises(segq.CorruptionError, match="truncated") as caught:
            for _ in range(len(sent)):
                message = receiver.recv(timeout=1)
                got.append(message.data)
                message.commit()
        assert caught.value.path == str(segment)
        assert got == sent[: len(got)]


def test_tail_segment_truncated_while_a_receiver_waits(tmp_path: pathlib.Path) -> None:
    queue = tmp_path / "queue"
    sent = fill(queue, 10, segment_size=1 << 16)
    with segq.Receiver(queue) as receiver:
        with segq.Sender(queue, segment_size=1 << 16) as sender:
            os.truncate(_segment.segment_path(queue, 0), 64)
            got = []
            with pytest.raises(segq.CorruptionError) as caught:
                for _ in range(11):
                    message = receiver.recv(timeout=1)
                    got.append(message.data)
                    message.commit()
            assert caught.value.path == _segment.segment_path(queue, 0)
            assert got == sent[: len(got)]
            del sender


def test_segments_deleted_while_a_receiver_reads(tmp_path: pathlib.Path) -> None:
    queue = tmp_path / "queue"
    sent = fill(queue)
    segments = _segment.list_segments(queue)
    with segq.Receiver(queue) as receiver:
        got = [receiver.recv(timeout=1).data]
        receiver.commit()
        os.unlink(_segment.segment_path(queue, segments[0]))  # the open one: its data stays readable
        os.unlink(_segment.segment_path(queue, segments[1]))  # the next one: gone
        with pytest.raises(segq.SegqError, match="missing") as caught:
            for _ in range(len(sent)):
                message = receiver.recv(timeout=1)
                got.append(message.data)
                message.commit()
        assert_names(caught.value, _segment.segment_path(queue, segments[1]))
        assert got == sent[: len(got)]
