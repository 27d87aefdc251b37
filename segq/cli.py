"""The ``segq`` command: use, inspect and repair queues from the shell.

Every command is a thin layer over the library.  Errors become one
``Error: ...`` line on stderr and exit status 1; bad usage exits 2 (click's
rule); nothing prints a traceback.  This is the only module that writes to
the terminal.  ``send`` and ``recv`` stop cleanly on SIGTERM and SIGINT:
the signal only interrupts a wait (for input, for a record, for room in the
output pipe, for the reader to read or acknowledge), never a read or write
that happened, an append or a commit; so ``send`` sends every line it read
and ``recv`` commits exactly the records delivered (see ``recv --help``).
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import io
import itertools
import json
import logging
import os
import select
import signal
import stat
import struct
import sys
import termios
import threading
import time
from collections.abc import Callable, Iterator
from types import FrameType
from typing import IO, TYPE_CHECKING, Any, ClassVar, NoReturn, TypeVar

import click

from . import __version__
from ._args import MAX_INTERVAL, MIN_INTERVAL, check_interval
from ._control import CONTROL_MAGIC, CONTROL_NAME, existing_queue
from ._headers import encode_headers
from ._scan import position_json
from ._segment import MIN_SEGMENT_SIZE, SEGMENT_SIZE_LIMIT, list_segments, queue_segment_size
from ._state import CURSOR_DIR, ConsumerKind, check_name, list_cursors, receiver_lock_path
from .errors import Empty, SegqError
from .receiver import Message, Receiver
from .sender import Sender

__all__ = ["cli", "main"]


class _ImportedOnUse:
    """Stand in for a module, importing it at the first attribute access.

    ``segq --help`` and ``segq send`` need no recovery code: importing it
    (and portalocker and psutil with it) only for the commands that use it
    keeps every CLI call's start-up short (issue 14).
    """

    def __init__(self, name: str) -> None:
        self._name = name

    def __getattr__(self, attribute: str) -> Any:
        import importlib

        return getattr(importlib.import_module(self._name), attribute)


if TYPE_CHECKING:
    from . import recovery
else:
    recovery = _ImportedOnUse(f"{__package__}.recovery")

_Command = TypeVar("_Command", bound=Callable[..., Any])
_SEPARATORS = {"lines": b"\n", "null": b"\0", "raw": b""}


class CommandError(click.ClickException):
    """An error the user can act on: printed as one ``Error: ...`` line, exit status 1."""

    exit_code = 1


class _Group(click.Group):
    """Turns every library error into a ``CommandError``: one line, no traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except SegqError as error:
            raise CommandError(str(error)) from None
        except OSError as error:
            where = f"{error.filename}: " if error.filename else ""
            raise CommandError(f"{where}{error.strerror or error}") from None
        except KeyboardInterrupt:
            raise SystemExit(128 + signal.SIGINT) from None
        except Exception as error:  # noqa: BLE001 - the promise is: never a traceback
            raise CommandError(f"unexpected {type(error).__name__}: {error} (please report this)") from None


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="segq", message="%(prog)s %(version)s")
def cli() -> None:
    """segq: a durable, append-only, segmented file queue.

    A queue is a directory.  `segq send` appends stdin to it, `segq recv`
    prints what a named receiver has not committed yet; `segq info`,
    `segq verify` and `segq recover` inspect and repair it.  Run
    `segq demo` to watch a consumer killed mid-stream lose nothing.
    """
    logger = logging.getLogger("segq")
    if not logger.handlers:
        # The commands report what the library did; its log lines would repeat them.
        logger.addHandler(logging.NullHandler())


def main() -> None:
    """Run the ``segq`` command (the console script and ``python -m segq``)."""
    cli(prog_name="segq")


# -- output helpers ----------------------------------------------------------------


def _size(count: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if count < 1024 or unit == "GiB":
            return f"{count:,.0f} {unit}" if unit == "bytes" else f"{count:,.1f} {unit}"
        count /= 1024
    raise AssertionError("unreachable")


def _count(number: int, noun: str) -> str:
    """Return ``number`` with thousands separators and ``noun`` in the right number: "1 record", "2,000 records"."""
    return f"{number:,} {noun}{'' if number == 1 else 's'}"


def _where(queue_dir: str, path: str) -> str:
    """Show ``path`` relative to the queue directory (the report names the queue once)."""
    relative = os.path.relpath(path, queue_dir)
    return path if relative.startswith("..") else relative


def _print_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=True))


@contextlib.contextmanager
def _progress(label: str, total: int) -> Iterator[Callable[[int], None] | None]:
    """Yield a progress callback drawing a bar on a terminal, or None in a pipe."""
    if total <= 0 or not sys.stderr.isatty():
        yield None
        return
    with click.progressbar(length=total, label=label, file=sys.stderr) as bar:
        yield bar.update


class _EchoHandler(logging.Handler):
    """Library warnings (a torn tail cut on open, a lock taken over) as ``segq: ...`` lines on stderr."""

    def emit(self, record: logging.LogRecord) -> None:
        click.echo(f"segq: {record.getMessage()}", err=True)


@contextlib.contextmanager
def _library_warnings() -> Iterator[None]:
    """Show the library's warnings while a queue is open (repairs made on open are news to the user)."""
    logger = logging.getLogger("segq")
    handler = _EchoHandler(logging.WARNING)
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)


class _Stopped(Exception):
    """A SIGTERM or SIGINT arrived while it was safe to stop."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


class _Signals:
    """SIGTERM and SIGINT stop the command, but only inside ``interruptible()`` blocks.

    Outside them (an append, a commit) the signal is remembered and acted on
    at the next ``interruptible()``, so a stop never splits what must be whole.
    """

    def __init__(self) -> None:
        self.received: int | None = None
        self._interruptible = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _Signals:
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGTERM, signal.SIGINT):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc_info: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.received = signum
        if self._interruptible:
            self._interruptible = False
            raise _Stopped(signum)

    @contextlib.contextmanager
    def interruptible(self) -> Iterator[None]:
        if self.received is not None:
            raise _Stopped(self.received)
        self._interruptible = True
        try:
            yield
        finally:
            self._interruptible = False


def _exit_for_signal(signum: int) -> NoReturn:
    raise SystemExit(128 + signum)


class _NameParam(click.ParamType[str]):
    """A receiver or group name, checked as the library checks it (a bad one is bad usage: exit 2)."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.name = what.split()[0].upper()

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        try:
            return check_name(value, self.what)
        except SegqError as error:
            self.fail(str(error), param, ctx)


def _queue_argument(command: _Command) -> _Command:
    return click.argument("path", type=click.Path(path_type=str))(command)


def _consumer_option(flag: str, what: str, help: str) -> Callable[[_Command], _Command]:
    """Return the option naming a receiver or group (``what``), checked like the library checks it."""
    return click.option(flag, type=_NameParam(what), default="default", show_default=True, help=help)


def _framing_options(command: _Command) -> _Command:
    command = click.option("--raw", "framing", flag_value="raw", help="Send the whole input as one record.")(command)
    command = click.option("--null", "framing", flag_value="null", help="Records end with a NUL byte.")(command)
    return click.option(
        "--lines", "framing", flag_value="lines", default=True, help="Records end with a newline (the default)."
    )(command)


def _output_framing_options(command: _Command) -> _Command:
    command = click.option(
        "--raw",
        "framing",
        flag_value="raw",
        help="Write records back to back, nothing between them (for records that mark their own ends).",
    )(command)
    command = click.option("--null", "framing", flag_value="null", help="Write a NUL byte after each record.")(command)
    return click.option(
        "--lines", "framing", flag_value="lines", default=True, help="Write a newline after each record (the default)."
    )(command)


# -- send and recv ---------------------------------------------------------------------


class _SizeParam(click.ParamType[int]):
    """A byte count with an optional unit (64K, 64MiB), from ``minimum`` up to but not including ``limit``."""

    name = "size"

    def __init__(self, minimum: int = 0, limit: int | None = None) -> None:
        self.minimum = minimum
        self.limit = limit
    _UNITS: ClassVar[dict[str, int]] = {
        "": 1,
        "k": 1 << 10,
        "kib": 1 << 10,
        "m": 1 << 20,
        "mib": 1 << 20,
        "g": 1 << 30,
        "gib": 1 << 30,
    }

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int):
            return value
        text = str(value).strip().lower()
        digits = text.rstrip("kmgib")
        try:
            size = int(digits) * self._UNITS[text[len(digits) :]]
        except (ValueError, KeyError):
            self.fail(f"{value!r} is not a size (examples: 65536, 64K, 64MiB)", param, ctx)
        if size < self.minimum or (self.limit is not None and size >= self.limit):
            top = f" and below {_size(self.limit)}" if self.limit is not None else ""
            self.fail(f"{value!r}: use at least {self.minimum} bytes{top}", param, ctx)
        return size


class _SyncParam(click.ParamType["str | float"]):
    name = "never|always|SECONDS"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str | float:
        if value in ("never", "always"):
            return str(value)
        try:
            return check_interval(float(value), "sync")
        except (ValueError, TypeError):
            self.fail(
                f"{value!r}: use never, always or a number of seconds from {MIN_INTERVAL} to {MAX_INTERVAL:g}",
                param,
                ctx,
            )


class _SecondsParam(click.ParamType[float]):
    """A timeout in seconds: finite, not negative (NaN and inf are usage errors, exit 2)."""

    name = "seconds"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> float:
        try:
            seconds = float(value)
        except (ValueError, TypeError):
            self.fail(f"{value!r} is not a number of seconds", param, ctx)
        if not 0 <= seconds < 1e9:
            self.fail(f"{value!r}: give a finite number of seconds >= 0", param, ctx)
        return seconds


def _parse_headers(ctx: click.Context, param: click.Parameter, items: tuple[str, ...]) -> dict[str, bytes]:
    """Turn repeated --header NAME=VALUE options into headers; refuse (exit 2) what a Sender would refuse."""
    headers: dict[str, bytes] = {}
    for item in items:
        name, equals, value = item.partition("=")
        if not equals:
            raise click.BadParameter(f"{item!r}: use NAME=VALUE", ctx, param)
        headers[name] = value.encode("utf-8", "surrogateescape")
    try:
        encode_headers(headers)
    except SegqError as error:
        raise click.BadParameter(str(error), ctx, param) from None
    return headers


@cli.command()
@_queue_argument
@_framing_options
@click.option(
    "--segment-size",
    type=_SizeParam(MIN_SEGMENT_SIZE, SEGMENT_SIZE_LIMIT),
    help="Largest size of new segment files; they start at 1MiB and double up to it "
    "[default: 64MiB, or the queue's if it has segments under 1MiB].",
)
@click.option(
    "--sync",
    type=_SyncParam(),
    default="never",
    show_default=True,
    help="Power-loss durability: never, always (fsync per write), or a group-commit interval in seconds.",
)
@click.option(
    "--header",
    "header_items",
    multiple=True,
    metavar="NAME=VALUE",
    callback=_parse_headers,
    help="Give every record this header (repeat for more).",
)
def send(
    path: str, framing: str, segment_size: int | None, sync: str | float, header_items: dict[str, bytes]
) -> None:
    """Append stdin to the queue at PATH, one record per line.

    The queue is created if missing.  Input is sent as it arrives, in atomic
    batches; once sent, a record survives a crash of any process.  SIGTERM
    or SIGINT stops it between records: what was read is sent, a last line
    without its newline is not.  Exits 128+N on signal N.
    """
    _refuse_a_foreign_directory(path)
    if segment_size is None:
        segment_size = queue_segment_size(path)  # a queue made with small segments keeps them
    stdin = _Stream(_standard_stream(sys.stdin, "input"), signals := _Signals())
    with _library_warnings(), signals:
        try:
            with signals.interruptible():  # opening may wait for another process's lock
                opened = Sender(path, segment_size=segment_size, sync=sync)
            with opened as sender:
                headers = header_items or None
                if framing == "raw":
                    sender.send(b"".join(iter(stdin.read, b"")), headers=headers)
                else:
                    _send_stream(sender, stdin, _SEPARATORS[framing], headers)
        except _Stopped as stop:
            _exit_for_signal(stop.signum)


def _refuse_a_foreign_directory(path: str) -> None:
    """Refuse to make a queue in a directory that holds other things (and could hold a file named segq.ctl)."""
    try:
        entries = os.listdir(path)
    except (FileNotFoundError, NotADirectoryError):
        return  # a new queue, or a file: the Sender says so
    if not entries or list_segments(path) or os.path.isdir(os.path.join(path, CURSOR_DIR)):
        return
    with contextlib.suppress(OSError), open(os.path.join(path, CONTROL_NAME), "rb") as control:
        # Ours, or one a Sender began and never finished (zeros until its header is written).
        if control.read(len(CONTROL_MAGIC)) in (CONTROL_MAGIC, bytes(len(CONTROL_MAGIC)), b""):
            return
    raise CommandError(
        f"{path} is not a segq queue and not empty ({_count(len(entries), 'file')}, e.g. {sorted(entries)[0]!r}): "
        "send creates a queue only in a new or empty directory"
    )


class _Stream:
    """Standard input or output where a signal interrupts only the wait, never a read or write done.

    A real file descriptor is polled (interruptibly) and then read or
    written without interruption, in pieces that cannot block; a stream
    without one (click's test runner) is used directly.
    """

    def __init__(self, stream: IO[bytes], signals: _Signals) -> None:
        self.stream = stream
        self.signals = signals
        try:
            self.fd: int | None = stream.fileno()
            mode = os.fstat(self.fd).st_mode
            # A pipe that polls writable takes PIPE_BUF bytes without blocking.
            self.piece = select.PIPE_BUF if stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode) else 1 << 20
        except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
            self.fd = None
            self.piece = 1 << 20

    def _wait(self, event: int) -> None:
        assert self.fd is not None
        poller = select.poll()
        poller.register(self.fd, event)
        with self.signals.interruptible():
            poller.poll()

    def read(self) -> bytes:
        """Return what is available (at least a byte), or b"" at the end of input."""
        if self.fd is None:
            with self.signals.interruptible():
                return getattr(self.stream, "read1", self.stream.read)(1 << 20)
        self._wait(select.POLLIN)
        return os.read(self.fd, 1 << 20)

    def write(self, data: bytes) -> int:
        """Write ``data``; return how much was written when a signal stopped it (all of it otherwise).

        Raises ``_WriteFailed`` (saying how much went out) when the reader closed its end.
        """
        if self.fd is None:
            try:
                self.stream.write(data)
                self.stream.flush()
            except BrokenPipeError:
                raise _WriteFailed(0) from None
            return len(data)
        written = 0
        with memoryview(data) as view:
            while written < len(data):
                try:
                    self._wait(select.POLLOUT)
                except _Stopped:
                    return written
                try:
                    written += os.write(self.fd, view[written : written + self.piece])
                except BrokenPipeError:
                    raise _WriteFailed(written) from None
        return written


class _WriteFailed(Exception):
    """The reader closed the output after ``written`` bytes of a write went out."""

    def __init__(self, written: int) -> None:
        super().__init__(written)
        self.written = written


def _send_stream(sender: Sender, stdin: _Stream, separator: bytes, headers: dict[str, bytes] | None = None) -> None:
    partial = b""
    while chunk := stdin.read():
        records = (partial + chunk).split(separator)
        partial = records.pop()
        _send_records(sender, records, headers)
        if len(partial) > sender.max_record_size:
            sender.send(partial)  # raises RecordTooLarge with the limit in its message
    if partial:
        _send_records(sender, [partial], headers)


def _send_records(sender: Sender, records: list[bytes], headers: dict[str, bytes] | None = None) -> None:
    """Send in batches: each is one atomic append, small next to a segment so little space is left unused."""
    limit = min(1 << 20, sender.segment_size // 16)
    batch: list[bytes] = []
    size = 0
    for record in records:
        framed = len(record) + 8
        if batch and size + framed > limit:
            sender.send_batch(batch if headers is None else [(data, headers) for data in batch])
            batch, size = [], 0
        if framed > limit:
            sender.send(record, headers=headers)  # alone; raises RecordTooLarge past max_record_size
            continue
        batch.append(record)
        size += framed
    if batch:
        sender.send_batch(batch if headers is None else [(data, headers) for data in batch])


@cli.command()
@_queue_argument
@_consumer_option("--name", "receiver name", "Receiver name: each name sees every record.")
@click.option("-n", "--count", type=click.IntRange(min=1), help="Stop after N records.")
@click.option("-f", "--follow", is_flag=True, help="Keep waiting for new records (until -n, --timeout or a signal).")
@click.option(
    "--timeout",
    type=_SecondsParam(),
    help="Stop when no record arrives for this many seconds (default: at once without --follow).",
)
@click.option(
    "--batch",
    type=click.IntRange(min=1),
    help="Write up to N records before they are delivered, committed together once all are "
    "[default: 1 into a pipe or with --ack-fd, 1000 into a file].",
)
@click.option(
    "--ack-fd",
    "ack_fd",
    type=click.IntRange(min=0),
    help="Commit a record only once acknowledged: one newline read from file descriptor FD per record, in order.",
)
@click.option("--create", is_flag=True, help="Create the queue if it is missing (a consumer started before its producers).")
@_output_framing_options
@click.option(
    "--json",
    "framing",
    flag_value="json",
    help="One JSON object per record and line: position, data and headers (bytes as text, or {\"base64\": ...}).",
)
def recv(
    path: str,
    name: str,
    count: int | None,
    follow: bool,
    timeout: float | None,
    batch: int | None,
    ack_fd: int | None,
    create: bool,
    framing: str,
) -> None:
    """Print what a receiver has not committed yet, one record per line.

    \b
    A record is committed only once it is delivered:
      into a file or device  when the write of it returned;
      into a pipe            when the reader has read it out of the pipe;
      with --ack-fd FD       when the reader acknowledged it on FD.
    What was not delivered comes again, so `segq recv q | head -1` takes
    one record per run.  recv writes at most --batch records ahead of
    what was delivered and commits them together once all are (a signal
    or a reader that goes away commits exactly the delivered ones).
    SIGTERM or SIGINT stops it that way (exit 128+N on signal N).
    Without --follow it stops when the queue is empty; when stdout (or
    the acknowledgement descriptor) is closed it exits quietly with status 0.
    A missing queue is an error unless --create; a queue deleted (or
    deleted and made again) while --follow waits is an error too: exit 1.
    """
    if not create and not os.path.lexists(path):
        raise CommandError(f"no queue at {path}: check the path, or use --create to make it and wait for its producers")
    separator = _SEPARATORS.get(framing)  # None: --json
    wait = timeout if timeout is not None else (None if follow else 0.0)
    stdout = _Stream(_standard_stream(sys.stdout, "output"), signals := _Signals())
    delivery = _delivery(stdout, ack_fd)
    with _library_warnings(), signals:
        try:
            with signals.interruptible():  # opening may wait for another process's lock
                opened = Receiver(path, name, create=create)
            with opened as receiver:
                _receive(receiver, delivery, separator, count, wait, batch or delivery.default_batch)
        except _Stopped as stop:
            _exit_for_signal(stop.signum)
        except _ReaderGone:
            _quiet_stdout()


class _ReaderGone(Exception):
    """The reader closed its end (stdout, or the acknowledgement descriptor)."""


class _Delivery:
    """Records written to stdout count as delivered once the write returned (a file or a device).

    ``deliver`` writes a batch and returns how many of its records were
    delivered: all of them, unless a signal arrived (then ``stopped`` is
    set) or the reader went away (``gone``).
    """

    default_batch = 1000

    def __init__(self, stdout: _Stream) -> None:
        self.stdout = stdout
        self.stopped: int | None = None
        self.gone = False

    def deliver(self, framed: list[bytes]) -> int:
        return _whole(framed, self._write(b"".join(framed)))

    def _write(self, data: bytes) -> int:
        try:
            written = self.stdout.write(data)
        except _WriteFailed as failure:
            self.gone = True
            return failure.written
        if written < len(data):
            self.stopped = self.stdout.signals.received or signal.SIGTERM
        return written

    def finish(self) -> NoReturn:
        """Raise what ended delivery early: ``_Stopped`` for a signal, ``_ReaderGone`` for a closed reader."""
        if self.stopped is not None:
            raise _Stopped(self.stopped)
        raise _ReaderGone()


def _whole(framed: list[bytes], written: int) -> int:
    """Return how many of the ``framed`` records lie wholly within the first ``written`` bytes."""
    return sum(1 for end in itertools.accumulate(map(len, framed)) if end <= written)


class _PipeDelivery(_Delivery):
    """Records written into a pipe count as delivered once the reader has read them out of it.

    Bytes still in the pipe when the reader exits are lost with it, so a
    batch is committed only when the pipe is empty again (``FIONREAD`` on
    the write end says how much is unread).  With one record in flight at
    a time, a reader that reads ahead and exits (``head -1``) takes one.
    """

    default_batch = 1
    _LONGEST_NAP = 0.02  # seconds between looks at a slow reader's pipe

    def deliver(self, framed: list[bytes]) -> int:
        written = self._write(b"".join(framed))
        return _whole(framed, written - self._unread_after_wait())

    def _unread_after_wait(self) -> int:
        """Wait until the reader has read everything (or went away, or a signal came); return what is unread."""
        fd = self.stdout.fd
        assert fd is not None
        poller = select.poll()
        poller.register(fd, 0)  # POLLERR alone: the reader closed its end
        nap = 0.0
        spins = 0
        while True:
            unread = _unread(fd)
            if unread == 0 or self.gone or self.stopped is not None:
                return unread
            if poller.poll(0):
                self.gone = True
                continue
            try:
                with self.stdout.signals.interruptible():
                    if spins < 64:
                        # A reader on another core usually empties the pipe
                        # within microseconds; yield before sleeping.
                        spins += 1
                        os.sched_yield()
                    else:
                        nap = min(max(nap * 2, 0.0001), self._LONGEST_NAP)
                        time.sleep(nap)
            except _Stopped as stop:
                self.stopped = stop.signum


def _unread(fd: int) -> int:
    count: int = struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0"))[0]
    return count


class _AckDelivery(_Delivery):
    """Records count as delivered once the reader acknowledged them: one newline on ``ack_fd`` per record."""

    default_batch = 1

    def __init__(self, stdout: _Stream, ack_fd: int) -> None:
        super().__init__(stdout)
        self.ack_fd = ack_fd

    def deliver(self, framed: list[bytes]) -> int:
        written = _whole(framed, self._write(b"".join(framed)))
        acked = 0
        poller = select.poll()
        poller.register(self.ack_fd, select.POLLIN)
        while acked < written:
            if self.stopped is not None or self.gone:
                if not poller.poll(0):
                    break  # stopping: take the acknowledgements already sent, wait for no more
            else:
                try:
                    with self.stdout.signals.interruptible():
                        poller.poll()
                except _Stopped as stop:
                    self.stopped = stop.signum
                    continue
            acks = os.read(self.ack_fd, 1 << 16)
            if not acks:
                self.gone = True
                break
            acked += acks.count(b"\n")
        if acked > written:
            raise CommandError(
                f"{acked} acknowledgements on file descriptor {self.ack_fd} for {written} records written: "
                "send one newline per record, after reading it"
            )
        return acked


def _delivery(stdout: _Stream, ack_fd: int | None) -> _Delivery:
    """Pick how delivery is known: acknowledgements, an emptied pipe, or a returned write."""
    if ack_fd is not None:
        try:
            os.fstat(ack_fd)
        except OSError as error:
            raise click.BadParameter(f"file descriptor {ack_fd} is not open ({error.strerror})", param_hint="--ack-fd")
        return _AckDelivery(stdout, ack_fd)
    if stdout.fd is not None and stat.S_ISFIFO(os.fstat(stdout.fd).st_mode):
        return _PipeDelivery(stdout)
    return _Delivery(stdout)


def _json_bytes(value: bytes) -> str | dict[str, str]:
    """Return bytes for JSON: as text when they are UTF-8, else as ``{"base64": ...}``."""
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        return {"base64": base64.b64encode(value).decode("ascii")}


def _json_record(message: Message) -> bytes:
    """Return one record as a line of JSON: its position, data and headers."""
    position = message.position
    record = {
        "position": {"segment": position.segment, "offset": position.offset},
        "data": _json_bytes(message.data),
        "headers": {name: _json_bytes(value) for name, value in message.headers.items()},
    }
    return json.dumps(record, sort_keys=True).encode("utf-8") + b"\n"


def _receive(
    receiver: Receiver, delivery: _Delivery, separator: bytes | None, count: int | None, wait: float | None, batch_size: int
) -> None:
    remaining = count
    while remaining is None or remaining > 0:
        try:
            with delivery.stdout.signals.interruptible():
                batch = receiver.recv_batch(min(remaining or batch_size, batch_size), timeout=wait)
        except Empty:
            return
        if separator is None:
            framed = [_json_record(message) for message in batch]
        else:
            framed = [message.data + separator for message in batch]
        delivered = delivery.deliver(framed)
        if delivered < len(batch):
            # Commit exactly the records delivered; the rest come again.
            batch.rollback()
            while delivered:
                delivered -= len(part := receiver.recv_batch(delivered, timeout=0))
                part.commit()
            delivery.finish()
        batch.commit()
        if remaining is not None:
            remaining -= len(batch)


def _standard_stream(stream: IO[str] | None, which: str) -> IO[bytes]:
    """Return the binary side of stdin or stdout, or a usage error when the shell closed it (``>&-``)."""
    buffer: IO[bytes] | None = getattr(stream, "buffer", None)
    if buffer is None:
        verb = "read from" if which == "input" else "write to"
        raise click.UsageError(f"standard {which} is closed; give the command something to {verb}")
    return buffer


def _quiet_stdout() -> None:
    # The reader went away: point stdout at /dev/null so the interpreter's
    # final flush does not complain about the broken pipe.
    with contextlib.suppress(OSError, ValueError, AttributeError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())


# -- inspection ----------------------------------------------------------------------------


@cli.command()
@_queue_argument
@click.option("--json", "as_json", is_flag=True, help="Print a JSON object (stable keys) instead of text.")
@click.option("--scan", is_flag=True, help="Also count records: reads every byte (a progress bar on a terminal).")
def info(path: str, as_json: bool, scan: bool) -> None:
    """Describe a queue: segments, bytes, backlogs, lock holders.

    Each consumer's backlog is the bytes it has not committed (and, with
    --scan, the records); each lock file names its PID and whether that
    process lives.  Without --scan it reads no record, so it is quick on
    any queue; JSON record counts are then null.  Needs only read access.
    """
    if scan:
        with _progress("counting", recovery.queue_bytes(path)) as progress:
            snapshot = recovery.info(path, scan=True, progress=progress)
    else:
        snapshot = recovery.info(path)
    if as_json:
        _print_json(snapshot.to_json())
        return
    segments = snapshot.segments
    numbers = f" ({segments[0][0]}..{segments[-1][0]})" if len(segments) > 1 else ""
    click.echo(f"queue      {snapshot.path} (format {snapshot.format_version})")
    click.echo(
        f"segments   {_count(len(segments), 'segment')}{numbers}, {_size(snapshot.segment_bytes)} in files, "
        f"{_size(snapshot.bytes_on_disk)} on disk"
    )
    data = _size(sum(size for _, _, size in segments))
    if snapshot.records is None:
        click.echo(f"records    {data} retained (`--scan` counts them); the tail is at {snapshot.tail}")
    else:
        click.echo(f"records    {_count(snapshot.records, 'record')} ({data}) retained; the tail is at {snapshot.tail}")
    if not snapshot.consumers:
        click.echo("consumers  none registered (a new receiver starts at the oldest record)")
    for consumer in snapshot.consumers:
        label = f"{consumer.kind:<9}  {consumer.name}"
        if consumer.position is None:
            click.echo(f"{label}: metadata unreadable ({consumer.problem}); run `segq recover`")
        elif consumer.backlog_records is None:
            click.echo(f"{label} at {consumer.position}: {_size(consumer.backlog_bytes)} not committed")
        else:
            click.echo(
                f"{label} at {consumer.position}: {_count(consumer.backlog_records, 'record')} "
                f"({_size(consumer.backlog_bytes)}) not committed"
            )
    for holder in snapshot.locks:
        state = "alive" if holder.alive else "dead: `segq unlock` removes it"
        click.echo(f"lock       {_where(snapshot.path, holder.path)}  PID {holder.pid} ({state})  {holder.what}")
    for group in snapshot.groups:
        if "problem" in group:
            click.echo(f"group      {group['group']}: cannot be read ({group['problem']})")
            continue
        click.echo(
            f"group      {group.get('group')}: {len(group.get('claims', []))} claims in flight, "
            f"{len(group.get('waiting', []))} waiting, {group.get('dead_letters_pending', 0)} dead letters pending"
        )
        stats = group.get("stats")
        if stats:
            age = stats["oldest_pending_age"]
            click.echo(
                f"           jobs: {stats['pending']} pending, {stats['scheduled']} scheduled, "
                f"{stats['claimed']} claimed, {stats['retrying']} retrying, {stats['done']} done, {stats['dead']} dead"
                + (f"; oldest pending {age:.1f} s" if age is not None else "")
            )


@cli.command()
@_queue_argument
@click.option("--json", "as_json", is_flag=True, help="Print a JSON object (stable keys) instead of text.")
def verify(path: str, as_json: bool) -> None:
    """Check every record's checksum; exit 1 on damage.

    Lists each damaged span by file and offset, and bytes an unfinished
    write left past the last record (not damage: cut when the queue next
    opens).  Shows a progress bar on a terminal.
    """
    with _progress("verifying", recovery.queue_bytes(path)) as progress:
        report = recovery.verify(path, progress=progress)
    if as_json:
        _print_json(report.to_json())
    else:
        click.echo(
            f"verified {report.path}: {_count(report.segments, 'segment')}, {_count(report.records, 'record')}, "
            f"{_size(report.bytes)}"
        )
        for damage in report.damaged:
            click.echo(
                f"damaged  {_where(report.path, damage.path)} offset {damage.offset}: "
                f"{damage.problem} ({damage.end - damage.offset} bytes)"
            )
        for torn in report.torn:
            click.echo(
                f"torn     {_where(report.path, torn.path)} bytes {torn.start}..{torn.end}: "
                "an unfinished write, cut when the queue next opens"
            )
    if not report.ok:
        spans = len(report.damaged)
        raise CommandError(
            f"{spans} damaged span{'s' if spans > 1 else ''} in {report.path}; "
            f"`segq recover {report.path}` repairs what it can"
        )


# -- repair ----------------------------------------------------------------------------------


@cli.command()
@_queue_argument
@_consumer_option("--name", "receiver name", "The receiver whose position to recover.")
@click.option("--loss", is_flag=True, help="Skip the rest of a damaged segment instead of stopping at it.")
@click.option("--dry-run", is_flag=True, help="Report what would be done; change nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as a JSON object (stable keys).")
def recover(path: str, name: str, loss: bool, dry_run: bool, as_json: bool) -> None:
    """Unlock dead owners, repair torn tails, restart a receiver.

    The default, replay, strategy loses nothing: the receiver restarts at
    its saved position (or at the oldest segment if that is unreadable), so
    a few records may come again, and it stops at a damaged record.  --loss
    moves a receiver whose segment is damaged ahead of it to the next
    segment, and reports how many records that gives up.  Running either
    twice changes nothing the second time.
    """
    strategy = recovery.recover_with_loss if loss else recovery.recover
    with _progress("scanning", recovery.queue_bytes(path)) as progress:
        report = strategy(path, name, dry_run=dry_run, progress=progress)
    if as_json:
        _print_json(report.to_json())
        return
    _print_recovery(report)
    for group in report.groups:
        for repair in group.repairs:
            click.echo(f"  group      {group.group!r}: {repair}")
        if group.returned:
            click.echo(f"  group      {group.group!r}: gave back {len(group.returned)} claims of dead workers")


def _print_recovery(report: recovery.RecoveryReport) -> None:
    queue_dir = report.path
    verb = "would recover" if report.dry_run else "recovered"
    click.echo(f"{verb} {queue_dir} ({report.strategy} strategy){' -- dry run, nothing changed' * report.dry_run}")
    for holder in report.unlocked:
        click.echo(f"  unlocked   {_where(queue_dir, holder.path)} ({holder.what}, dead PID {holder.pid})")
    for cut in report.cut:
        click.echo(f"  cut        {_where(queue_dir, cut.path)} bytes {cut.start}..{cut.end} ({cut.reason})")
    for header in report.headers:
        click.echo(f"  rewrote    {_where(queue_dir, header.path)} header ({header.reason})")
    for seal in report.sealed:
        click.echo(f"  sealed     {_where(queue_dir, seal.path)} at offset {seal.start} ({seal.reason})")
    for created in report.created:
        click.echo(f"  created    {_where(queue_dir, created)}")
    for damage in report.damaged:
        click.echo(f"  damaged    {_where(queue_dir, damage.path)} offset {damage.offset}: {damage.problem}")
    for name, position in report.receivers.items():
        previous = report.previous.get(name)
        change = "unchanged" if previous == position else f"was {previous or 'unreadable'}"
        click.echo(f"  receiver   {name!r} starts at {position} ({change})")
    if report.strategy == "loss":
        click.echo(f"  dropped    {_count(report.dropped_records, 'record')} ({_size(report.dropped_bytes)})")
    if report.deleted_segments:
        click.echo(f"  deleted    segments {', '.join(map(str, report.deleted_segments))}")
    for note in report.notes:
        click.echo(f"  note: {note}")
    if not report.changed and not report.damaged:
        click.echo("  nothing needed repair")


@cli.command("requeue-dead")
@_queue_argument
@_consumer_option("--group", "group name", "The work-queue group whose dead letters to requeue.")
@click.option("--dead-letter", "dead_letter", type=click.Path(), default=None, help="The dead-letter queue, if not PATH/dead/GROUP.")
@click.option("-n", "--count", type=click.IntRange(min=1), default=None, help="Requeue at most N letters.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON object (stable keys) instead of text.")
def requeue_dead(path: str, group: str, dead_letter: str | None, count: int | None, as_json: bool) -> None:
    """Move a group's dead letters back into the queue as new records.

    Each letter's original payload is sent again with fresh attempts, then the
    letter is committed in the dead-letter queue (read with its "default"
    receiver).  A crash mid-way can requeue a letter twice, never lose one.
    """
    groups = _group_admin()
    queue_dir = existing_queue(path)
    if dead_letter is None:
        _require_group(queue_dir, group)
    elif not os.path.isdir(dead_letter):
        raise CommandError(f"no dead-letter queue at {dead_letter}")
    moved = groups.requeue_dead(queue_dir, group, dead_letter=dead_letter, limit=count)
    if as_json:
        _print_json({"group": group, "requeued": moved})
    else:
        click.echo(f"requeued {_count(moved, 'dead letter')} of group {group!r}")


# -- consumers: receivers and work-queue groups ------------------------------------------------


def _group_admin() -> Any:
    """Return the module of the work-queue group admin calls (list_groups, group_info, requeue_dead)."""
    from .workqueue import _admin  # the one place that says where the group admin lives

    return _admin


def _require_group(queue_dir: str, group: str) -> None:
    known = _group_admin().list_groups(queue_dir)
    if group not in known:
        listed = f"its groups: {', '.join(known)}" if known else "it has none"
        raise CommandError(f"{queue_dir} has no work-queue group {group!r} ({listed})")


@cli.command()
@_queue_argument
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array (stable keys) instead of text.")
def receivers(path: str, as_json: bool) -> None:
    """List the queue's receivers: position, lag, and who has each open.

    The lag is the bytes a receiver has not committed (no record is read).
    A receiver that no one reads pins every segment from its position on:
    `segq remove-receiver` unregisters it.
    """
    snapshot = recovery.info(path)
    holders = {holder.path: holder for holder in snapshot.locks}
    rows: list[dict[str, Any]] = []
    for consumer in snapshot.consumers:
        if consumer.kind != "receiver":
            continue
        holder = holders.get(receiver_lock_path(snapshot.path, consumer.name))
        rows.append(
            {
                "name": consumer.name,
                "position": None if consumer.position is None else position_json(consumer.position),
                "lag_bytes": consumer.backlog_bytes,
                "holder": None if holder is None else {"pid": holder.pid, "alive": holder.alive},
                "problem": consumer.problem,
            }
        )
    if as_json:
        _print_json(rows)
        return
    if not rows:
        click.echo(f"no receivers registered in {snapshot.path}")
    for row in rows:
        holder = row["holder"]
        state = "not open" if holder is None else f"{'open by' if holder['alive'] else 'dead'} PID {holder['pid']}"
        if row["problem"] is not None:
            click.echo(f"{row['name']}: metadata unreadable ({row['problem']}); {state}")
            continue
        position = f"segment {row['position']['segment']} offset {row['position']['offset']}"
        click.echo(f"{row['name']}: at {position}, {_size(row['lag_bytes'])} behind; {state}")


@cli.command("remove-receiver")
@_queue_argument
@click.argument("name", type=_NameParam("receiver name"))
def remove_receiver(path: str, name: str) -> None:
    """Unregister receiver NAME, so it no longer holds back segment deletion.

    Segments every other consumer has passed are deleted.  Refuses, naming
    the PID, while a live process has that receiver open.
    """
    queue_dir = existing_queue(path)
    names = [found for kind, found, _ in list_cursors(queue_dir) if kind is ConsumerKind.RECEIVER]
    if name not in names:
        listed = f"its receivers: {', '.join(names)}" if names else "it has none"
        raise CommandError(f"{queue_dir} has no receiver {name!r} ({listed})")
    _remove_consumer(queue_dir, f"receiver {name!r}", lambda: Receiver.remove(queue_dir, name))


def _remove_consumer(queue_dir: str, what: str, remove: Callable[[], None]) -> None:
    """Run ``remove`` (unregister a consumer) and say what it removed and which segments went with it."""
    before = set(list_segments(queue_dir))
    remove()
    deleted = sorted(before - set(list_segments(queue_dir)))
    click.echo(f"removed {what} from {queue_dir}")
    if deleted:
        click.echo(f"deleted segments {', '.join(map(str, deleted))}")


@cli.command()
@_queue_argument
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array (stable keys) instead of text.")
def groups(path: str, as_json: bool) -> None:
    """List the queue's work-queue groups: claims in flight, retries, dead letters, lag.

    `segq remove-group` unregisters one that no worker uses any more.
    """
    snapshot = recovery.info(path)
    lags = {consumer.name: consumer.backlog_bytes for consumer in snapshot.consumers if consumer.kind == "group"}
    rows = [{**group, "lag_bytes": lags.get(group["group"])} for group in snapshot.groups]
    if as_json:
        _print_json(rows)
        return
    if not rows:
        click.echo(f"no work-queue groups in {snapshot.path}")
    for row in rows:
        if "problem" in row:
            click.echo(f"{row['group']}: cannot be read ({row['problem']})")
            continue
        lag = "" if row["lag_bytes"] is None else f", {_size(row['lag_bytes'])} behind"
        click.echo(
            f"{row['group']}: {_count(len(row['claims']), 'claim')} in flight, {len(row['waiting']):,} waiting to retry, "
            f"{_count(row['dead_letters_pending'], 'dead letter')} pending{lag}; {'open' if row['open'] else 'not open'}"
        )


@cli.command("remove-group")
@_queue_argument
@click.argument("group", type=_NameParam("group name"))
def remove_group(path: str, group: str) -> None:
    """Unregister work-queue GROUP: its claims and attempts are dropped, its dead letters kept.

    Segments every other consumer has passed are deleted.  Refuses while a
    live process has a WorkQueue of the group open.
    """
    from . import WorkQueue

    queue_dir = existing_queue(path)
    _require_group(queue_dir, group)
    _remove_consumer(queue_dir, f"group {group!r}", lambda: WorkQueue.remove(queue_dir, group))


@cli.command()
@_queue_argument
def unlock(path: str) -> None:
    """Remove the lock files of dead processes.

    Fails, naming the PID, if a live process holds a lock (after removing the
    dead ones).
    """
    queue_dir = os.fspath(path)
    holders = recovery.lock_holders(queue_dir)
    removed = [holder for holder in holders if not holder.alive and recovery.unlock(holder.path)]
    for holder in removed:
        click.echo(f"removed {_where(queue_dir, holder.path)} ({holder.what}, dead PID {holder.pid})")
    live = [holder for holder in holders if holder.alive]
    if live:
        names = ", ".join(f"PID {holder.pid} ({holder.what})" for holder in live)
        raise CommandError(f"{queue_dir} is locked by live {names}; stop {'it' if len(live) == 1 else 'them'} first")
    recovery.remove_idle_semaphores(queue_dir)  # housekeeping, as a rebuild would do: not reported
    if not removed:
        click.echo(f"no stale lock files in {queue_dir}")


@cli.command()
@_queue_argument
@click.option("-y", "--yes", is_flag=True, help="Do not ask for confirmation on a terminal.")
def clear(path: str, yes: bool) -> None:
    """Drop every record in the queue.

    Every receiver moves to the tail and consumed segments are deleted.
    Refuses, naming the PID, while a live receiver has the queue open.
    """
    if not yes and sys.stdin.isatty() and sys.stdout.isatty():
        click.confirm(f"Drop every record in {path}?", abort=True)
    with _progress("clearing", recovery.queue_bytes(path)) as progress:
        report = recovery.clear(path, progress=progress)
    moved = ", ".join(f"{name!r} now at {position}" for name, position in report.receivers.items())
    click.echo(f"cleared {report.path}: dropped {_count(report.dropped_records, 'record')}" + (f"; {moved}" if moved else ""))
    if report.deleted_segments:
        click.echo(f"deleted segments {', '.join(map(str, report.deleted_segments))}")


# -- demo ---------------------------------------------------------------------------------------


@cli.command()
@click.option(
    "--records",
    type=click.IntRange(100, 5_000_000),
    default=20_000,
    show_default=True,
    help="How many records the producer sends.",
)
@click.option("--keep", is_flag=True, help="Keep the demo's queue directory and print where it is.")
def demo(records: int, keep: bool) -> None:
    """Watch a consumer SIGKILLed mid-stream lose nothing.

    In a temporary directory, a producer process (`segq send`) and a
    consumer process (`segq recv --follow`) run through a queue; the
    consumer is SIGKILLed part-way, the queue is recovered, a new consumer
    finishes, and every record is accounted for.
    """
    from ._demo import run_demo

    run_demo(records, keep=keep, echo=click.echo)


# -- beyond one machine: the NATS JetStream bridge (the `nats` extra) ----------------


def _nats_options(command: _Command) -> _Command:
    command = click.option("--stream", required=True, help="The JetStream stream.")(command)
    return click.option(
        "--server",
        "servers",
        multiple=True,
        required=True,
        help="A NATS server URL (nats://HOST:PORT); repeat it for a cluster's servers.",
    )(command)


def _run_bridge(bridge: Callable[[Any], Any]) -> None:
    """Run ``bridge(stop)`` on an event loop; SIGTERM/SIGINT set ``stop``; log what it does to stderr."""
    import asyncio

    logger = logging.getLogger("segq")
    handler = _EchoHandler(logging.INFO)
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    stopped_by: list[int] = []

    async def main() -> None:
        stop = asyncio.Event()

        def on_signal(signum: int) -> None:
            stopped_by.append(signum)
            stop.set()

        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, on_signal, signum)
        await bridge(stop)

    try:
        asyncio.run(main())
    finally:
        logger.removeHandler(handler)
    if stopped_by:
        _exit_for_signal(stopped_by[0])


@cli.command()
@_queue_argument
@_nats_options
@click.option("--subject", required=True, help="The subject to publish on (one per forwarded queue).")
@click.option("--name", default="forward", show_default=True, help="The receiver name the forwarder reads as.")
@click.option("--window", default=256, show_default=True, help="Most publishes in flight at once.")
def forward(path: str, servers: tuple[str, ...], stream: str, subject: str, name: str, window: int) -> None:
    """Publish the records of the queue at PATH to a NATS JetStream stream, each exactly once.

    Runs as receiver NAME of the queue (`segq info` shows its lag) and
    commits a record only once the stream stored it; survives kills and
    server restarts without loss or duplicates.  Stops on SIGTERM/SIGINT
    (exit 128+N).  Needs `pip install 'segq[nats]'`.
    """
    from .nats import forward as run_forward

    _run_bridge(
        lambda stop: run_forward(path, list(servers), stream=stream, subject=subject, name=name, stop=stop,
                                 window=window)
    )


@cli.command()
@_nats_options
@click.option("--consumer", default="pull", show_default=True, help="The durable consumer (made if missing).")
@click.option("--filter", "filter_subject", help="Take only this subject (for a consumer pull makes).")
@click.option("--max-queue-bytes", type=_SizeParam(), help="Fetch nothing while the queue's backlog is this big.")
@_queue_argument
def pull(
    servers: tuple[str, ...], stream: str, consumer: str, filter_subject: str | None, max_queue_bytes: int | None,
    path: str,
) -> None:
    """Send a NATS JetStream stream's messages into the queue at PATH, each exactly once.

    Reads through durable consumer CONSUMER and acknowledges a message only
    after it is in the queue (with its headers, and its stream sequence in
    `segq-nats-seq`).  The queue is created if missing.  Stops on
    SIGTERM/SIGINT (exit 128+N).  Needs `pip install 'segq[nats]'`.
    """
    from .nats import pull as run_pull

    _run_bridge(
        lambda stop: run_pull(list(servers), path, stream=stream, consumer=consumer, filter_subject=filter_subject,
                              stop=stop, max_queue_bytes=max_queue_bytes)
    )


# -- work: a durable xargs (segq._cli_work) ------------------------------------------------

from ._cli_work import register as _register_work  # noqa: E402

_register_work(cli, _library_warnings)
