"""Torn writes and corruption: truncate and bit-flip every file of a small queue at every offset.

A small queue (1024-byte segments, two sealed and one partly filled, two
receivers, one of them half way) is built once.  Each case writes a fresh
copy, damages one file at one offset, opens it with a ``Receiver`` and reads
everything.  Whatever the damage, the outcome must be a *prefix* of what was
sent (from the receiver's committed position), possibly followed by a
``SegqError`` whose message names the queue — never another exception, never
a mangled payload, never a hang.  Per region the expectation is sharper:

==========================  ============================================================
region                      expectation
==========================  ============================================================
segment header, bytes 0-27  damage is reported (``CorruptionError`` at offset 0)
segment header, bytes 28-31 reserved and not checked: nothing changes
records (below the tail     damage is reported: a sealed segment's records, and the
or the end marker)          last segment's when ``segq.ctl`` still says where its tail
                            was.  Truncating the *last* segment may silently shorten
                            the queue (a cut there looks exactly like a torn write).
bytes past the tail         nothing was written there: all records are delivered (the
or the end marker           last segment's stray bytes are cut as a torn tail)
``segq.ctl``                a cache: any damage is rebuilt from the segments, all
                            records delivered
cursor file                 one damaged slot falls back to the other one (the position
                            before the last commit: one record replayed); a short file
                            or two damaged slots are reported
==========================  ============================================================

The default run damages every byte offset of the data regions (one bit per
byte) and a sample of the zero-filled rest; ``-m soak`` flips every bit.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import random
import shutil
import tempfile
import time
import types
from collections.abc import Callable, Iterator

import pytest
from _harness import make_record, parse_record, record_figure

import segq
from segq import _control, _format, _reader, _segment

SEGMENT_SIZE = 1024
MID_COMMITS = 18  # receiver "mid" has committed this many records


@pytest.fixture(autouse=True)
def no_reread_pauses(monkeypatch: pytest.MonkeyPatch) -> None:
    """Skip the reader's pauses before re-reading a bad record: they wait out weakly ordered
    memory, not damage on disk, and would cost 11 ms for each of thousands of cases."""
    monkeypatch.setattr(_reader, "time", types.SimpleNamespace(sleep=lambda seconds: None, monotonic=time.monotonic))


@pytest.fixture
def scratch(tmp_path: pathlib.Path) -> Iterator[pathlib.Path]:
    """A directory for the damaged copies: on tmpfs where there is one, since thousands of
    copies test segq's logic, not the file system, and ext4 makes each one cost milliseconds."""
    if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK):
        with tempfile.TemporaryDirectory(dir="/dev/shm", prefix="segq-test-") as directory:
            yield pathlib.Path(directory)
    else:
        yield tmp_path


@dataclasses.dataclass
class Pristine:
    """The undamaged queue: file contents, what was sent, and where each segment's data ends."""

    files: dict[str, bytes]
    records: list[bytes]
    data_end: dict[str, int]  # segment file -> end of its records (past the end marker if sealed)
    last_segment: str


def build_queue(path: pathlib.Path, *, crashed: bool) -> Pristine:
    """Build the queue; ``crashed`` makes its control file look like its processes were killed."""
    rng = random.Random(5)
    records: list[bytes] = []
    with segq.Sender(path, segment_size=SEGMENT_SIZE) as sender:
        for name in ("early", "mid"):
            segq.Receiver(path, name).close()
        while len(records) < 52:
            batch = [make_record("c", len(records) + i, rng.randrange(60)) for i in range(rng.choice((1, 1, 3)))]
            if len(batch) == 1:
                sender.send(batch[0])
            else:
                sender.send_batch(batch)
            records.extend(batch)
    with segq.Receiver(path, "mid") as receiver:
        for _ in range(MID_COMMITS):
            receiver.recv(timeout=5).commit()
    files = {}
    for root, _, names in os.walk(path):
        for name in names:
            full = os.path.join(root, name)
            files[os.path.relpath(full, path)] = pathlib.Path(full).read_bytes()
    if crashed:
        control = bytearray(files[_control.CONTROL_NAME])
        control[_control.CLEAN_TAIL + 8 : _control.CLEAN_TAIL + 16] = bytes(8)  # the clean-shutdown check
        files[_control.CONTROL_NAME] = bytes(control)
    segments = sorted(name for name in files if name.endswith(".seg"))
    assert len(segments) == 3, segments
    data_end = {}
    for name in segments:
        scan = _segment.scan_records(files[name], _format.SEGMENT_HEADER_SIZE, len(files[name]))
        data_end[name] = scan.stop + _format.HEADER_SIZE if scan.status is _format.RecordStatus.END else scan.end
    return Pristine(files, records, data_end, segments[-1])


@pytest.fixture(scope="module")
def clean_queue(tmp_path_factory: pytest.TempPathFactory) -> Pristine:
    return build_queue(tmp_path_factory.mktemp("clean") / "queue", crashed=False)


@pytest.fixture(scope="module")
def crashed_queue(tmp_path_factory: pytest.TempPathFactory) -> Pristine:
    return build_queue(tmp_path_factory.mktemp("crashed") / "queue", crashed=True)


@dataclasses.dataclass
class Expect:
    """What one case may yield; ``starts`` are the record indices the receiver may begin at."""

    starts: tuple[int, ...] = (0,)
    whole: bool = False  # every record, no error
    reported: bool = False  # any loss comes with an error


class Trial:
    """Runs damage cases against fresh copies of a pristine queue and collects what went wrong."""

    def __init__(self, pristine: Pristine, workdir: pathlib.Path) -> None:
        self.pristine = pristine
        self.workdir = workdir
        self.failures: list[str] = []
        self.cases = 0

    def run(self, description: str, damage: Callable[[pathlib.Path], None], name: str, expect: Expect) -> None:
        self.cases += 1
        queue = self.workdir / "queue"
        if queue.exists():
            shutil.rmtree(queue)
        for relative, data in self.pristine.files.items():
            target = queue / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
        damage(queue)
        got: list[bytes] = []
        error: segq.SegqError | None = None
        try:
            with segq.Receiver(queue, name) as receiver:
                while (message := receiver.try_recv()) is not None:
                    parse_record(message.data)  # a mangled payload raises ValueError: a failure
                    got.append(message.data)
                    message.commit()
        except segq.SegqError as caught:
            error = caught
        except Exception as caught:  # noqa: BLE001 - any other exception is the finding
            self.failures.append(f"{description}: {type(caught).__name__}: {caught}")
            return
        self._judge(description, got, error, expect, str(queue))

    def _judge(self, description: str, got: list[bytes], error: Exception | None, expect: Expect, queue: str) -> None:
        records = self.pristine.records
        runs = [records[start:] for start in expect.starts]
        outcome = f"{len(got)} records" + (f", then {type(error).__name__}: {error}" if error else "")
        if not any(run[: len(got)] == got for run in runs):
            self.failures.append(f"{description}: not a prefix of what was sent ({outcome})")
        elif error is not None and queue not in str(error):
            self.failures.append(f"{description}: the error does not name the queue ({outcome})")
        elif isinstance(error, segq.CorruptionError) and not error.path.startswith(queue):
            self.failures.append(f"{description}: the error names {error.path}, outside the queue")
        elif expect.whole and (error is not None or got not in runs):
            self.failures.append(f"{description}: expected every record and no error ({outcome})")
        elif expect.reported and error is None and got not in runs:
            self.failures.append(f"{description}: records lost without an error ({outcome})")

    def assert_clean(self) -> None:
        shown = "\n".join(self.failures[:25])
        assert not self.failures, f"{len(self.failures)} of {self.cases} cases failed:\n{shown}"


def truncate(relative: str, length: int) -> Callable[[pathlib.Path], None]:
    def damage(queue: pathlib.Path) -> None:
        os.truncate(queue / relative, length)

    return damage


def flip(relative: str, offset: int, bit: int) -> Callable[[pathlib.Path], None]:
    def damage(queue: pathlib.Path) -> None:
        with open(queue / relative, "r+b") as handle:
            handle.seek(offset)
            byte = handle.read(1)[0]
            handle.seek(offset)
            handle.write(bytes([byte ^ (1 << bit)]))

    return damage


def sample_offsets(size: int, dense: list[range] | int, rng: random.Random, every: int = 8) -> list[int]:
    """Every offset in the ``dense`` ranges (or below ``dense``), about one in ``every`` of the rest."""
    ranges = [range(dense)] if isinstance(dense, int) else dense
    return [o for o in range(size) if any(o in r for r in ranges) or rng.randrange(every) == 0]


def segment_expectation(pristine: Pristine, name: str, offset: int, *, truncating: bool) -> Expect:
    end = pristine.data_end[name]
    last = name == pristine.last_segment
    if offset >= end:
        return Expect(whole=True)
    if not truncating and _format.SEGMENT_HEADER_SIZE - 4 <= offset < _format.SEGMENT_HEADER_SIZE:
        return Expect(whole=True)  # reserved header bytes
    if truncating and last and offset >= _format.SEGMENT_HEADER_SIZE + _format.HEADER_SIZE:
        return Expect()  # a cut last segment looks like a torn write: a shorter queue is all one can ask
    return Expect(reported=True)


def check_segments(pristine: Pristine, workdir: pathlib.Path, *, all_bits: bool = False) -> int:
    trial = Trial(pristine, workdir)
    rng = random.Random(17)
    flips = 0
    for name in sorted(n for n in pristine.files if n.endswith(".seg")):
        size = len(pristine.files[name])
        for offset in sample_offsets(size, pristine.data_end[name] + 16, rng):
            trial.run(
                f"{name} cut to {offset} bytes",
                truncate(name, offset),
                "early",
                segment_expectation(pristine, name, offset, truncating=True),
            )
            for bit in range(8) if all_bits else [rng.randrange(8)]:
                flips += 1
                trial.run(
                    f"{name} bit {bit} of byte {offset} flipped",
                    flip(name, offset, bit),
                    "early",
                    segment_expectation(pristine, name, offset, truncating=False),
                )
    trial.assert_clean()
    record_figure("truncation offsets tried", trial.cases - flips)
    record_figure("bit flips tried", flips)
    return trial.cases


def test_damaged_segments_of_a_cleanly_closed_queue(clean_queue: Pristine, scratch: pathlib.Path) -> None:
    check_segments(clean_queue, scratch)


def test_damaged_segments_of_a_crashed_queue(crashed_queue: Pristine, scratch: pathlib.Path) -> None:
    # Only the last segment is read differently after a crash (scanned from its start, checked
    # against the published tail), so only it is damaged here.
    pristine = crashed_queue
    trial = Trial(pristine, scratch)
    rng = random.Random(23)
    name = pristine.last_segment
    flips = 0
    for offset in sample_offsets(SEGMENT_SIZE, pristine.data_end[name] + 16, rng):
        trial.run(
            f"{name} cut to {offset} bytes",
            truncate(name, offset),
            "early",
            segment_expectation(pristine, name, offset, truncating=True),
        )
        flips += 1
        bit = rng.randrange(8)
        trial.run(
            f"{name} bit {bit} of byte {offset} flipped",
            flip(name, offset, bit),
            "early",
            segment_expectation(pristine, name, offset, truncating=False),
        )
    trial.assert_clean()
    record_figure("truncation offsets tried", trial.cases - flips)
    record_figure("bit flips tried", flips)


@pytest.mark.parametrize("state", ["clean", "crashed"])
def test_damaged_control_file_is_rebuilt(
    state: str, clean_queue: Pristine, crashed_queue: Pristine, scratch: pathlib.Path
) -> None:
    pristine = clean_queue if state == "clean" else crashed_queue
    trial = Trial(pristine, scratch)
    rng = random.Random(29)
    name = _control.CONTROL_NAME
    flips = 0
    # The header and the shared words are the first 64 bytes; then the waiter table.
    for offset in sample_offsets(_control.CONTROL_SIZE, 64, rng, every=24):
        trial.run(f"{name} cut to {offset} bytes", truncate(name, offset), "early", Expect(whole=True))
        flips += 1
        bit = rng.randrange(8)
        trial.run(f"{name} bit {bit} of byte {offset} flipped", flip(name, offset, bit), "early", Expect(whole=True))
    trial.run(f"{name} deleted", lambda queue: os.unlink(queue / name), "early", Expect(whole=True))
    trial.assert_clean()
    record_figure("truncation offsets tried", trial.cases - flips)
    record_figure("bit flips tried", flips)


def test_damaged_cursor_file(clean_queue: Pristine, scratch: pathlib.Path) -> None:
    trial = Trial(clean_queue, scratch)
    rng = random.Random(31)
    name = "cursors/r.mid.pos"
    size = len(clean_queue.files[name])
    # Either slot may be the one in use: the one damaged falls back to the one before it.
    may_replay = Expect(starts=(MID_COMMITS, MID_COMMITS - 1), whole=True)
    flips = 0
    # Each 512-byte slot holds 44 bytes of position; the rest is padding.
    for offset in sample_offsets(size, [range(48), range(512, 560)], rng):
        trial.run(
            f"{name} cut to {offset} bytes", truncate(name, offset), "mid", Expect(starts=(MID_COMMITS,), reported=True)
        )
        flips += 1
        bit = rng.randrange(8)
        trial.run(f"{name} bit {bit} of byte {offset} flipped", flip(name, offset, bit), "mid", may_replay)

    def both_slots(queue: pathlib.Path) -> None:
        with open(queue / name, "r+b") as handle:
            for base in (0, 512):
                handle.seek(base + 20)
                handle.write(b"\xff")

    trial.run(f"{name} both slots damaged", both_slots, "mid", Expect(starts=(MID_COMMITS,), reported=True))
    trial.assert_clean()
    record_figure("truncation offsets tried", trial.cases - flips)
    record_figure("bit flips tried", flips)


@pytest.mark.soak
@pytest.mark.timeout(0)
def test_every_bit_of_every_segment(clean_queue: Pristine, scratch: pathlib.Path) -> None:
    check_segments(clean_queue, scratch, all_bits=True)
