"""Power loss: roll the files back to what the last sync made durable, at every sync, and reopen.

A child process runs a Sender or a Receiver with a sync policy, with
``os.fsync``, ``os.fdatasync`` and the cursor's ``msync`` patched to journal
what each made durable (``_powerloss.DurabilityRecorder``).  The parent replays
the journal and, at every instant a power loss could strike (just before each
sync), writes out the files as they would be found afterwards: each file as
of its last sync, each directory entry only if its directory was synced since
it appeared.  The control file is never synced, so each state is opened twice:
without it, and with its latest content (whose published tail may run ahead
of the durable data).  Then it checks the promises:

* ``sync="always"`` (Sender): every record whose send returned before that
  instant is there, in order, and the queue opens without an error.
* ``sync="always"`` (Receiver): a commit that returned is never undone (no
  committed record comes back), nothing is skipped.
* ``sync=<seconds>``: every state opens cleanly and holds a prefix of what was
  sent; once the background thread has caught up (no ``sync()`` call, no
  ``close()``), everything sent is durable.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import sys
import tempfile
from collections.abc import Iterator
from typing import Any

import pytest
from _calls import call_in_child
from _harness import parse_record, record_figure
from _powerloss import DurableState, powerloss_receiver, powerloss_sender, read_durability_journal

import segq

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the recorder reads /proc/self/fd")


@pytest.fixture
def scratch(tmp_path: pathlib.Path) -> Iterator[pathlib.Path]:
    """Where the power-loss states are written out: tmpfs where there is one (hundreds of them)."""
    if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK):
        with tempfile.TemporaryDirectory(dir="/dev/shm", prefix="segq-powerloss-") as directory:
            yield pathlib.Path(directory)
    else:
        yield tmp_path


def open_state(
    state: DurableState, control: bytes | None, scratch: pathlib.Path, name: str
) -> tuple[list[int], Exception | None]:
    """Write out a state, open receiver ``name`` on it and return the seqs it reads (and any error)."""
    queue = scratch / "state"
    if queue.exists():
        shutil.rmtree(queue)
    state.materialize(str(queue), control)
    seqs: list[int] = []
    try:
        with segq.Receiver(queue, name) as receiver:
            while (message := receiver.try_recv()) is not None:
                seqs.append(parse_record(message.data)[1])
                message.commit()
    except segq.SegqError as error:
        return seqs, error
    return seqs, None


Variant = tuple[str, DurableState, "bytes | None"]


def replay(journal: str) -> Iterator[tuple[str, list[Variant], dict[str, int]]]:
    """Yield ``(kind, variants, counters)`` at every crash point and at the "settled" mark.

    Each crash point is tried three ways: without the control file; with its
    latest content; and with that, plus the newest segment's pages written
    back early by the kernel (the state the last sync left, and a bit more).
    """
    state = DurableState()
    counters = {"ack": 0, "received": 0, "committed": 0}
    control = b""
    newest: tuple[int, bytes] = (-1, b"")
    for event in read_durability_journal(journal):
        kind = event[0]
        if kind in ("crash", "settled"):
            if kind == "crash":
                control, newest = event[1], (event[2], event[3])
            variants: list[Variant] = [
                ("no control file", state, None),
                ("latest control file", state, control),
                ("newest segment written back", state.with_written_back(*newest), control),
            ]
            yield kind, variants, dict(counters)
        elif kind in counters:
            counters[kind] = event[1]
        else:
            state.apply(event)


class Verdicts:
    def __init__(self) -> None:
        self.failures: list[str] = []
        self.states = 0

    def add(self, where: str, problem: str) -> None:
        self.failures.append(f"{where}: {problem}")

    def assert_clean(self) -> None:
        shown = "\n".join(self.failures[:20])
        assert not self.failures, f"{len(self.failures)} of {self.states} power-loss states failed:\n{shown}"


def check_sender_run(journal: str, scratch: pathlib.Path, *, promised: bool) -> Verdicts:
    verdicts = Verdicts()
    for index, (kind, variants, counters) in enumerate(replay(journal)):
        for variant, state, content in variants:
            verdicts.states += 1
            where = f"{kind} point {index} ({variant}, {counters['ack']} acknowledged)"
            seqs, error = open_state(state, content, scratch, "check")
            if error is not None:
                verdicts.add(where, f"{type(error).__name__}: {error}")
            elif seqs != list(range(len(seqs))):
                verdicts.add(where, f"not a prefix of what was sent: {seqs[:20]}...")
            elif (promised or kind == "settled") and len(seqs) < counters["ack"]:
                verdicts.add(where, f"only {len(seqs)} records survived, {counters['ack']} were acknowledged")
    return verdicts


def run_sender(tmp_path: pathlib.Path, options: dict[str, Any]) -> str:
    queue = tmp_path / "queue"
    queue.mkdir()
    journal = str(tmp_path / "durability.journal")
    outcome = call_in_child(powerloss_sender, str(queue), journal, options)
    assert outcome.error_type is None and outcome.exitcode == 0, outcome
    return journal


def test_sync_always_sender_loses_no_acknowledged_record(tmp_path: pathlib.Path, scratch: pathlib.Path) -> None:
    journal = run_sender(tmp_path, {"sync": "always", "count": 160})
    verdicts = check_sender_run(journal, scratch, promised=True)
    verdicts.assert_clean()
    record_figure("power-loss states checked", verdicts.states)


def test_group_commit_syncs_without_being_asked(tmp_path: pathlib.Path, scratch: pathlib.Path) -> None:
    journal = run_sender(tmp_path, {"sync": 0.02, "count": 240, "pause": 0.002, "settle": True})
    verdicts = check_sender_run(journal, scratch, promised=False)
    verdicts.assert_clean()
    record_figure("power-loss states checked", verdicts.states)


def test_sync_always_receiver_never_undoes_a_commit(tmp_path: pathlib.Path, scratch: pathlib.Path) -> None:
    queue = tmp_path / "queue"
    count = 120
    from _harness import make_record

    with segq.Sender(queue, segment_size=1024, sync="always") as sender:
        for seq in range(count):
            sender.send(make_record("p", seq, seq % 50))
    journal = str(tmp_path / "durability.journal")
    outcome = call_in_child(powerloss_receiver, str(queue), journal, {"sync": "always"})
    assert outcome.error_type is None and outcome.exitcode == 0, outcome
    verdicts = Verdicts()
    for index, (kind, variants, counters) in enumerate(replay(journal)):
        for variant, state, content in variants:
            verdicts.states += 1
            where = f"{kind} point {index} ({variant}, {counters['committed']} committed)"
            seqs, error = open_state(state, content, scratch, "default")
            start = seqs[0] if seqs else count
            if error is not None:
                verdicts.add(where, f"{type(error).__name__}: {error}")
            elif seqs != list(range(start, count)):
                verdicts.add(where, f"records lost or out of order: {seqs[:20]}...")
            elif start < counters["committed"]:
                verdicts.add(where, f"committed records came back: restarted at {start}")
            elif start > counters["received"]:
                verdicts.add(where, f"records never received were skipped: restarted at {start}")
    verdicts.assert_clean()
    record_figure("power-loss states checked", verdicts.states)


def test_sync_always_on_both_sides_at_once(tmp_path: pathlib.Path, scratch: pathlib.Path) -> None:
    """A sender and a receiver at work together, both ``sync="always"``.

    Every state keeps every acknowledged record and never undoes a commit, or
    else, in one documented race, reports it: a receiver may commit a record
    in the instant between its publication and the sender's fdatasync, so
    after a power loss its durable position can lie past the durable end of
    the queue.  Opening that receiver then raises ``CorruptionError`` naming
    its cursor (``segq recover`` resets it); the records beyond were never
    acknowledged to their sender.
    """
    from _harness import CONTEXT

    queue = tmp_path / "queue"
    with segq.Sender(queue, segment_size=1024):
        segq.Receiver(queue).close()
    journal = str(tmp_path / "durability.journal")
    sender = CONTEXT.Process(
        target=powerloss_sender, args=(str(queue), journal, {"sync": "always", "count": 150, "pause": 0.003})
    )
    receiver = CONTEXT.Process(
        target=powerloss_receiver,
        args=(str(queue), journal, {"sync": "always", "initial": False, "count": 150, "idle": 10}),
    )
    sender.start()
    try:
        while not os.path.exists(journal) or os.path.getsize(journal) == 0:
            sender.join(0.01)  # the sender journals the queue as it found it first
        receiver.start()
        sender.join(120)
        receiver.join(120)
    finally:
        for process in (sender, receiver):
            if process.exitcode is None and process.pid is not None:
                process.kill()
                process.join()
    assert sender.exitcode == 0 and receiver.exitcode == 0
    verdicts = Verdicts()
    for index, (kind, variants, counters) in enumerate(replay(journal)):
        for variant, state, content in variants:
            verdicts.states += 1
            where = (
                f"{kind} point {index} ({variant}, {counters['ack']} acknowledged, {counters['committed']} committed)"
            )
            seqs, error = open_state(state, content, scratch, "default")
            if error is not None:
                if not (isinstance(error, segq.CorruptionError) and "past the end of the queue" in str(error)):
                    verdicts.add(where, f"{type(error).__name__}: {error}")
                continue
            start = seqs[0] if seqs else counters["received"]
            if seqs != list(range(start, start + len(seqs))):
                verdicts.add(where, f"records lost or out of order: {seqs[:20]}...")
            elif start < counters["committed"]:
                verdicts.add(where, f"committed records came back: restarted at {start}")
            elif start > counters["received"]:
                verdicts.add(where, f"records never received were skipped: restarted at {start}")
            elif start + len(seqs) < counters["ack"]:
                verdicts.add(where, f"acknowledged records lost: {start + len(seqs)} of {counters['ack']} there")
    verdicts.assert_clean()
    record_figure("power-loss states checked", verdicts.states)
