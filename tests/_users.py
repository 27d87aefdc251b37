"""Child processes running as another Unix user, for the shared-queue tests in ``test_hardening.py``.

The children come from the harness's fork server (segq already imported),
then drop to the user's uid, its primary group only and umask 022, as a
login would; an ``exec`` is not possible here, since the interpreter may
live where another user cannot read it.
"""

from __future__ import annotations

import fcntl
import os
from typing import Any

from _harness import CONTEXT

import segq

__all__ = ["run_as", "send_many", "probe_locks", "open_receiver", "open_work_queue", "open_send_close", "attach_and_die", "start"]


def _become_and_call(connection: Any, uid: int, gid: int, target: Any, args: tuple[Any, ...]) -> None:
    try:
        os.setgroups([gid])
        os.setgid(gid)
        os.setuid(uid)
        os.umask(0o022)
        value = target(*args)
    except BaseException as error:  # noqa: BLE001 - reported to the parent
        connection.send(("error", f"{type(error).__name__}: {error}"))
    else:
        connection.send(("value", value))


def start_as(uid: int, gid: int, target: Any, *args: Any) -> tuple[Any, Any]:
    """Start ``target(*args)`` as ``uid``/``gid``; return (process, connection) for :func:`finish`."""
    receiving, sending = CONTEXT.Pipe(duplex=False)
    process = CONTEXT.Process(target=_become_and_call, args=(sending, uid, gid, target, args), daemon=True)
    process.start()
    sending.close()
    return process, receiving


def finish(started: tuple[Any, Any], timeout: float = 300) -> tuple[str, Any]:
    """Wait for a child of :func:`start_as`; return ("value", v) or ("error", text) (or ("died", exitcode))."""
    process, receiving = started
    try:
        message = receiving.recv() if receiving.poll(timeout) else ("died", None)
    except EOFError:
        message = ("died", None)
    finally:
        process.join(timeout)
        if process.exitcode is None:
            process.kill()
            process.join()
        receiving.close()
    if message[0] == "died":
        return "died", process.exitcode
    return message  # type: ignore[no-any-return]


def start(target: Any, *args: Any) -> tuple[Any, Any]:
    """Start ``target(*args)`` as the current user; return (process, connection) for :func:`finish`."""
    receiving, sending = CONTEXT.Pipe(duplex=False)
    process = CONTEXT.Process(target=_call, args=(sending, target, args), daemon=True)
    process.start()
    sending.close()
    return process, receiving


def _call(connection: Any, target: Any, args: tuple[Any, ...]) -> None:
    try:
        value = target(*args)
    except BaseException as error:  # noqa: BLE001 - reported to the parent
        connection.send(("error", f"{type(error).__name__}: {error}"))
    else:
        connection.send(("value", value))


def run_as(uid: int, gid: int, target: Any, *args: Any) -> tuple[str, Any]:
    return finish(start_as(uid, gid, target, *args))


def send_many(path: str, tag: str, count: int) -> int:
    """Send ``count`` records tagged ``tag`` in batches of ten; return how many."""
    with segq.Sender(path, segment_size=1 << 16) as sender:
        for first in range(0, count, 10):
            sender.send_batch([b"%s:%06d:" % (tag.encode(), j) + b"x" * 60 for j in range(first, first + 10)])
    return count


def open_send_close(path: str, tag: str, rounds: int) -> list[str]:
    """Open a Sender, send one record and close it, ``rounds`` times; return the errors met (none expected)."""
    errors = []
    for seq in range(rounds):
        try:
            with segq.Sender(path, segment_size=1 << 16) as sender:
                sender.send(b"%s:%06d:" % (tag.encode(), seq) + b"x" * 60)
        except segq.SegqError as error:
            errors.append(f"{type(error).__name__}: {error}")
    return errors


def attach_and_die(path: str) -> None:
    """Open a Sender, send one record and die by SIGKILL while attached (its semaphore is left)."""
    sender = segq.Sender(path, segment_size=1 << 16)
    sender.send(b"sent by a process about to die")
    os.kill(os.getpid(), 9)


def open_receiver(path: str, name: str) -> int:
    """Open receiver ``name``, read and commit everything; return how many records."""
    count = 0
    with segq.Receiver(path, name) as receiver:
        while (message := receiver.try_recv()) is not None:
            message.commit()
            count += 1
    return count


def open_queue_file(path: str) -> str:
    """Open ``path`` as segq opens its private files (``_fs.open_file``); return "opened" or the error's name."""
    from segq._fs import open_file

    try:
        os.close(open_file(path, os.O_RDWR, private=True))
    except OSError as error:
        return type(error).__name__
    return "opened"


def make_dir_and_file(queue: str, part: str) -> str:
    """Make ``queue/part`` as segq makes its directories and open a new file in it; return "opened" or the error."""
    from segq._fs import make_dir

    try:
        directory = make_dir(queue, part)
    except segq.SegqError as error:
        return f"SegqError: {error}"
    return open_queue_file(os.path.join(directory, "member.lock"))


def open_work_queue(path: str, group: str) -> None:
    with segq.WorkQueue(path, group):
        pass


def probe_locks(path: str, names: list[str]) -> dict[str, str]:
    """Try to open and flock each of ``names`` in queue ``path``; also read every segment's header."""
    outcome = {}
    for name in names:
        try:
            fd = os.open(os.path.join(path, name), os.O_RDONLY)
        except PermissionError:
            outcome[name] = "refused"
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            outcome[name] = "LOCKED"
        except OSError:
            outcome[name] = "busy"
        finally:
            os.close(fd)
    for segment in sorted(name for name in os.listdir(path) if name.endswith(".seg")):
        with open(os.path.join(path, segment), "rb") as handle:
            outcome[segment] = "readable" if len(handle.read(64)) == 64 else "short"
    return outcome
