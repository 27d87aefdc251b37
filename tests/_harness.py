"""What the child-process harnesses share: the fork server, records, journals, figures.

The harnesses themselves are ``_fleet`` (producers and consumers SIGKILLed at
random and restarted, checked by a ledger), ``_calls`` (one call in a child
process, its outcome reported) and ``_powerloss`` (syncs recorded, power
losses simulated).  Children run in a ``forkserver`` context with segq
preloaded, so a child starts in milliseconds and the test process never
forks itself.  What a child has done must survive its SIGKILL, so it keeps a
*journal*: an append-only file written with one ``os.write`` per line
(``O_APPEND``), which the kernel keeps whole once the call returns.
"""

from __future__ import annotations

import fcntl
import json
import multiprocessing
import os

import segq

__all__ = [
    "CONTEXT",
    "CHILD_TIMEOUT",
    "Journal",
    "drain",
    "make_record",
    "parse_record",
    "read_journal",
    "record_figure",
]

CONTEXT = multiprocessing.get_context("forkserver")
# segq imports portalocker, psutil and recovery code only when used (issue 14);
# children that drop to user nobody could not import them (this Python lives
# under /root), so the fork server loads them, as a program that drops
# privileges after start-up would have to; the harnesses too, whose functions
# children run.
CONTEXT.set_forkserver_preload(
    ["segq", "segq.recovery", "portalocker", "psutil", "encodings.ascii", __name__, "_fleet", "_calls", "_powerloss"]
)

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


def drain(path: str | os.PathLike[str], name: str = "default") -> list[bytes]:
    """Open receiver ``name`` in this process and receive and commit everything there is."""
    got = []
    with segq.Receiver(path, name) as receiver:
        while (message := receiver.try_recv()) is not None:
            got.append(message.data)
            message.commit()
    return got


def ack_all(queue: segq.WorkQueue) -> list[bytes]:
    """Claim and ack every job ``queue`` can claim now; return their data in claim order."""
    seen = []
    while (job := queue.try_claim()) is not None:
        seen.append(job.data)
        job.ack()
    return seen


def group_drained(path: str | os.PathLike[str], group: str = "default") -> bool:
    """Tell whether ``group`` of the queue at ``path`` has done every record sent so far (False while it opens)."""
    from segq.workqueue import group_info

    if not os.path.exists(os.path.join(path, "groups", group)):
        return False
    try:
        info = group_info(path, group)
    except (segq.SegqError, OSError):
        return False  # a worker is creating the group right now
    from segq._control import Control

    control = Control(path)
    try:
        tail = control.tail()
    finally:
        control.close()
    mark = info["low_water_mark"]
    return not info["claims"] and not info["waiting"] and segq.Position(mark["segment"], mark["offset"]) == tail


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
