"""``pull``: send a JetStream stream's messages into a local queue, each exactly once, in order.

Theory of operation
-------------------
The puller reads through a durable pull consumer (made if missing) and
sends each message into the local queue as a record with the message's
headers plus two reserved ones: ``segq-nats-stream`` (the stream's name)
and ``segq-nats-seq`` (the message's stream sequence).  It acknowledges a
message to the server only after the local send returned, so a message the
server forgot about is in the queue.

The queue itself is the puller's memory of where it stopped: on start it
reads the newest record carrying ``segq-nats-stream: STREAM`` and takes its
sequence, ``last``.  A message at or below ``last`` is already in the
queue (it was sent, and the puller died before its ack reached the server,
or the server redelivered it): it is acknowledged and not sent again.

That rule needs messages to arrive in stream order, and after a crash they
may not: the consumer redelivers what the dead puller had fetched but not
acknowledged only after its ack wait, while newer messages flow at once.
So on every start (and after a broken link) the puller first reads the
consumer's state: every message up to the highest sequence the consumer
ever delivered is read directly from the stream (``STREAM.MSG.GET`` with
the consumer's filter, from ``last`` + 1) and sent in order.  After that
the consumer only hands out messages above everything in the queue, or
redeliveries of messages at or below ``last``.

===============================  ===========================================
crash                            after restart
===============================  ===========================================
after fetch, before the send     read directly from the stream, sent once
after the send, before the ack   redelivered later, seen as <= last, acked
===============================  ===========================================

Why skipping at or below ``last`` never drops a message the queue lacks:
the queue receives the consumer's messages in stream order (the catch-up
sends everything up to what was ever delivered, in order, before the first
fetch; fetches then deliver new messages in increasing order above that),
so it holds every message up to ``last``, and only redeliveries come out
of order.  The same order makes AckAll safe: acknowledging ``n`` also
acknowledges messages below ``n`` only once they were sent.  Both need one
puller per durable consumer (pullers on other machines use other consumer
names): a second puller's acknowledgements would cover messages the first
has not sent yet.

Two states ``last`` cannot tell from the queue are read from the server on
every start.  A stream deleted and made again numbers from 1 again: if its
last sequence is below ``last``, ``last`` starts over at 0.  A queue that
no longer holds its newest pulled record (made again, or other senders
filled whole segments after it and every receiver consumed them) reads as
``last`` 0: the consumer's ack floor is then where to resume, since a
message is acknowledged only after its send returned.

Backpressure: with ``max_queue_bytes``, the puller fetches nothing while the
local queue's backlog is at the limit.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from .._format import HEADER_SIZE
from .._headers import frame_body
from .._segment import StrPath
from ..aio import AsyncSender
from ..errors import Full
from .._args import SyncPolicy
from ._link import (
    CONSUMER_NOT_FOUND,
    BridgeError,
    Link,
    LinkLost,
    api_error,
    api_request,
    from_nats_headers,
    servers_list,
    stored_headers,
    stream_config,
    wait_or_stop,
)
from ._pump import Pump, Stopped, open_link, watching
from ._tail import last_pulled

if TYPE_CHECKING:
    from nats.aio.msg import Msg

__all__ = ["pull", "PullStats", "STREAM_HEADER", "SEQUENCE_HEADER"]

log = logging.getLogger("segq.nats")

STREAM_HEADER = "segq-nats-stream"
SEQUENCE_HEADER = "segq-nats-seq"


class PullStats:
    """What a puller did: messages sent into the queue, redeliveries skipped, reconnections."""

    def __init__(self) -> None:
        self.sent = 0
        self.skipped = 0
        self.reconnects = 0

    def __repr__(self) -> str:
        return f"<PullStats sent={self.sent} skipped={self.skipped} reconnects={self.reconnects}>"


async def pull(
    servers: str | Sequence[str],
    path: StrPath,
    *,
    stream: str,
    consumer: str = "pull",
    filter_subject: str | None = None,
    stop: asyncio.Event | None = None,
    batch: int = 256,
    max_queue_bytes: int | None = None,
    sync: SyncPolicy = "never",
    timeout: float = 5.0,
) -> PullStats:
    """Send the messages of ``stream`` (durable consumer ``consumer``) into the queue at ``path``, until ``stop``.

    Makes the consumer if it does not exist (filtered on ``filter_subject``
    if given, starting after the last message the queue already holds).
    Each message lands in the queue exactly once, in stream order, with its
    headers and ``segq-nats-stream`` / ``segq-nats-seq``; it is acknowledged
    after the local send returned.  Fetches up to ``batch`` messages at a
    time, none while the queue is at ``max_queue_bytes``.  A broken
    connection is retried with backoff, forever.  Creates the queue if
    missing.  Returns the totals when ``stop`` is set.

    Raises ``BridgeError`` when no server answers the first connection, the
    stream does not exist, or the consumer exists with another filter.
    """
    if batch < 1:
        raise BridgeError(f"batch must be at least 1, not {batch}")
    urls = servers_list(servers)
    stop = stop if stop is not None else asyncio.Event()
    stats = PullStats()
    label = f"segq pull {os.fspath(path)}"

    async def check(link: Link) -> None:
        await stream_config(link.client, stream, link.server, timeout)

    link = await open_link(urls, label, check, stream=stream)
    sender = AsyncSender(path, max_queue_bytes=max_queue_bytes, sync=sync)
    pump = _Pump(sender, stream, consumer, filter_subject, batch, timeout, stats)
    pump.stop = stop
    pump.last = last_pulled(sender.path, stream, STREAM_HEADER, SEQUENCE_HEADER)
    log.info(
        "pulling stream %r (consumer %r) on %s into %s, after sequence %d",
        stream, consumer, link.server, sender.path, pump.last,
    )
    try:
        await pump.keep_running(link, urls, label, check, stop)
    finally:
        await sender.close()
        log.info("pull stopped: %s", stats)
    return stats


class _Pump(Pump[PullStats]):
    """The rounds of one puller: make sure of the consumer, catch up, then fetch, send, ack."""

    role = "pull"

    def __init__(
        self,
        sender: AsyncSender,
        stream: str,
        consumer: str,
        filter_subject: str | None,
        batch: int,
        timeout: float,
        stats: PullStats,
    ) -> None:
        super().__init__(stream, timeout, stats)
        self.sender = sender
        self.consumer = consumer
        self.filter_subject = filter_subject
        self.batch = batch
        self.last = 0
        self.filter: str | None = filter_subject
        self.stop = asyncio.Event()
        self.ack_policy = "explicit"

    async def ensure_consumer(self, link: Link) -> dict[str, Any]:
        """Return the consumer's info, making the durable consumer if it does not exist."""
        subject = f"$JS.API.CONSUMER.INFO.{self.stream}.{self.consumer}"
        reply = await api_request(link.client, subject, None, self.timeout)
        error = api_error(reply)
        if error is not None and error[0] == CONSUMER_NOT_FOUND:
            config: dict[str, Any] = {
                "durable_name": self.consumer,
                # Acking one message acks every one before it: one ack per batch, and the
                # messages a killed puller left unacked (sent by now) are acked with it.
                "ack_policy": "all",
                "ack_wait": 30_000_000_000,
                "max_ack_pending": max(1000, 4 * self.batch),
            }
            if self.last:
                config.update(deliver_policy="by_start_sequence", opt_start_seq=self.last + 1)
            else:
                config["deliver_policy"] = "all"
            if self.filter_subject:
                config["filter_subject"] = self.filter_subject
            create = f"$JS.API.CONSUMER.CREATE.{self.stream}.{self.consumer}"
            reply = await api_request(link.client, create, {"stream_name": self.stream, "config": config}, self.timeout)
            error = api_error(reply)
            if error is None:
                log.info("pull: made durable consumer %r on stream %r", self.consumer, self.stream)
        if error is not None:
            raise BridgeError(
                f"consumer {self.consumer!r} of stream {self.stream!r} on {link.server}: {error[1]}",
                server=link.server,
                stream=self.stream,
            )
        config = reply["config"]
        if config.get("deliver_subject"):
            raise BridgeError(
                f"consumer {self.consumer!r} of stream {self.stream!r} is a push consumer; pull needs a pull consumer",
                server=link.server,
                stream=self.stream,
            )
        filters = config.get("filter_subjects") or ([config["filter_subject"]] if config.get("filter_subject") else [])
        if self.filter_subject and filters != [self.filter_subject]:
            raise BridgeError(
                f"consumer {self.consumer!r} of stream {self.stream!r} filters {filters or 'nothing'}, "
                f"not {self.filter_subject!r}; pick another consumer name",
                server=link.server,
                stream=self.stream,
            )
        if len(filters) > 1:
            raise BridgeError(
                f"consumer {self.consumer!r} of stream {self.stream!r} has several filters; pull handles one",
                server=link.server,
                stream=self.stream,
            )
        self.filter = filters[0] if filters else None
        self.ack_policy = str(config.get("ack_policy", "explicit"))
        return dict(reply)

    async def catch_up(self, link: Link, stop: asyncio.Event) -> None:
        """Send, in order, what the consumer handed out (to a puller now dead) and the queue lacks."""
        await self._check_stream(link)
        info = await self.ensure_consumer(link)
        delivered = int(info.get("delivered", {}).get("stream_seq", 0))
        self._check_acked(info)
        caught = 0
        while self.last < delivered and not stop.is_set():
            request: dict[str, Any] = {"seq": self.last + 1, "next_by_subj": self.filter or ">"}
            message = await self.get_message(link, request, f"stream {self.stream!r} after sequence {self.last}")
            if message is None:
                break
            sequence = int(message["seq"])
            if sequence > delivered:
                break  # the consumer will hand this one out itself
            data = base64.b64decode(message.get("data") or b"")
            await self._send([(data, from_nats_headers(stored_headers(message)), sequence)])
            caught += 1
        if caught:
            log.info("pull: sent %d messages read straight from stream %r (fetched before a restart)", caught,
                     self.stream)

    async def _check_stream(self, link: Link) -> None:
        """Start ``last`` over if the stream was made again (it numbers from 1: all would be skipped)."""
        reply = await api_request(link.client, f"$JS.API.STREAM.INFO.{self.stream}", None, self.timeout)
        state = reply.get("state") if isinstance(reply, dict) and api_error(reply) is None else None
        if state is not None and self.last > int(state.get("last_seq", 0)):
            log.warning(
                "pull: stream %r ends at sequence %s, below the last one pulled into %s (%d): the stream was "
                "made again; pulling its messages from its start",
                self.stream, state.get("last_seq"), self.sender.path, self.last,
            )
            self.last = 0

    def _check_acked(self, info: dict[str, Any]) -> None:
        """Resume after the consumer's ack floor if the queue lost its newest pulled record.

        A queue whose newest pulled record is gone (other senders filled
        whole segments after it and every receiver consumed them) reads as
        ``last`` 0, and everything the consumer delivered would be sent
        again.  A message is acknowledged only after its send returned, so
        the ack floor was sent (not with ``ack_policy`` none, which
        acknowledges on delivery).
        """
        if self.ack_policy == "none":
            return
        acked = int(info.get("ack_floor", {}).get("stream_seq", 0))
        if acked > self.last:
            log.warning(
                "pull: %s does not hold the newest message consumer %r acknowledged (sequence %d of stream %r; "
                "the newest the queue holds is %d): resuming after it",
                self.sender.path, self.consumer, acked, self.stream, self.last,
            )
            self.last = acked

    async def _send(self, records: list[tuple[bytes, dict[str, bytes], int]]) -> None:
        """Send ``(data, headers, sequence)`` records to the queue in order, as one atomic batch if it fits.

        Waits for room under ``max_queue_bytes``; raises ``Stopped`` if
        ``stop`` is set meanwhile (what was not sent comes again later).
        """
        # The segq-nats-* headers are reserved names: framed here, as segq's own code may.
        bodies = [
            frame_body(data, {**headers, STREAM_HEADER: self.stream.encode(), SEQUENCE_HEADER: b"%d" % sequence},
                       allow_reserved=True)
            for data, headers, sequence in records
        ]
        limit = self.sender.max_queue_bytes
        if limit is not None and sum(HEADER_SIZE + len(body) for body in bodies) > limit:
            # A batch larger than the queue may hold would never fit: one record at a time.
            for body, record in zip(bodies, records):
                await self._append([body])
                self.last = record[2]
                self.stats.sent += 1
            return
        await self._append(bodies)
        self.last = records[-1][2]
        self.stats.sent += len(records)

    async def _append(self, bodies: Sequence[bytes]) -> None:
        while True:
            try:
                await self.sender.send_batch(bodies, timeout=None if self.sender.max_queue_bytes is None else 0.25)
                return
            except Full:
                if self.stop.is_set():
                    raise Stopped() from None

    async def _room(self, stop: asyncio.Event) -> None:
        """Wait while the queue's backlog is at ``max_queue_bytes`` (no fetch meanwhile)."""
        inner = self.sender._sender
        if inner.max_queue_bytes is None:
            return
        waited = False
        while not inner._has_room(1) and not stop.is_set():
            if not waited:
                log.info("pull: %s is at max_queue_bytes; not fetching until its receivers catch up", self.sender.path)
                waited = True
            await wait_or_stop(stop, 0.05)

    async def run(self, link: Link, stop: asyncio.Event) -> None:
        """Fetch, send, ack until ``stop``; raise ``LinkLost`` when the link fails."""
        client = link.client
        inbox = client.new_inbox()
        queue: asyncio.Queue[Msg] = asyncio.Queue()

        async def on_message(msg: Msg) -> None:
            queue.put_nowait(msg)

        await client.subscribe(inbox, cb=on_message)
        next_subject = f"$JS.API.CONSUMER.MSG.NEXT.{self.stream}.{self.consumer}"
        with watching(link, stop) as (stopping, lost):
            while not stop.is_set():
                await self._room(stop)
                if stop.is_set():
                    return
                if link.lost.is_set():
                    raise LinkLost("the connection to NATS closed")
                request = {"batch": self.batch, "expires": 1_000_000_000}
                try:
                    await client.publish(next_subject, json.dumps(request).encode(), reply=inbox)
                except Exception as error:  # noqa: BLE001 - a closed or broken connection
                    raise LinkLost(f"asking for messages failed: {error!r}") from None
                await self._take(queue, stopping, lost)

    async def _take(self, queue: asyncio.Queue[Msg], stopping: asyncio.Task[Any], lost: asyncio.Task[Any]) -> None:
        """Handle the answers to one fetch request: messages, then a status that ends it."""
        fresh: list[tuple[bytes, dict[str, bytes], int]] = []
        replies: list[Msg] = []
        expected = self.batch
        while expected:
            if queue.empty() and fresh:
                await self._settle(fresh, replies)
                fresh, replies = [], []
            getting = asyncio.ensure_future(queue.get())
            done, _ = await asyncio.wait([getting, stopping, lost], timeout=self.timeout + 1.0,
                                         return_when=asyncio.FIRST_COMPLETED)
            if getting not in done:
                getting.cancel()
                if lost in done:
                    raise LinkLost("the connection to NATS closed")
                if stopping in done:
                    break
                raise LinkLost(f"consumer {self.consumer!r} did not answer a fetch")
            msg = getting.result()
            status = msg.headers.get("Status") if msg.headers else None
            if status is not None and not msg.data:
                if status in ("404", "408", "409", "100"):
                    break  # no messages, request expired, or leadership changed: ask again
                raise LinkLost(f"consumer {self.consumer!r} answered a fetch with status {status}")
            expected -= 1
            sequence = _stream_sequence(msg.reply)
            if sequence <= self.last:
                self.stats.skipped += 1  # in the queue already: acknowledged, not sent again
                if self.ack_policy != "none":
                    await msg.ack()
                continue
            fresh.append((msg.data, from_nats_headers(msg.headers), sequence))
            replies.append(msg)
        if fresh:
            await self._settle(fresh, replies)

    async def _settle(self, fresh: list[tuple[bytes, dict[str, bytes], int]], replies: list[Msg]) -> None:
        """Send the messages into the queue, then acknowledge them (all with the last, under AckAll)."""
        await self._send(fresh)
        if self.ack_policy == "all":
            await replies[-1].ack()
        elif self.ack_policy == "explicit":
            for msg in replies:
                await msg.ack()


def _stream_sequence(reply: str) -> int:
    """Return the stream sequence from a JetStream delivery's reply subject ($JS.ACK.<...>.<stream seq>...)."""
    tokens = reply.split(".")
    # $JS.ACK.<stream>.<consumer>.<delivered>.<stream seq>.<consumer seq>.<time>.<pending>, or with a
    # domain and account hash (12 tokens and more): the stream sequence is 4th from the end in both.
    try:
        return int(tokens[-4])
    except (IndexError, ValueError):
        raise LinkLost(f"a delivery had an unexpected reply subject {reply!r}") from None
