"""Kill loops: senders and receivers SIGKILLed at random instants lose nothing.

Producers and receivers run as child processes (``_fleet``); the parent
kills one at a random instant, starts a new incarnation, and repeats.  At the
end every child is killed, a receiver per name drains what is left, and the
journals are checked (``_fleet.Ledger``): every record whose send returned is
delivered to every receiver name, in order, with no gap and no duplicate
beyond the group that was in flight when a receiver died, batches whole and
contiguous; a record a receiver committed never comes back.

The default run does a few hundred kills; ``-m soak`` runs the same loops for
``SEGQ_SOAK_SECONDS`` (default 300) seconds.
"""

from __future__ import annotations

import os
import pathlib
import random
import time

import pytest
from _fleet import Fleet, Ledger
from _harness import drain, record_figure

import segq

SEGMENT_SIZE = 8192  # small: kills land in rollovers, seals and deletions all the time


def prepare_queue(path: str, names: list[str], segment_size: int = SEGMENT_SIZE) -> None:
    """Create the queue and register every receiver name before anything is sent."""
    segq.Sender(path, segment_size=segment_size).close()
    for name in names:
        segq.Receiver(path, name).close()


def verify(fleet: Fleet, names: list[str]) -> int:
    """Kill what is left, drain each name, check the journals; return the records checked."""
    fleet.kill_all()
    fleet.assert_no_failures()
    ledger = Ledger(fleet)
    orders = {}
    for name in names:
        order = ledger.consumer_stream(name, drain(fleet.path, name))
        ledger.check_stream(order)
        orders[name] = order
    first = orders[names[0]]
    for name in names[1:]:
        assert orders[name] == first, f"receivers {names[0]} and {name} saw different queue orders"
    assert ledger.acknowledged > 0, "no send ever returned: the loop tested nothing"
    return len(first) * len(names)


def kill_loop(
    tmp_path: pathlib.Path,
    *,
    producers: int,
    names: list[str],
    kills: int,
    seed: int,
    deadline: float | None = None,
    producer_options: dict | None = None,
    consumer_options: dict | None = None,
) -> tuple[int, int]:
    """Run one kill loop; return (kills survived, records checked)."""
    path = str(tmp_path / "queue")
    workdir = tmp_path / "journals"
    workdir.mkdir()
    rng = random.Random(seed)
    producer_options = {"segment_size": SEGMENT_SIZE, "pause": 0.002, **(producer_options or {})}
    prepare_queue(path, names, producer_options["segment_size"])
    with Fleet(path, str(workdir)) as fleet:
        for _ in range(producers):
            fleet.add_producer(**producer_options)
        for name in names:
            fleet.add_consumer(name, **(consumer_options or {}))
        fleet.start_all()
        fleet.random_kills(rng, kills, max_pause=0.03, deadline=deadline)
        checked = verify(fleet, names)
        return fleet.kills, checked


@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    ("sync", "kills"),
    [("never", 160), ("always", 50), (0.02, 50)],
    ids=["sync-never", "sync-always", "group-commit"],
)
def test_random_kills_of_senders_and_receivers(tmp_path: pathlib.Path, sync: object, kills: int) -> None:
    survived, checked = kill_loop(
        tmp_path,
        producers=3,
        names=["alpha", "beta"],
        kills=kills,
        seed=kills,
        producer_options={"sync": sync},
        consumer_options={"sync": sync},
    )
    record_figure("kills survived", survived)
    record_figure("records checked", checked)


@pytest.mark.timeout(300)
def test_random_kills_under_backpressure(tmp_path: pathlib.Path) -> None:
    """Senders blocked on max_queue_bytes, receivers committing to make room, all of them killed."""
    survived, checked = kill_loop(
        tmp_path,
        producers=3,
        names=["only"],
        kills=60,
        seed=7,
        producer_options={"pause": 0.0, "max_queue_bytes": 24 * 1024},
    )
    record_figure("kills survived", survived)
    record_figure("records checked", checked)


@pytest.mark.timeout(300)
def test_kills_while_the_queue_is_being_created(tmp_path: pathlib.Path) -> None:
    """Processes racing to create and rebuild a queue, killed within milliseconds of starting."""
    rng = random.Random(11)
    survived = checked = 0
    for round_number in range(25):
        round_dir = tmp_path / f"round{round_number}"
        path = str(round_dir / "queue")
        workdir = round_dir / "journals"
        workdir.mkdir(parents=True)
        with Fleet(path, str(workdir)) as fleet:
            for _ in range(2):
                fleet.add_producer(segment_size=1024, max_size=100, pause=0.001)
            fleet.start_all()
            time.sleep(rng.random() * 0.08)
            for _ in range(3):
                fleet.restart(rng.choice(fleet.children))
                time.sleep(rng.random() * 0.02)
            fleet.kill_all()
            fleet.assert_no_failures()
            ledger = Ledger(fleet)
            if not os.path.isdir(path):
                # Killed before any Sender got far enough to create the directory.
                assert ledger.acknowledged == 0
                survived += fleet.kills
                continue
            order = ledger.consumer_stream("late", drain(path, "late"))
            ledger.check_stream(order)
            survived += fleet.kills
            checked += len(order)
    record_figure("kills survived", survived)
    record_figure("records checked", checked)


@pytest.mark.soak
@pytest.mark.timeout(0)
def test_soak_random_kills(tmp_path: pathlib.Path) -> None:
    """The kill loop for ``SEGQ_SOAK_SECONDS``, in rounds of about a minute, cycling the sync policies."""
    duration = float(os.environ.get("SEGQ_SOAK_SECONDS", "300"))
    end = time.monotonic() + duration
    policies: list[object] = ["never", "always", 0.02]
    round_number = 0
    while time.monotonic() < end:
        sync = policies[round_number % len(policies)]
        round_dir = tmp_path / f"round{round_number}"
        round_dir.mkdir()
        survived, checked = kill_loop(
            round_dir,
            producers=3,
            names=["alpha", "beta"],
            kills=10**9,
            seed=round_number,
            deadline=min(end, time.monotonic() + 60),
            producer_options={"sync": sync, "max_queue_bytes": 1 << 20},
            consumer_options={"sync": sync},
        )
        record_figure("soak kills survived", survived)
        record_figure("soak records checked", checked)
        round_number += 1


# -- regressions: the crash instants the kill loops found, made deterministic ------------


@pytest.mark.parametrize("point", ["created", "framed"])
@pytest.mark.parametrize("then", ["rebuild", "takeover"])
def test_sender_killed_in_a_rollover(tmp_path: pathlib.Path, point: str, then: str) -> None:
    """Killed holding the append lock in the middle of starting a new segment.

    ``created``: segment N+1 exists but N has no end marker yet.  ``framed``: N
    is sealed and N+1 holds a first record, but the tail was never published
    into it.  Then either every process is gone and the next one rebuilds the
    control file, or another sender takes the append lock over and appends
    to N.  Either way the queue must go on from N: nothing is lost, nothing
    unsent appears, and readers are not stuck at N's missing end marker.
    """
    from _calls import call_in_child, send_until_killed_in_rollover
    from _harness import read_journal

    path = str(tmp_path / "queue")
    prepare_queue(path, ["default"], 1024)
    journal = str(tmp_path / "journal")
    watcher = segq.Receiver(path, "watcher") if then == "takeover" else None
    try:
        outcome = call_in_child(send_until_killed_in_rollover, path, journal, 1024, point)
        assert outcome.signal == 9, outcome
        acknowledged = [int(line.split()[1]) for line in read_journal(journal)]
        assert acknowledged, "the child never got to its first rollover"
        with segq.Sender(path, segment_size=1024) as sender:  # a takeover when the watcher is attached
            for index in range(3):
                sender.send(b"after %d" % index)
    finally:
        if watcher is not None:
            watcher.close()
    got = drain(path, "default")
    before = [b"before %d" % i + b"." * 100 for i in acknowledged]
    after = [b"after %d" % i for i in range(3)]
    in_flight = [b"before %d" % (len(acknowledged)) + b"." * 100]
    assert got in (before + after, before + in_flight + after)
    with segq.Sender(path, segment_size=1024) as sender:
        for index in range(30):
            sender.send(b"later %d" % index + b"." * 100)
    assert drain(path, "default") == [b"later %d" % i + b"." * 100 for i in range(30)]


def test_a_process_killed_while_building_the_control_file(tmp_path: pathlib.Path) -> None:
    """Its file is left unfinished; a process that got it shared meanwhile retries instead of failing."""
    import threading

    import portalocker

    from segq import _control

    path = tmp_path / "queue"
    prepare_queue(str(path), ["default"])
    with segq.Sender(path, segment_size=SEGMENT_SIZE) as sender:
        sender.send(b"kept")
    control = path / _control.CONTROL_NAME
    control.write_bytes(bytes(_control.CONTROL_SIZE))  # zeroed, header not yet written
    peer = open(control, "rb")  # another attacher that got its shared lock at the same moment
    portalocker.lock(peer, portalocker.LockFlags.SHARED)
    releaser = threading.Timer(0.3, lambda: (portalocker.unlock(peer), peer.close()))
    releaser.start()
    try:
        with segq.Sender(path, segment_size=SEGMENT_SIZE) as sender:
            sender.send(b"new")
    finally:
        releaser.join()
    assert drain(str(path), "default") == [b"kept", b"new"]


def test_a_failed_open_lets_go_of_the_control_file(tmp_path: pathlib.Path) -> None:
    """An open that fails (here: an unsupported segment) must not keep the control file locked."""
    import struct
    import zlib

    from segq import _segment

    path = tmp_path / "queue"
    prepare_queue(str(path), [])
    segment = _segment.segment_path(path, 0)
    with open(segment, "r+b") as handle:
        header = bytearray(handle.read(32))
        header[8:12] = struct.pack("<I", 9)
        header[24:28] = struct.pack("<I", zlib.crc32(bytes(header[:24])))
        handle.seek(0)
        handle.write(header)
    with pytest.raises(segq.UnsupportedFormat) as first:
        segq.Receiver(path)
    # Still referenced (as a caller keeping the exception would): the next open must not hang.
    with pytest.raises(segq.UnsupportedFormat):
        segq.Sender(path, segment_size=SEGMENT_SIZE)
    del first
