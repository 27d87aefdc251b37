"""Child-process harness for the crash, power-loss and stress tests.

Theory of operation
-------------------
Senders and receivers run as child processes (a ``forkserver`` context with
segq preloaded, so a child starts in milliseconds and the test process never
forks itself).  The parent SIGKILLs them at random instants and starts new
*incarnations*.  What a child has done must survive its SIGKILL, so each one
keeps a *journal*: an append-only file written with one ``os.write`` per line
(``O_APPEND``), which the kernel keeps whole once the call returns.

A producer incarnation has a *tag* (``"<slot>.<incarnation>"``) and numbers its
records 0, 1, 2, ...  Each record is ``b"<tag>:<seq>:<pad>|" + padding``,
where the padding is a function of tag, seq and length, so a mangled payload
is caught by :func:`parse_record`.  The journal says::

    R                 ready (the Sender is open)
    S first last      about to send records first..last (one send or one batch)
    A last            that send returned: records up to last are acknowledged

A receiver journal says ``R``, then ``G tag:seq`` for every record received
and ``C`` after each commit returned (the commit covers every ``G`` since the
previous ``C``).  A child that fails writes ``E`` and the traceback.

:class:`Ledger` turns the journals of a run plus a final drain into the
verdicts the reliability promises make: every acknowledged record is
delivered, in order, with no gap and no duplicate, a batch whole and
contiguous; a committed record never comes back; what comes back after a
receiver's death is only what it had received but not committed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import multiprocessing
import os
import random
import signal
import time
import traceback
from collections.abc import Iterator
from typing import Any

import segq

__all__ = [
    "CONTEXT",
    "Child",
    "Fleet",
    "Journal",
    "Ledger",
    "consumer_main",
    "drain",
    "make_record",
    "parse_record",
    "producer_main",
    "read_journal",
    "record_figure",
]

CONTEXT = multiprocessing.get_context("forkserver")
# segq imports portalocker, psutil and recovery code only when used (issue 14);
# children that drop to user nobody could not import them (this Python lives
# under /root), so the fork server loads them, as a program that drops
# privileges after start-up would have to.
CONTEXT.set_forkserver_preload(["segq", "segq.recovery", "portalocker", "psutil", "encodings.ascii", __name__])

CHILD_TIMEOUT = 60.0  # generous: a loaded 2-core CI machine


# -- records ----------------------------------------------------------------


def _padding(tag: str, seq: int, size: int) -> bytes:
    unit = b"%s/%d;" % (tag.encode(), seq)
    return (unit * (size // len(unit) + 1))[:size]


def make_record(tag: str, seq: int, size: int) -> bytes:
    """Return record ``seq`` of producer ``tag`` with ``size`` bytes of checkable padding."""
    return b"%s:%d:%d|" % (tag.encode(), seq, size) + _padding(tag, seq, size)


def parse_record(data: bytes) -> tuple[str, int]:
    """Return ``(tag, seq)`` of a record made by :func:`make_record`; raise ``ValueError`` if mangled."""
    head, bar, padding = bytes(data).partition(b"|")
    fields = head.split(b":")
    if not bar or len(fields) != 3:
        raise ValueError(f"not a harness record: {bytes(data[:60])!r}")
    tag, seq, size = fields[0].decode(), int(fields[1]), int(fields[2])
    if padding != _padding(tag, seq, size):
        raise ValueError(f"record {tag}:{seq} has mangled padding")
    return tag, seq


# -- journals -----------------------------------------------------------------


class Journal:
    """An append-only side channel that survives the writer's SIGKILL line by line."""

    def __init__(self, path: str) -> None:
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def write(self, line: str) -> None:
        os.write(self.fd, line.encode() + b"\n")

    def close(self) -> None:
        os.close(self.fd)


def read_journal(path: str) -> list[str]:
    """Return the complete lines of a journal (a missing journal is empty)."""
    try:
        with open(path, "rb") as handle:
            text = handle.read().decode()
    except FileNotFoundError:
        return []
    lines = text.split("\n")
    return lines[:-1]  # the last element is "" (or a line cut by the kill: not possible, but harmless)


@contextlib.contextmanager
def _reporting(journal: Journal) -> Iterator[None]:
    try:
        yield
    except BaseException:
        journal.write("E " + traceback.format_exc().replace("\n", "\\n"))
        raise


# -- child bodies -------------------------------------------------------------


def producer_main(path: str, journal_path: str, tag: str, options: dict[str, Any]) -> None:
    """Send numbered records until killed (or ``options["count"]`` records, then close)."""
    journal = Journal(journal_path)
    rng = random.Random(options.get("seed", tag))
    max_size = options.get("max_size", 200)
    batch_share = options.get("batch_share", 0.3)
    max_batch = options.get("max_batch", 6)
    pause = options.get("pause", 0.0)
    count = options.get("count")
    stop_at = time.monotonic() + options["duration"] if "duration" in options else None
    with _reporting(journal):
        sender = segq.Sender(
            path,
            segment_size=options.get("segment_size", 8192),
            sync=options.get("sync", "never"),
            max_queue_bytes=options.get("max_queue_bytes"),
        )
        journal.write("R")
        seq = 0
        while (count is None or seq < count) and (stop_at is None or time.monotonic() < stop_at):
            size = rng.randrange(max_batch) + 1 if rng.random() < batch_share else 1
            if count is not None:
                size = min(size, count - seq)
            records = [make_record(tag, seq + i, rng.randrange(max_size)) for i in range(size)]
            journal.write(f"S {seq} {seq + size - 1}")
            if size == 1 and rng.random() < 0.8:
                sender.send(records[0])
            else:
                sender.send_batch(records)
            seq += size
            journal.write(f"A {seq - 1}")
            if pause:
                time.sleep(rng.random() * pause)
        sender.close()
        journal.write("D")


def consumer_main(path: str, name: str, journal_path: str, options: dict[str, Any]) -> None:
    """Receive and commit until killed, or until the queue is empty and ``options["stop_file"]`` exists
    (or ``options["stop_after_idle"]`` seconds passed with nothing)."""
    journal = Journal(journal_path)
    rng = random.Random(options.get("seed", journal_path))
    batch_share = options.get("batch_share", 0.3)
    idle_limit = options.get("stop_after_idle")
    rollback_share = options.get("rollback_share", 0.0)
    with _reporting(journal):
        receiver = segq.Receiver(path, name, sync=options.get("sync", "never"))
        journal.write("R")
        idle_since = time.monotonic()
        while True:
            try:
                if rng.random() < batch_share:
                    item: segq.Message | segq.Batch = receiver.recv_batch(rng.randrange(1, 8), timeout=0.1)
                    messages = list(item)
                else:
                    item = receiver.recv(timeout=0.1)
                    messages = [item]
            except segq.Empty:
                if idle_limit is not None and time.monotonic() - idle_since > idle_limit:
                    break
                if "stop_file" in options and os.path.exists(options["stop_file"]):
                    break  # told to stop, and the queue is empty
                continue
            idle_since = time.monotonic()
            if rollback_share and rng.random() < rollback_share:
                first = messages[0].data
                item.rollback()
                again = receiver.recv(timeout=5)
                if again.data != first:
                    raise AssertionError(f"rollback redelivered {again.data[:40]!r}, not {first[:40]!r}")
                item, messages = again, [again]
            for message in messages:
                tag, seq = parse_record(message.data)
                journal.write(f"G {tag}:{seq}")
            item.commit()
            journal.write("C")
        receiver.close()
        journal.write("D")


# -- the parent side -----------------------------------------------------------


@dataclasses.dataclass
class Child:
    """One slot of the fleet: a producer or a consumer, restarted as new incarnations."""

    kind: str  # "producer" or "consumer"
    slot: int
    name: str  # receiver name (consumers)
    options: dict[str, Any]
    incarnation: int = -1
    process: Any = None
    journals: list[str] = dataclasses.field(default_factory=list)
    tags: list[str] = dataclasses.field(default_factory=list)

    @property
    def tag(self) -> str:
        return f"{self.slot}.{self.incarnation}"


class Fleet:
    """Starts, SIGKILLs and restarts children; always kills what is left on exit."""

    def __init__(self, path: str, workdir: str) -> None:
        self.path = path
        self.workdir = workdir
        self.children: list[Child] = []
        self.kills = 0
        self.failures: list[str] = []

    def add_producer(self, **options: Any) -> Child:
        child = Child("producer", len(self.children), "", options)
        self.children.append(child)
        return child

    def add_consumer(self, name: str, **options: Any) -> Child:
        child = Child("consumer", len(self.children), name, options)
        self.children.append(child)
        return child

    def start(self, child: Child) -> None:
        child.incarnation += 1
        journal = os.path.join(self.workdir, f"{child.kind}-{child.slot}-{child.incarnation}.log")
        child.journals.append(journal)
        if child.kind == "producer":
            child.tags.append(child.tag)
            options = {"seed": f"{child.tag}-{random.random()}", **child.options}
            target, args = producer_main, (self.path, journal, child.tag, options)
        else:
            options = {"seed": f"{child.slot}.{child.incarnation}-{random.random()}", **child.options}
            target, args = consumer_main, (self.path, child.name, journal, options)
        child.process = CONTEXT.Process(target=target, args=args, daemon=True)
        child.process.start()

    def start_all(self) -> None:
        for child in self.children:
            self.start(child)

    def wait_ready(self, child: Child, timeout: float = CHILD_TIMEOUT) -> None:
        """Wait until the child's journal says it opened the queue (or it died)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            lines = read_journal(child.journals[-1])
            if lines and lines[0] == "R":
                return
            if any(line.startswith("E ") for line in lines) or not child.process.is_alive():
                break
            time.sleep(0.005)
        self._check_journal(child, child.journals[-1])
        raise AssertionError(f"{child.kind} {child.tag} did not get ready")

    def kill(self, child: Child) -> None:
        """SIGKILL the child's current incarnation (a failure if it had already died of an error)."""
        process = child.process
        if process is None:
            return
        if process.exitcode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(process.pid, signal.SIGKILL)
        process.join(CHILD_TIMEOUT)
        if process.exitcode == -signal.SIGKILL:
            self.kills += 1
        elif process.exitcode != 0:
            self.failures.append(f"{child.kind} {child.tag} exited with {process.exitcode}")
        self._check_journal(child, child.journals[-1])
        child.process = None

    def restart(self, child: Child) -> None:
        self.kill(child)
        self.start(child)

    def join(self, child: Child, timeout: float = CHILD_TIMEOUT) -> None:
        """Wait for the child to finish by itself; a failure if it does not or fails."""
        process = child.process
        process.join(timeout)
        if process.exitcode is None:
            self.failures.append(f"{child.kind} {child.tag} did not finish within {timeout} s")
        elif process.exitcode != 0:
            self.failures.append(f"{child.kind} {child.tag} exited with {process.exitcode}")
        self.kill(child)

    def _check_journal(self, child: Child, journal: str) -> None:
        for line in read_journal(journal):
            if line.startswith("E "):
                self.failures.append(f"{child.kind} {child.tag} failed:\n" + line[2:].replace("\\n", "\n"))

    def kill_all(self) -> None:
        for child in self.children:
            self.kill(child)

    def random_kills(
        self,
        rng: random.Random,
        kills: int,
        max_pause: float,
        deadline: float | None = None,
        early_share: float = 0.2,
    ) -> None:
        """Kill a random child at a random instant and restart it, ``kills`` times (or until ``deadline``).

        Most kills wait until the victim has opened the queue and then a random
        pause, so they land in sends, commits, rollovers and waits; the
        ``early_share`` land at once, in process start-up and queue attach.
        """
        done = 0
        while done < kills and (deadline is None or time.monotonic() < deadline):
            child = rng.choice(self.children)
            if rng.random() >= early_share:
                self.wait_ready(child)
            time.sleep(rng.random() * max_pause)
            self.restart(child)
            done += 1
            if self.failures:
                break

    def assert_no_failures(self) -> None:
        assert not self.failures, "\n\n".join(self.failures)

    def __enter__(self) -> Fleet:
        return self

    def __exit__(self, *exc_info: object) -> None:
        for child in self.children:
            process = child.process
            if process is not None and process.exitcode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(process.pid, signal.SIGKILL)
                process.join(CHILD_TIMEOUT)


def drain(path: str, name: str) -> list[bytes]:
    """Open receiver ``name`` in this process and receive and commit everything there is."""
    got = []
    with segq.Receiver(path, name) as receiver:
        while (message := receiver.try_recv()) is not None:
            got.append(message.data)
            message.commit()
    return got


# -- accounting ----------------------------------------------------------------


@dataclasses.dataclass
class _ProducerRecord:
    acked: int = -1  # last acknowledged seq
    in_flight: int = -1  # last seq of the send that was under way when the producer died
    batches: list[tuple[int, int]] = dataclasses.field(default_factory=list)
    done: bool = False


class Ledger:
    """What the journals say was sent and received, and the checks on it."""

    def __init__(self, fleet: Fleet) -> None:
        self.producers: dict[str, _ProducerRecord] = {}
        self.consumers: dict[str, list[list[str]]] = {}  # name -> incarnations -> journal lines
        for child in fleet.children:
            if child.kind == "producer":
                for tag, journal in zip(child.tags, child.journals):
                    self.producers[tag] = self._read_producer(journal)
            else:
                self.consumers.setdefault(child.name, []).extend(read_journal(j) for j in child.journals)

    @staticmethod
    def _read_producer(journal: str) -> _ProducerRecord:
        record = _ProducerRecord()
        for line in read_journal(journal):
            kind, _, rest = line.partition(" ")
            if kind == "S":
                first, last = map(int, rest.split())
                record.in_flight = last
                if last > first:
                    record.batches.append((first, last))
            elif kind == "A":
                record.acked = int(rest)
            elif kind == "D":
                record.done = True
        return record

    @property
    def acknowledged(self) -> int:
        """How many records the producers' sends acknowledged."""
        return sum(p.acked + 1 for p in self.producers.values())

    def check_stream(self, stream: list[tuple[str, int]], *, complete: bool = True) -> None:
        """Check one consumer's whole delivery (duplicates already removed) against the producers.

        Per producer: seqs 0..k in order, no gap, no duplicate, k at least the
        last acknowledged and at most the last one in flight, and a batch whole
        and contiguous.  ``complete`` is false for a snapshot that may hold less.
        """
        position: dict[tuple[str, int], int] = {}
        last_seen: dict[str, int] = {}
        for index, (tag, seq) in enumerate(stream):
            assert tag in self.producers, f"record {tag}:{seq} from no known producer"
            expected = last_seen.get(tag, -1) + 1
            assert seq == expected, f"producer {tag}: got seq {seq} where {expected} was due (gap or duplicate)"
            last_seen[tag] = seq
            position[(tag, seq)] = index
        for tag, producer in self.producers.items():
            last = last_seen.get(tag, -1)
            if complete:
                assert last >= producer.acked, (
                    f"producer {tag}: acknowledged records {last + 1}..{producer.acked} were lost"
                )
            assert last <= max(producer.in_flight, producer.acked), f"producer {tag}: seq {last} was never sent"
            for first, final in producer.batches:
                present = [(tag, seq) in position for seq in range(first, final + 1)]
                if any(present):
                    assert all(present), f"producer {tag}: batch {first}..{final} delivered in part"
                    start = position[(tag, first)]
                    assert [position[(tag, s)] for s in range(first, final + 1)] == list(
                        range(start, start + final - first + 1)
                    ), f"producer {tag}: batch {first}..{final} interleaved with other records"

    def consumer_stream(self, name: str, final: list[bytes]) -> list[tuple[str, int]]:
        """Check ``name``'s deliveries across its incarnations; return the queue order they show.

        ``final`` is what a last receiver drained after every child was dead.
        Each incarnation reads a contiguous run of the one queue order, starting
        at its committed position: after the last record the previous
        incarnation reported committed, or after the group it had received
        and was committing when it died.  So a committed record never comes
        back, nothing is skipped, and what comes back was in flight.
        """
        runs: list[tuple[list[str], int]] = []  # (received, how many of them were reported committed)
        for lines in self.consumers.get(name, []):
            received: list[str] = []
            committed = 0
            for line in lines:
                if line.startswith("G "):
                    received.append(line[2:])
                elif line == "C":
                    committed = len(received)
            runs.append((received, committed))
        runs.append((["%s:%d" % parse_record(data) for data in final], len(final)))
        order: list[str] = []
        index_of: dict[str, int] = {}
        allowed = {0}  # where the next incarnation may start: receivers are registered before any send
        for number, (received, committed) in enumerate(runs):
            if not received:
                continue  # it read nothing, so it committed nothing: its successor starts where it did
            start = index_of.get(received[0], len(order))
            what = "the final drain" if number == len(runs) - 1 else f"incarnation {number}"
            assert start in allowed, (
                f"receiver {name}: {what} started at record {start} ({received[0]}), "
                f"but its committed position was one of {sorted(allowed)}"
                + (" (a committed record came back)" if start < min(allowed) else " (records were skipped)")
            )
            for offset, key in enumerate(received):
                if start + offset < len(order):
                    assert order[start + offset] == key, (
                        f"receiver {name}: {what} got {key} where {order[start + offset]} was delivered before"
                    )
                else:
                    assert key not in index_of, f"receiver {name}: {key} delivered twice"
                    index_of[key] = len(order)
                    order.append(key)
            allowed = {start + committed, start + len(received)}
        keys = []
        for key in order:
            tag, _, seq = key.rpartition(":")
            keys.append((tag, int(seq)))
        return keys


def record_figure(name: str, value: int) -> None:
    """Add ``value`` to figure ``name`` in ``$SEGQ_FIGURES`` (a JSON file), if that is set.

    ``docs/reliability.md`` quotes these totals from the last full run.
    """
    target = os.environ.get("SEGQ_FIGURES")
    if not target:
        return
    with open(target, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        handle.seek(0)
        text = handle.read()
        figures = json.loads(text) if text.strip() else {}
        figures[name] = figures.get(name, 0) + value
        handle.seek(0)
        handle.truncate()
        json.dump(figures, handle, indent=1, sort_keys=True)


# -- one call in a child process ------------------------------------------------


@dataclasses.dataclass
class ChildOutcome:
    """How a call made in a child process ended: its value, its exception, or the signal that killed it."""

    exitcode: int | None
    value: Any = None
    error_type: str | None = None
    error: str | None = None

    @property
    def signal(self) -> int | None:
        return -self.exitcode if self.exitcode is not None and self.exitcode < 0 else None


def _call_and_report(connection: Any, user: int | None, target: Any, args: tuple[Any, ...]) -> None:
    try:
        if user is not None:
            os.setgroups([])
            os.setgid(user)
            os.setuid(user)
        value = target(*args)
    except BaseException as error:  # noqa: BLE001 - reported to the parent
        connection.send(("error", type(error).__name__, str(error)))
    else:
        connection.send(("value", value, None))


def call_in_child(target: Any, *args: Any, user: int | None = None, timeout: float = CHILD_TIMEOUT) -> ChildOutcome:
    """Call ``target(*args)`` in a child process (as ``user`` if given); a crash there is reported, not felt."""
    receiving, sending = CONTEXT.Pipe(duplex=False)
    process = CONTEXT.Process(target=_call_and_report, args=(sending, user, target, args), daemon=True)
    process.start()
    sending.close()
    try:
        message = receiving.recv() if receiving.poll(timeout) else None
    except EOFError:
        message = None
    finally:
        process.join(timeout)
        if process.exitcode is None:
            process.kill()
            process.join()
        receiving.close()
    if message is None:
        return ChildOutcome(process.exitcode)
    kind, first, second = message
    if kind == "value":
        return ChildOutcome(process.exitcode, value=first)
    return ChildOutcome(process.exitcode, error_type=first, error=second)


def open_receiver_and_read(path: str, name: str) -> list[bytes]:
    """Open receiver ``name``, read and commit everything there (a child-process target)."""
    return drain(path, name)


def open_sender_and_send(path: str, records: list[bytes], segment_size: int) -> int:
    """Open a Sender and send ``records`` (a child-process target); return how many were sent."""
    with segq.Sender(path, segment_size=segment_size) as sender:
        for record in records:
            sender.send(record)
    return len(records)


def send_until_killed_in_rollover(path: str, journal_path: str, segment_size: int, point: str) -> None:
    """Send until a rollover and die (SIGKILL) at ``point`` of it (a child-process target).

    ``"created"``: the next segment exists, the old one is not sealed yet.
    ``"framed"``: the old one is sealed and the first record of the next one
    is written, but the tail is not published into it yet.
    """
    from segq import _format, _segment
    from segq import sender as sender_module

    journal = Journal(journal_path)
    real_frame_into = sender_module._frame_into
    real_create_segment = _segment.create_segment
    armed = []

    def frame_then_die(target: Any, offset: int, payload: bytes) -> int:
        written = real_frame_into(target, offset, payload)
        if offset == _format.SEGMENT_HEADER_SIZE and armed:
            os.kill(os.getpid(), signal.SIGKILL)
        armed.append(True)
        return written

    def create_then_die(*args: Any, **kwargs: Any) -> bool:
        created = real_create_segment(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGKILL)
        return created

    with segq.Sender(path, segment_size=segment_size) as sender:
        if point == "framed":
            sender_module._frame_into = frame_then_die
        else:
            _segment.create_segment = create_then_die
        for index in range(10_000):
            sender.send(b"before %d" % index + b"." * 100)
            journal.write(f"A {index}")


# -- power loss: what each sync made durable --------------------------------------


class DurabilityRecorder:
    """Journal, in this process, what every ``fsync``/``fdatasync``/cursor ``msync`` made durable.

    The model of a power loss is pessimistic: a file's bytes survive only as
    they were when it was last synced, a directory entry only if the directory
    was synced after it appeared.  File contents are keyed by inode (segments
    and cursors are synced under a temporary name, then linked), and read
    *before* the real sync, so nothing written meanwhile is credited to it.
    Before each sync the control file is journalled too: it is never synced,
    so after a power loss it may hold anything it ever held, up to the latest.
    """

    def __init__(self, queue_dir: str, journal_path: str) -> None:
        import pickle

        self._pickle = pickle
        self.root = os.path.realpath(queue_dir)
        # One write per event on an O_APPEND descriptor: several processes may share the journal.
        self.fd = os.open(journal_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self.syncs = 0

    def event(self, *item: Any) -> None:
        os.write(self.fd, self._pickle.dumps(item))

    def install(self, *, initial: bool = True) -> None:
        """Journal the queue as it is (durable: it was there before), then patch the sync calls.

        ``initial`` is false for a second process joining a journal already begun.
        """
        from segq import _state

        for directory, _, names in os.walk(self.root) if initial else ():
            self._journal_directory(directory)
            for name in names:
                path = os.path.join(directory, name)
                if os.path.isfile(path):
                    with open(path, "rb") as handle:
                        self.event("inode", os.fstat(handle.fileno()).st_ino, handle.read(), time.monotonic_ns())
        real_fsync, real_fdatasync = os.fsync, os.fdatasync
        real_cursor_sync = _state.CursorFile.sync
        recorder = self

        def fsync(fd: int) -> None:
            recorder._sync_fd(fd, real_fsync)

        def fdatasync(fd: int) -> None:
            recorder._sync_fd(fd, real_fdatasync)

        def cursor_sync(cursor: Any) -> None:
            recorder.crash_point()
            stamp = time.monotonic_ns()
            with open(cursor.path, "rb") as handle:
                content = handle.read()
                inode = os.fstat(handle.fileno()).st_ino
            real_cursor_sync(cursor)
            recorder.event("inode", inode, content, stamp)

        os.fsync = fsync  # type: ignore[assignment]
        os.fdatasync = fdatasync  # type: ignore[assignment]
        _state.CursorFile.sync = cursor_sync  # type: ignore[method-assign]

    def crash_point(self) -> None:
        """Mark an instant a power loss could strike, with the control file as it is now."""
        self.syncs += 1
        try:
            with open(os.path.join(self.root, "segq.ctl"), "rb") as handle:
                control = handle.read()
        except FileNotFoundError:
            control = b""
        # The kernel may write dirty pages back early: the newest segment as it is now.
        newest = b""
        inode = -1
        segments = sorted(name for name in os.listdir(self.root) if name.endswith(".seg"))
        if segments:
            try:
                with open(os.path.join(self.root, segments[-1]), "rb") as handle:
                    newest = handle.read()
                    inode = os.fstat(handle.fileno()).st_ino
            except FileNotFoundError:
                pass
        self.event("crash", control, inode, newest)

    def _journal_directory(self, directory: str, stamp: int | None = None) -> None:
        entries = {entry.name: (entry.inode(), entry.is_dir(follow_symlinks=False)) for entry in os.scandir(directory)}
        self.event("dir", os.path.relpath(directory, self.root), entries, stamp or time.monotonic_ns())

    def _sync_fd(self, fd: int, real_sync: Any) -> None:
        target = os.readlink(f"/proc/self/fd/{fd}")
        if not (target == self.root or target.startswith(self.root + os.sep)):
            real_sync(fd)
            return
        self.crash_point()
        # Read before the real sync, and stamped: a sync in another thread may
        # finish later with older content, which must not undo this one.
        stamp = time.monotonic_ns()
        if os.path.isdir(target):
            entries = {entry.name: (entry.inode(), entry.is_dir(follow_symlinks=False)) for entry in os.scandir(target)}
            real_sync(fd)
            self.event("dir", os.path.relpath(target, self.root), entries, stamp)
            return
        with open(f"/proc/self/fd/{fd}", "rb") as handle:
            content = handle.read()
        real_sync(fd)
        self.event("inode", os.fstat(fd).st_ino, content, stamp)


def powerloss_sender(path: str, journal_path: str, options: dict[str, Any]) -> int:
    """Send numbered records with a sync policy, journalling durability and acks (a child-process target)."""
    recorder = DurabilityRecorder(path, journal_path)
    recorder.install()
    rng = random.Random(options.get("seed", 1))
    sender = segq.Sender(path, segment_size=options.get("segment_size", 1024), sync=options["sync"])
    seq = 0
    while seq < options["count"]:
        size = rng.choice((1, 1, 1, 3))
        batch = [make_record("p", seq + i, rng.randrange(options.get("max_size", 80))) for i in range(size)]
        if size == 1:
            sender.send(batch[0])
        else:
            sender.send_batch(batch)
        seq += size
        recorder.event("ack", seq)
        if options.get("pause"):
            time.sleep(rng.random() * options["pause"])
    if options.get("settle"):
        # Group commit: wait (generously) for the background thread to cover every send, without sync().
        from segq import _control

        deadline = time.monotonic() + CHILD_TIMEOUT
        while time.monotonic() < deadline:
            if sender._control.word(_control.SYNCED) >= sender._control.word(_control.TAIL):
                break
            time.sleep(0.01)
        recorder.event("settled", seq)
    sender.close()
    recorder.crash_point()
    recorder.event("closed")
    return recorder.syncs


def powerloss_receiver(path: str, journal_path: str, options: dict[str, Any]) -> int:
    """Receive and commit with a sync policy, journalling durability and commits (a child-process target)."""
    recorder = DurabilityRecorder(path, journal_path)
    recorder.install(initial=options.get("initial", True))
    rng = random.Random(options.get("seed", 2))
    received = 0
    with segq.Receiver(path, options.get("name", "default"), sync=options["sync"]) as receiver:
        while received < options.get("count", 1 << 62):
            try:
                batch = receiver.recv_batch(rng.choice((1, 1, 4)), timeout=options.get("idle", 0.2))
            except segq.Empty:
                break
            received += len(batch)
            recorder.event("received", received)
            batch.commit()
            recorder.event("committed", received)
    recorder.crash_point()
    recorder.event("closed")
    return recorder.syncs


@dataclasses.dataclass
class DurableState:
    """The files a power loss would leave, per the journal so far."""

    directories: dict[str, dict[str, tuple[int, bool]]] = dataclasses.field(default_factory=dict)
    inodes: dict[int, bytes] = dataclasses.field(default_factory=dict)
    stamps: dict[object, int] = dataclasses.field(default_factory=dict)

    def apply(self, event: tuple[Any, ...]) -> None:
        """Apply a sync's journal entry; durability only moves forward, so an older read loses."""
        if event[0] not in ("dir", "inode"):
            return
        kind, key, content, stamp = event
        if stamp < self.stamps.get((kind, key), -1):
            return
        self.stamps[(kind, key)] = stamp
        if kind == "dir":
            self.directories[key] = content
        else:
            self.inodes[key] = content

    def with_written_back(self, inode: int, content: bytes) -> DurableState:
        """Return this state with one file's current content on disk too (early write-back)."""
        if inode < 0:
            return self
        return DurableState(self.directories, {**self.inodes, inode: content}, self.stamps)

    def materialize(self, target: str, control: bytes | None) -> None:
        """Write the surviving files under ``target``; ``control`` is what the unsynced control file holds."""
        self._materialize_directory(".", target, control)

    def _materialize_directory(self, relative: str, target: str, control: bytes | None) -> None:
        os.makedirs(target, exist_ok=True)
        for name, (inode, is_directory) in self.directories.get(relative, {}).items():
            path = os.path.join(target, name)
            child = os.path.normpath(os.path.join(relative, name))
            if is_directory:
                self._materialize_directory(child, path, control)
            elif child == "segq.ctl":
                if control is not None:
                    with open(path, "wb") as handle:
                        handle.write(control)
            elif inode in self.inodes:
                with open(path, "wb") as handle:
                    handle.write(self.inodes[inode])
            elif name.endswith(".lock"):
                open(path, "wb").close()  # never synced: empty, which is harmless for a lock file
            # Anything else never synced (FIFOs, temporary files) is simply gone.


def read_durability_journal(path: str) -> list[tuple[Any, ...]]:
    import pickle

    events = []
    with open(path, "rb") as handle:
        while True:
            try:
                events.append(pickle.load(handle))
            except EOFError:
                return events
