"""The single-call harness: run one function in a child process (as another user if asked) and report how it ended.

A crash, a signal or an exception in the child is an outcome the test looks
at (:class:`ChildOutcome`), never something the test process feels.
"""

from __future__ import annotations

import dataclasses
import os
import signal
from typing import Any

import segq
from _harness import CHILD_TIMEOUT, CONTEXT, Journal, drain

__all__ = [
    "ChildOutcome",
    "call_in_child",
    "open_receiver_and_read",
    "open_sender_and_send",
    "send_until_killed_in_rollover",
]


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
