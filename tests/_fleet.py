"""The kill-loop harness: a fleet of producer and consumer processes, SIGKILLed and restarted.

Theory of operation
-------------------
Senders and receivers run as child processes (``_harness.CONTEXT``).  The
parent SIGKILLs them at random instants and starts new *incarnations*.  Each
keeps a journal (``_harness.Journal``) of what it has done, which survives
its SIGKILL.

A producer incarnation has a *tag* (``"<slot>.<incarnation>"``) and numbers its
records 0, 1, 2, ...  Each record is ``b"<tag>:<seq>:<pad>|" + padding``,
where the padding is a function of tag, seq and length, so a mangled payload
is caught by ``_harness.parse_record``.  The journal says::

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
import os
import random
import signal
import time
import traceback
from collections.abc import Iterator
from typing import Any

import segq
from _harness import CHILD_TIMEOUT, CONTEXT, Journal, make_record, parse_record, read_journal

__all__ = ["Child", "Fleet", "Ledger", "consumer_main", "producer_main"]


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
