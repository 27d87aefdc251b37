"""A bridge's life on NATS, shared by ``forward`` and ``pull``: first connection, rounds, reconnection.

Theory of operation
-------------------
A bridge (``_forward._Pump``, ``_pull._Pump``) is a ``Pump``: it says how to
catch up with the server after a (re)connection and how to run its rounds
on one connection; this module does the rest, the same for both:

==============================  ==========================================
what happens                    what the pump does
==============================  ==========================================
first connection fails, or its  ``BridgeError`` (``open_link``): nothing
check (stream, subject) does    local was touched yet; the user fixes it
``LinkLost`` from any step      close that connection, wait the backoff
                                (0.1 s doubling to 5 s, with jitter), then
                                a *fresh* connection (see ``_link``), its
                                check (a ``BridgeError`` now is retried:
                                it worked before), ``catch_up``, rounds
``catch_up`` succeeded          the backoff starts over at 0.1 s
``stop`` set (SIGTERM in the    rounds end; the loop ends; the connection
CLI), or ``Stopped`` raised     is closed; the caller closes its queue
==============================  ==========================================
"""

from __future__ import annotations

import asyncio
import logging
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, ClassVar, Generic, Protocol, TypeVar

from ._link import NO_MESSAGE, Backoff, BridgeError, Link, LinkLost, api_error, api_request, connect, wait_or_stop

__all__ = ["Pump", "Stopped", "Check", "open_link", "watching"]

log = logging.getLogger("segq.nats")

# What a bridge checks on every new connection before it uses it (its stream, its subject).
Check = Callable[[Link], Awaitable[None]]


class Stopped(Exception):
    """``stop`` was set while a round waited (for room in the queue): the bridge ends."""


class _Counts(Protocol):
    """What ``keep_running`` counts in a bridge's stats (``ForwardStats``, ``PullStats``)."""

    reconnects: int


StatsT = TypeVar("StatsT", bound=_Counts)


async def open_link(
    servers: Sequence[str], label: str, check: Check, *, stream: str, subject: str | None = None
) -> Link:
    """Open a bridge's first connection and ``check`` it; ``BridgeError`` if no server answers or the check fails."""
    try:
        link = await connect(servers, name=label)
    except LinkLost as error:
        raise BridgeError(str(error), server=", ".join(servers), stream=stream, subject=subject) from None
    try:
        await check(link)
    except BaseException:
        await link.close()
        raise
    return link


class Pump(ABC, Generic[StatsT]):
    """One bridge between a queue and ``stream``: subclasses catch up and run rounds, this keeps them connected."""

    # The bridge's name in log lines ("forward", "pull").
    role: ClassVar[str]

    def __init__(self, stream: str, timeout: float, stats: StatsT) -> None:
        self.stream = stream
        self.timeout = timeout
        self.stats = stats

    @abstractmethod
    async def catch_up(self, link: Link, stop: asyncio.Event) -> None:
        """Bring the queue and the stream in step after a (re)connection, before the rounds."""

    @abstractmethod
    async def run(self, link: Link, stop: asyncio.Event) -> None:
        """Run rounds until ``stop``; raise ``LinkLost`` when the link fails."""

    async def keep_running(
        self, link: Link, servers: Sequence[str], label: str, check: Check, stop: asyncio.Event
    ) -> None:
        """Catch up and run rounds on ``link`` until ``stop``; on ``LinkLost`` reconnect with backoff, forever.

        Each attempt opens a fresh connection (named ``label``) and ``check``s
        it; the connection held at the end is closed.
        """
        current: Link | None = link
        backoff = Backoff()
        try:
            while not stop.is_set():
                try:
                    if current is None:
                        current = await connect(servers, name=label)
                        try:
                            await check(current)
                        except BridgeError as error:
                            # It worked before: a server still recovering its streams, or a
                            # stream being remade. Keep trying, and keep saying why.
                            raise LinkLost(str(error)) from None
                        self.stats.reconnects += 1
                        log.info("%s: reconnected to %s", self.role, current.server)
                    await self.catch_up(current, stop)
                    backoff.reset()
                    await self.run(current, stop)
                except Stopped:
                    break
                except LinkLost as error:
                    delay = backoff.next_delay()
                    log.warning("%s: %s; reconnecting in %.1f s", self.role, error, delay)
                    if current is not None:
                        await current.close()
                        current = None
                    await wait_or_stop(stop, delay)
        finally:
            if current is not None:
                await current.close()

    async def get_message(self, link: Link, request: dict[str, Any], what: str) -> dict[str, Any] | None:
        """Return the stored message ``STREAM.MSG.GET`` finds for ``request``, None if there is none.

        Raises ``LinkLost`` naming ``what`` was being read if the server
        answers with another error.
        """
        reply = await api_request(link.client, f"$JS.API.STREAM.MSG.GET.{self.stream}", request, self.timeout)
        error = api_error(reply)
        if error is not None:
            code, description = error
            if code == NO_MESSAGE:
                return None
            raise LinkLost(f"cannot read {what}: {description}")
        message: dict[str, Any] = reply["message"]
        return message


@contextmanager
def watching(link: Link, stop: asyncio.Event) -> Iterator[tuple[asyncio.Task[Any], asyncio.Task[Any]]]:
    """Yield two tasks, done when ``stop`` is set and when ``link`` is lost, for a round to wait on."""
    loop = asyncio.get_running_loop()
    stopping = loop.create_task(stop.wait())
    lost = loop.create_task(link.lost.wait())
    try:
        yield stopping, lost
    finally:
        stopping.cancel()
        lost.cancel()
