"""Closing what the program left open when the interpreter exits.

A Sender with a sync policy owes a final sync, and a Receiver with one a
final cursor sync; both hold lock files.  ``atexit`` closes every object
still open, newest first, so a program that forgets ``close()`` (or ends by
``sys.exit`` or an unhandled exception) keeps the promises of its sync
policy.  SIGKILL and ``os._exit`` skip this, and lose nothing that a
returned ``send`` or ``commit`` promised: see the durability table in the README.
"""

from __future__ import annotations

import atexit
import itertools
import logging
import threading
import weakref
from types import TracebackType
from typing import Callable, Protocol, Self

__all__ = ["close_at_exit", "WithBlock", "ClosedByWith", "Ticker"]


class _Closable(Protocol):
    def close(self) -> None: ...


_open: "weakref.WeakValueDictionary[int, _Closable]" = weakref.WeakValueDictionary()
_opened = itertools.count()


class WithBlock:
    """A mixin: ``with obj:`` gives ``obj`` and calls ``obj._leave(error)`` at the end.

    ``error`` is the exception that ended the block, None when it finished.
    """

    __slots__ = ()

    def _leave(self, error: BaseException | None) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self._leave(None if kind is None else value)


class ClosedByWith(WithBlock):
    """A mixin for a class with ``close()``: leaving a ``with`` block closes it."""

    __slots__ = ()

    def close(self) -> None:
        raise NotImplementedError

    def _leave(self, error: BaseException | None) -> None:
        self.close()


class Ticker:
    """A daemon thread calling ``tick()`` every ``interval`` seconds, until ``stop()`` or a ``tick`` that returns False.

    The background half of every sync policy given in seconds: a Sender's
    group commit, a Receiver's cursor sync, a WorkQueue's journal sync.
    """

    def __init__(self, interval: float, tick: Callable[[], bool], name: str) -> None:
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(interval, tick), name=name, daemon=True)
        self._thread.start()

    def _run(self, interval: float, tick: Callable[[], bool]) -> None:
        while not self._stopping.wait(interval):
            if not tick():
                return

    def stop(self) -> None:
        """Stop the ticks and wait for one that is running to finish."""
        self._stopping.set()
        self._thread.join()


def close_at_exit(item: _Closable) -> None:
    """Have ``item.close()`` called at interpreter exit if it is still alive then."""
    _open[next(_opened)] = item


@atexit.register
def _close_everything() -> None:
    for key in sorted(_open.keys(), reverse=True):
        item = _open.get(key)
        if item is None:
            continue
        try:
            item.close()
        except Exception:  # noqa: BLE001 - at exit, one failure must not stop the others
            logging.getLogger(__name__).exception("closing %r at exit failed", item)
