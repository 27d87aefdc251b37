"""Adapt segq and each peer library to one small queue interface.

Every adapter wraps one open queue used from one process. Libraries are
imported lazily (on first use), so this module imports fine when any of them,
segq included, is missing; ``Adapter.import_error()`` says why one is unusable.

Hot-path methods (``put``, ``try_get``) are bound straight to the library call
where the signatures already match, so the measured loop pays no wrapper call
that the bare ``os.write`` baseline does not pay either.
"""

from __future__ import annotations

import abc
import enum
import importlib
import importlib.metadata
import os
import time
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any, ClassVar

#: What ``take`` hands back: the payload and an opaque token for ``ack``.
Taken = tuple[bytes, Any]

#: Polling peers sleep this long after the first empty poll, doubling up to the cap.
POLL_FIRST_S = 50e-6
POLL_CAP_S = 500e-6


class Unsupported(Exception):
    """Raised when a library has no API for the requested operation."""


class Role(enum.Flag):
    """Which side of the queue an adapter opens."""

    PRODUCER = enum.auto()
    CONSUMER = enum.auto()
    BOTH = PRODUCER | CONSUMER


class Adapter(abc.ABC):
    """Drive one library's queue through the interface the workloads use.

    Subclasses set the class attributes describing what the library can do and
    implement ``_open`` and ``take``; everything else has a shared default.
    """

    #: Name shown in reports; also the registry key used by child processes.
    name: ClassVar[str]
    #: Module imported lazily, and the distribution whose version is reported.
    module: ClassVar[str]
    dist: ClassVar[str]
    #: "segq" for the library under test, "peer" for the others.
    kind: ClassVar[str] = "peer"
    #: Stores to a directory (False for in-memory transports such as Pipe).
    on_disk: ClassVar[bool] = True
    #: Whether a consumer in another process sees a producer's records.
    cross_process: ClassVar[bool] = True
    cross_process_note: ClassVar[str] = ""
    #: Whether ``take_wait`` blocks in the library rather than by polling.
    native_blocking: ClassVar[bool] = False
    #: Whether ``put_batch``/``get_batch`` map to a real batch API.
    batch: ClassVar[bool] = False
    #: What ``durable=True`` selects, or None when the library has no such mode.
    durable_mode: ClassVar[str | None] = None

    #: Append one record.
    put: Callable[[bytes], object]
    #: Take and acknowledge one record without blocking; None when empty.
    try_get: Callable[[], bytes | None]

    def __init__(self, target: Any, *, role: Role = Role.BOTH, durable: bool = False) -> None:
        """Open the queue at ``target`` (a directory, or a Connection for Pipe)."""
        if durable and self.durable_mode is None:
            raise Unsupported(f"{self.name} has no durable mode")
        self.lib: ModuleType = importlib.import_module(self.module)
        self.try_get = self._take_and_ack
        self._open(target, role, durable)

    @abc.abstractmethod
    def _open(self, target: Any, role: Role, durable: bool) -> None:
        """Open the library's queue objects and bind ``put`` (and maybe ``try_get``)."""

    @abc.abstractmethod
    def take(self) -> Taken | None:
        """Take one record without acknowledging it; None when the queue is empty."""

    def ack(self, token: Any) -> None:
        """Acknowledge a record returned by ``take``; a no-op where taking consumes."""

    def take_wait(self, timeout: float) -> Taken | None:
        """Take one record, waiting up to ``timeout`` seconds; None on timeout.

        This default polls with a short, capped back-off; libraries that can
        block across processes override it.
        """
        item = self.take()
        if item is not None:
            return item
        deadline = time.monotonic() + timeout
        pause = POLL_FIRST_S
        while True:
            time.sleep(pause)
            item = self.take()
            if item is not None or time.monotonic() >= deadline:
                return item
            pause = min(pause * 2, POLL_CAP_S)

    def get(self, timeout: float) -> bytes | None:
        """Take and acknowledge one record, waiting up to ``timeout`` seconds."""
        item = self.take_wait(timeout)
        if item is None:
            return None
        self.ack(item[1])
        return item[0]

    def _take_and_ack(self) -> bytes | None:
        item = self.take()
        if item is None:
            return None
        self.ack(item[1])
        return item[0]

    def put_batch(self, items: Sequence[bytes]) -> None:
        """Append ``items`` in one call of the library's batch API."""
        raise Unsupported(f"{self.name} has no batch API")

    def get_batch(self, n: int) -> list[bytes]:
        """Take and acknowledge up to ``n`` records in one batch; [] when empty."""
        raise Unsupported(f"{self.name} has no batch API")

    def flush(self) -> None:
        """Push buffered records to the OS (end of a put phase)."""

    def stats(self) -> dict[str, float]:
        """Return counters the library keeps about its own work (e.g. fdatasync calls), or {}."""
        return {}

    def close(self) -> None:
        """Release the library's files and connections."""

    def __enter__(self) -> Adapter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @classmethod
    def import_error(cls) -> str | None:
        """Return why the library cannot be imported, or None when it can."""
        try:
            importlib.import_module(cls.module)
        except Exception as exc:  # any import-time failure makes it unusable
            return f"import {cls.module} failed: {type(exc).__name__}: {exc}"
        return None

    @classmethod
    def details(cls) -> str:
        """Return build facts that change its speed (e.g. C extensions), or ""."""
        return ""

    @classmethod
    def version(cls) -> str:
        """Return the installed version of the library, or a reason it is unknown."""
        try:
            return importlib.metadata.version(cls.dist)
        except importlib.metadata.PackageNotFoundError:
            # An uninstalled checkout on PYTHONPATH has no metadata.
            try:
                mod = importlib.import_module(cls.module)
            except Exception:
                return "not installed"
            return str(getattr(mod, "__version__", "unknown (no package metadata)"))


def _path(target: Any) -> str:
    if not isinstance(target, (str, os.PathLike)):
        raise TypeError(f"expected a directory path, got {type(target).__name__}")
    return os.fspath(target)


class SegqAdapter(Adapter):
    """segq: a Sender for producing and a Receiver (group "default") for consuming."""

    name = "segq"
    module = "segq"
    dist = "segq"
    kind = "segq"
    native_blocking = True
    batch = True
    durable_mode = 'sync="always"'

    _tx: Any = None
    _rx: Any = None

    def _open(self, target: Any, role: Role, durable: bool) -> None:
        path = _path(target)
        if Role.PRODUCER in role:
            self._tx = self.lib.Sender(path, sync="always" if durable else "never")
            self.put = self._tx.send
        if Role.CONSUMER in role:
            self._rx = self.lib.Receiver(path, name="default")
            self.try_get = self._try_get

    def _try_get(self) -> bytes | None:
        # Fused take+ack: one Python frame less per record than the default.
        msg = self._rx.try_recv()
        if msg is None:
            return None
        msg.commit()
        return msg.data  # type: ignore[no-any-return]

    def take(self) -> Taken | None:
        msg = self._rx.try_recv()
        return None if msg is None else (msg.data, msg)

    def take_wait(self, timeout: float) -> Taken | None:
        try:
            msg = self._rx.recv(timeout=timeout)
        except self.lib.Empty:
            return None
        return msg.data, msg

    def ack(self, token: Any) -> None:
        token.commit()

    def put_batch(self, items: Sequence[bytes]) -> None:
        self._tx.send_batch(items)

    def get_batch(self, n: int) -> list[bytes]:
        try:
            batch = self._rx.recv_batch(n, timeout=0.5)
        except self.lib.Empty:
            return []
        data = [m.data for m in batch]
        batch.commit()
        return data

    def flush(self) -> None:
        if self._tx is not None:
            self._tx.flush()

    def stats(self) -> dict[str, float]:
        # A private counter: how many fdatasync calls this Sender made, to
        # show group commit at work (calls per record), not only its rate.
        count = getattr(self._tx, "_fdatasyncs", None)
        return {} if count is None else {"fdatasyncs": float(count)}

    def close(self) -> None:
        for end in (self._tx, self._rx):
            if end is not None:
                end.close()

    @classmethod
    def details(cls) -> str:
        # segq frames records in C when its optional extension is built, and
        # in pure Python otherwise (or with SEGQ_PURE_PYTHON=1).
        try:
            fmt = importlib.import_module("segq._format")
        except ImportError:
            return ""
        speedups = getattr(fmt, "SPEEDUPS", None)
        return "" if speedups is None else f"C speedups {'on' if speedups else 'off'}"


class PersistQueueFileAdapter(Adapter):
    """persist-queue's file-based ``Queue`` with ``autosave=True``."""

    name = "persist-queue Queue"
    module = "persistqueue"
    dist = "persist-queue"
    cross_process = False
    cross_process_note = (
        "queue state (head/tail/size) lives in the opening process; "
        "another process never sees new records"
    )
    # put() flushes the record and rewrites the index; neither is fsync'ed.
    durable_mode = "autosave=True (flush + index rename, no fsync)"

    def _open(self, target: Any, role: Role, durable: bool) -> None:
        self._q = self.lib.Queue(_path(target), autosave=True)
        self.put = self._q.put

    def take(self) -> Taken | None:
        try:
            return self._q.get(block=False), None
        except self.lib.Empty:
            return None

    def ack(self, token: Any) -> None:
        self._q.task_done()


class PersistQueueSQLiteAckAdapter(Adapter):
    """persist-queue's ``SQLiteAckQueue`` (get, then ack) with ``auto_commit=True``."""

    name = "persist-queue SQLiteAckQueue"
    module = "persistqueue"
    dist = "persist-queue"
    # Each put/ack is a committed transaction in WAL mode at SQLite's default
    # synchronous=FULL, so the plain mode is already its most durable one.
    durable_mode = "auto_commit=True, WAL, synchronous=FULL (its default)"

    def _open(self, target: Any, role: Role, durable: bool) -> None:
        self._q = self.lib.SQLiteAckQueue(_path(target), auto_commit=True)
        self.put = self._q.put

    def take(self) -> Taken | None:
        try:
            item = self._q.get(block=False)
        except self.lib.Empty:
            return None
        return item, item

    def ack(self, token: Any) -> None:
        self._q.ack(token)

    def close(self) -> None:
        self._q.close()


class QueuelibAdapter(Adapter):
    """queuelib's ``FifoDiskQueue`` (push / pop)."""

    name = "queuelib FifoDiskQueue"
    module = "queuelib"
    dist = "queuelib"
    cross_process = False
    cross_process_note = "head/tail index is kept in memory and written only by close()"

    def _open(self, target: Any, role: Role, durable: bool) -> None:
        self._q = self.lib.FifoDiskQueue(_path(target))
        self.put = self._q.push
        self.try_get = self._q.pop  # pop() consumes; nothing to ack

    def take(self) -> Taken | None:
        data = self._q.pop()
        return None if data is None else (data, None)

    def close(self) -> None:
        self._q.close()


class DiskcacheDequeAdapter(Adapter):
    """diskcache's ``Deque`` (append / popleft); batches use ``transact()``."""

    name = "diskcache Deque"
    module = "diskcache"
    dist = "diskcache"
    batch = True
    durable_mode = "sqlite_synchronous=2 (FULL)"

    def _open(self, target: Any, role: Role, durable: bool) -> None:
        # Default is synchronous=NORMAL (1); FULL (2) fsyncs the WAL per commit.
        self._cache = self.lib.Cache(_path(target), sqlite_synchronous=2 if durable else 1)
        self._dq = self.lib.Deque.fromcache(self._cache)
        self.put = self._dq.append
        self.try_get = self._popleft

    def _popleft(self) -> bytes | None:
        try:
            return self._dq.popleft()  # type: ignore[no-any-return]
        except IndexError:
            return None

    def take(self) -> Taken | None:
        data = self._popleft()
        return None if data is None else (data, None)

    def put_batch(self, items: Sequence[bytes]) -> None:
        append = self._dq.append
        with self._dq.transact():
            for item in items:
                append(item)

    def get_batch(self, n: int) -> list[bytes]:
        out: list[bytes] = []
        popleft = self._dq.popleft
        with self._dq.transact():
            try:
                for _ in range(n):
                    out.append(popleft())
            except IndexError:
                pass
        return out

    def close(self) -> None:
        self._cache.close()


class LitequeueAdapter(Adapter):
    """litequeue's ``LiteQueue`` (put / pop / done), one SQLite file in the directory."""

    name = "litequeue"
    module = "litequeue"
    dist = "litequeue"
    durable_mode = "PRAGMA synchronous=FULL"

    def _open(self, target: Any, role: Role, durable: bool) -> None:
        self._q = self.lib.LiteQueue(os.path.join(_path(target), "litequeue.sqlite3"))
        if durable:
            # LiteQueue sets synchronous=NORMAL, which in WAL mode skips the
            # fsync per commit; FULL is the most durable setting it accepts.
            self._q.conn.execute("PRAGMA synchronous = FULL;")
        self.put = self._q.put

    def take(self) -> Taken | None:
        msg = self._q.pop()
        return None if msg is None else (msg.data, msg.message_id)

    def ack(self, token: Any) -> None:
        self._q.done(token)

    def close(self) -> None:
        self._q.close()


class PipeAdapter(Adapter):
    """``multiprocessing.Pipe``: an in-memory reference for two-process workloads."""

    name = "multiprocessing.Pipe"
    module = "multiprocessing"
    dist = ""
    on_disk = False
    native_blocking = True

    def _open(self, target: Any, role: Role, durable: bool) -> None:
        self._conn = target
        self.put = self._conn.send_bytes

    def take(self) -> Taken | None:
        return (self._conn.recv_bytes(), None) if self._conn.poll(0) else None

    def take_wait(self, timeout: float) -> Taken | None:
        return (self._conn.recv_bytes(), None) if self._conn.poll(timeout) else None

    def close(self) -> None:
        self._conn.close()

    @classmethod
    def version(cls) -> str:
        return "stdlib"


#: Every adapter, in report order.
ADAPTERS: tuple[type[Adapter], ...] = (
    SegqAdapter,
    PersistQueueFileAdapter,
    PersistQueueSQLiteAckAdapter,
    QueuelibAdapter,
    DiskcacheDequeAdapter,
    LitequeueAdapter,
    PipeAdapter,
)


def by_name(name: str) -> type[Adapter]:
    """Return the adapter class registered under ``name``."""
    for cls in ADAPTERS:
        if cls.name == name:
            return cls
    raise KeyError(f"no adapter named {name!r}")
