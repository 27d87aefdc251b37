"""``forward``: publish a local queue's records to a JetStream stream, each exactly once, in order.

Theory of operation
-------------------
The forwarder is an ordinary named receiver of the queue (``segq info``
shows its backlog as the forwarding lag).  It works in rounds: receive a
batch of up to ``window`` records, publish them all without waiting (the
bounded window of publishes in flight), wait for every acknowledgement, and
only then commit the batch locally.  A record is committed only after the
stream said it stored it.

Each record is published with ``Nats-Msg-Id: QUEUEID:SEGMENT:OFFSET`` (the
queue's id from ``segq.id``, see docs/format.md, and the record's position)
and ``Nats-Expected-Stream`` (so a subject some other stream takes is refused,
not stored there).  What can go wrong between a publish and the local
commit, and what each case leaves:

==============================  ==========================================
crash or failure                in the stream afterwards
==============================  ==========================================
before the publish              nothing of the batch
publish sent, link breaks       a prefix of the batch (one connection, in
                                order; nothing buffered for a next one)
a stream leader change inside   any subset of the batch: record k refused
the round, then a kill          while k+1 was stored
acknowledged, not committed     the whole batch; the queue still has it
==============================  ==========================================

So what landed of the uncommitted records is *some subset*, not always a
prefix, and the forwarder has to find out which.  After each committed
round it writes a *mark* (``_mark``, ``QUEUE/forward.NAME.mark``): a stream
sequence ``S`` and the committed position ``C``.  Every record before
``C`` was acknowledged; every later record is published after the round's
acknowledgements came back, so if it lands, it lands above ``S`` (a
stream's sequences only grow).  On every start and every broken link the
forwarder:

1. commits, without publishing, the records before the mark's ``C`` (a
   cursor write lost in a crash the mark survived);
2. reads the messages on its subject from ``S + 1`` to the last one and
   collects the positions, carrying this queue's id, that landed: at most
   the round that was in flight and the one before it (when the kill fell
   between a commit and its mark);
3. resumes at the committed position, publishing every record whose
   position did not land and committing, without publishing, those that
   did.

A record that did not land is published whatever the last message on the
subject says, so nothing is skipped; a record that landed is never
published again, however long the forwarder was down, so this does not
rest on the stream's duplicate window.  The window still covers one race
the read cannot see: a publish from a dead connection that the server
stores after the read (it is dropped as a duplicate when sent again).

Without a mark (the first start; a mark file lost) the forwarder asks for
the last message on the subject: if it is this queue's, the records up to
it are taken as landed (the rule before marks, right unless a leader
change cut the last round short); then it writes a mark above everything
in the stream before publishing anything.  A subject shared with other
queues works (their messages are read past) but costs longer reads; the
forwarder says so once.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from .._control import existing_queue
from .._queueid import queue_id
from .._segment import StrPath
from .._state import Position
from ._mark import MarkFile
from ..aio import AsyncReceiver
from ..receiver import Message
from .._args import SyncPolicy
from ..errors import Empty, SegqError
from ._link import (
    BridgeError,
    Link,
    LinkLost,
    api_error,
    servers_list,
    stored_headers,
    stream_config,
    subject_matches,
    to_nats_headers,
)
from ._pump import Pump, open_link, watching

if TYPE_CHECKING:
    from nats.aio.msg import Msg

__all__ = ["forward", "ForwardStats", "message_id", "parse_message_id"]

log = logging.getLogger("segq.nats")

# Publish errors that retrying cannot fix: the wrong stream took the subject
# (10060), a record larger than the stream allows (10054), a stream that
# refuses new messages (10077, discard-new at its limits is retried instead).
_REFUSALS = frozenset({10060, 10054})
_SEQ = re.compile(rb'"seq":(\d+)')



class ForwardStats:
    """What a forwarder did: records published, records found already in the stream, reconnections."""

    def __init__(self) -> None:
        self.published = 0
        self.skipped = 0
        self.republished = 0
        self.duplicates = 0
        self.reconnects = 0

    def __repr__(self) -> str:
        return (
            f"<ForwardStats published={self.published} skipped={self.skipped} republished={self.republished} "
            f"duplicates={self.duplicates} reconnects={self.reconnects}>"
        )


def message_id(queue: str, position: Position) -> str:
    """Return the ``Nats-Msg-Id`` of the record at ``position`` of queue ``queue``."""
    return f"{queue}:{position.segment}:{position.offset}"


def parse_message_id(value: str | None) -> tuple[str, Position] | None:
    """Return (queue id, position) from a ``Nats-Msg-Id`` made by ``message_id``, else None."""
    if not value:
        return None
    parts = value.split(":")
    if len(parts) != 3 or not parts[1].isdigit() or not parts[2].isdigit():
        return None
    return parts[0], Position(int(parts[1]), int(parts[2]))


async def forward(
    path: StrPath,
    servers: str | Sequence[str],
    *,
    stream: str,
    subject: str,
    name: str = "forward",
    stop: asyncio.Event | None = None,
    window: int = 256,
    ack_timeout: float = 5.0,
    sync: SyncPolicy = "never",
) -> ForwardStats:
    """Publish every record of the queue at ``path`` to ``stream`` on ``subject``, until ``stop`` is set.

    Runs as receiver ``name`` of the queue and commits a record only after
    the stream acknowledged it; up to ``window`` publishes are in flight.
    Each record lands in the stream exactly once, with its headers, however
    the forwarder or the server is stopped or killed and for however long;
    in queue order, except that a record a stream leader change refused
    while later ones of its round were stored lands after those (at most
    ``window`` places late).  Keeps its mark in ``forward.NAME.mark`` in the
    queue directory.  A broken connection is retried with backoff, forever.
    Returns the totals when ``stop`` is set.

    Raises ``BridgeError`` when no server answers the first connection, the
    stream does not exist, or it does not take ``subject``: nothing is
    committed locally then.  ``servers`` is a URL or a list of them
    (``nats://host:4222``).
    """
    if window < 1:
        raise BridgeError(f"window must be at least 1, not {window}")
    queue_dir = existing_queue(path)
    urls = servers_list(servers)
    stop = stop if stop is not None else asyncio.Event()
    stats = ForwardStats()
    label = f"segq forward {queue_dir}"

    async def check(link: Link) -> None:
        await check_subject(link, stream, subject, ack_timeout)

    link = await open_link(urls, label, check, stream=stream, subject=subject)
    queue = queue_id(queue_dir)
    receiver = AsyncReceiver(queue_dir, name, sync=sync)
    log.info(
        "forwarding %s (receiver %r at %s) to stream %r subject %r on %s",
        queue_dir, name, receiver.committed_position, stream, subject, link.server,
    )
    try:
        marks = MarkFile(receiver.path, name, stream)
    except BaseException:
        await receiver.close()
        await link.close()
        raise
    pump = _Pump(receiver, queue, stream, subject, window, ack_timeout, stats, marks)
    try:
        await pump.keep_running(link, urls, label, check, stop)
    finally:
        await receiver.close()
        marks.close()
        log.info("forward stopped: %s", stats)
    return stats


async def check_subject(link: Link, stream: str, subject: str, timeout: float) -> None:
    """Raise ``BridgeError`` unless ``stream`` exists and takes ``subject``."""
    if not subject or any(ch in subject for ch in "*> \t\r\n") or ".." in subject or subject.startswith("."):
        raise BridgeError(f"subject {subject!r} is not a literal NATS subject", subject=subject)
    config = await stream_config(link.client, stream, link.server, timeout)
    patterns = config.get("subjects") or [stream]
    if not any(subject_matches(subject, pattern) for pattern in patterns):
        raise BridgeError(
            f"stream {stream!r} on {link.server} does not take subject {subject!r} (it takes {', '.join(patterns)})",
            server=link.server,
            stream=stream,
            subject=subject,
        )


class _Pump(Pump[ForwardStats]):
    """The rounds of one forwarder: catch up with the stream, then publish, wait, commit."""

    role = "forward"

    def __init__(
        self,
        receiver: AsyncReceiver,
        queue: str,
        stream: str,
        subject: str,
        window: int,
        ack_timeout: float,
        stats: ForwardStats,
        marks: MarkFile,
    ) -> None:
        super().__init__(stream, ack_timeout, stats)
        self.receiver = receiver
        self.queue = queue
        self.subject = subject
        self.window = window
        self.marks = marks
        # What catch_up found: positions after the committed one already in the stream
        # (committed without publishing when run reaches them), and the highest of them.
        self.landed: set[Position] = set()
        self.landed_until: Position | None = None
        self.holes = 0
        # A stream sequence below every record published from now on: the next mark's.
        self.sequence = 0
        self._warned_foreign = False

    async def _get(self, link: Link, request: dict[str, Any]) -> tuple[int, str | None] | None:
        """Return (sequence, Nats-Msg-Id) of the message ``STREAM.MSG.GET`` finds, None if none."""
        message = await self.get_message(link, request, f"the messages on {self.subject!r} of stream {self.stream!r}")
        if message is None:
            return None
        return int(message["seq"]), stored_headers(message).get("Nats-Msg-Id")

    def _ours(self, msg_id: str | None) -> Position | None:
        """Return the position named by ``msg_id`` if it is one of this queue's records; warn once if not."""
        found = parse_message_id(msg_id)
        if found is not None and found[0] == self.queue:
            return found[1]
        if not self._warned_foreign:
            self._warned_foreign = True
            log.warning(
                "forward: subject %r also carries messages that are not from this queue; each record still lands "
                "once, but finding out what landed after a restart reads past theirs: give each queue its own "
                "subject",
                self.subject,
            )
        return None

    async def catch_up(self, link: Link, stop: asyncio.Event) -> None:
        """Find out which uncommitted records are in the stream already (see the module's docstring)."""
        self.landed = set()
        self.landed_until = None
        self.holes = 0
        last = await self._get(link, {"last_by_subj": self.subject})
        mark = self.marks.mark
        if mark is None:
            await self._without_mark(last)
            return
        sequence, marked = mark
        if self.receiver.committed_position < marked:
            skipped = await self._commit_before(marked)
            self.stats.skipped += skipped
            log.info("forward: committed %d records the stream had acknowledged before a crash", skipped)
        if last is None or last[0] <= sequence:
            if (last[0] if last else 0) < sequence:
                log.warning(
                    "forward: subject %r of stream %r no longer holds sequence %d, where this forwarder left "
                    "it: the stream was purged or made again; forwarding goes on from %s (what the stream "
                    "lost before is not sent again)",
                    self.subject, self.stream, sequence, self.receiver.committed_position,
                )
                sequence = last[0] if last else 0
                self.marks.write(sequence, self.receiver.committed_position)
            self.sequence = sequence
            return
        end = last[0]
        committed = self.receiver.committed_position
        read = 0
        following: tuple[int, str | None] | None = (sequence, None)
        while following is not None and following[0] < end:
            following = await self._get(link, {"seq": following[0] + 1, "next_by_subj": self.subject})
            if following is None or following[0] > end:
                break
            read += 1
            position = self._ours(following[1])
            if position is not None and position >= committed:
                self.landed.add(position)
        self.sequence = end
        if self.landed:
            self.landed_until = max(self.landed)
            log.info(
                "forward: %d records after %s are in stream %r already (read %d messages after sequence %d); "
                "committing them without publishing, publishing the others",
                len(self.landed), committed, self.stream, read, sequence,
            )

    async def _without_mark(self, last: tuple[int, str | None] | None) -> None:
        """Start a mark: take the last message on the subject as the end of what landed, if it is ours."""
        if self.marks.foreign:
            log.warning("forward: %s was made for another stream; starting a new mark for %r",
                        self.marks.path, self.stream)
        position = self._ours(last[1]) if last is not None else None
        if position is not None and position >= self.receiver.committed_position:
            skipped = await self._commit_before(position, inclusive=True)
            self.stats.skipped += skipped
            log.warning(
                "forward: no mark in %s; took the last message on %r (%s of this queue) as the end of what "
                "landed and committed %d records up to it without publishing",
                self.marks.path, self.subject, position, skipped,
            )
        self.sequence = last[0] if last is not None else 0
        # Before anything is published: every record from here on lands above this sequence.
        self.marks.write(self.sequence, self.receiver.committed_position, durable=True)

    async def _commit_before(self, limit: Position, *, inclusive: bool = False) -> int:
        """Commit, without publishing, the records before ``limit`` (through it with ``inclusive``)."""
        skipped = 0
        while True:
            try:
                batch = await self.receiver.recv_batch(self.window, timeout=0)
            except Empty:
                break
            already = sum(1 for message in batch if message.position < limit or (inclusive and message.position == limit))
            if already == len(batch):
                await batch.commit()
                skipped += already
                continue
            await batch.rollback()
            if already:
                # The first `already` records are ready, so this returns exactly them.
                head = await self.receiver.recv_batch(already, timeout=0)
                await head.commit()
                skipped += already
            break
        return skipped

    def _unlanded(self, messages: list[Message]) -> list[Message]:
        """Return the records of a batch to publish: those catch_up did not find in the stream."""
        assert self.landed_until is not None
        publish = [message for message in messages if message.position not in self.landed]
        self.stats.skipped += len(messages) - len(publish)
        self.holes += sum(1 for message in publish if message.position < self.landed_until)
        if messages[-1].position >= self.landed_until:
            if self.holes:
                log.warning(
                    "forward: %d records before %s had not landed while later ones had (a round cut short by a "
                    "stream leader change); published them now, after those",
                    self.holes, self.landed_until,
                )
                self.stats.republished += self.holes
            self.landed = set()
            self.landed_until = None
        return publish

    async def run(self, link: Link, stop: asyncio.Event) -> None:
        """Publish rounds until ``stop``; raise ``LinkLost`` when the link fails (the batch rolled back)."""
        client = link.client
        loop = asyncio.get_running_loop()
        current = _Round(loop, 0, 0)

        async def on_ack(msg: Msg) -> None:
            current.take(int(msg.subject.rpartition(".")[2]), msg)

        inbox = client.new_inbox()
        await client.subscribe(f"{inbox}.*", cb=on_ack)
        serial = 0
        publish = client.publish
        subject = self.subject
        with watching(link, stop) as (stopping, lost):
            while not stop.is_set():
                if link.lost.is_set():
                    raise LinkLost("the connection to NATS closed")
                receiving = loop.create_task(self.receiver.recv_batch(self.window))
                await asyncio.wait([receiving, stopping, lost], return_when=asyncio.FIRST_COMPLETED)
                if not receiving.done():
                    receiving.cancel()  # a cancelled recv leaves nothing pending
                    await asyncio.gather(receiving, return_exceptions=True)
                    continue
                batch = receiving.result()
                messages = batch.messages
                if self.landed_until is not None:
                    messages = self._unlanded(messages)
                    published = len(messages)
                else:
                    published = len(batch)
                try:
                    while messages:
                        current = _Round(loop, serial + 1, len(messages))
                        for message in messages:
                            serial += 1
                            await publish(subject, message.data, reply=f"{inbox}.{serial}", headers=self._headers(message))
                        # Every acknowledgement, or the link lost, or the timeout: whichever comes first.
                        ends: list[asyncio.Future[Any]] = [current.done, lost]
                        await asyncio.wait(ends, timeout=self.timeout, return_when=asyncio.FIRST_COMPLETED)
                        messages = self._check_acks(messages, current)
                except BaseException as error:
                    await batch.rollback()
                    if isinstance(error, Exception) and not isinstance(error, (LinkLost, BridgeError)):
                        raise LinkLost(f"publishing to {self.subject!r} failed: {error!r}") from None
                    raise
                await batch.commit()
                self.stats.published += published
                self.marks.write(self.sequence, self.receiver.committed_position)

    def _headers(self, message: Message) -> dict[str, str]:
        record_headers = message.headers
        headers = to_nats_headers(record_headers, f"record at {message.position}") if record_headers else {}
        position = message.position
        headers["Nats-Msg-Id"] = f"{self.queue}:{position.segment}:{position.offset}"
        headers["Nats-Expected-Stream"] = self.stream
        return headers

    def _check_acks(self, messages: list[Message], replies: _Round) -> list[Message]:
        """Return the records to publish again; raise unless the rest were stored (or were duplicates).

        A failed suffix is left to ``catch_up`` after a reconnection (it
        finds out what of it landed).  A record refused while a later one
        landed (a stream leader change inside one round) is published again
        at once, after the later ones: the one case where order gives way to
        exactly-once.  Remembers the sequence of the last stored one as the
        next mark's (every later publish lands above it).
        """
        if replies.waiting == len(messages):
            raise LinkLost(
                f"none of {len(messages)} publishes to stream {self.stream!r} was acknowledged "
                f"within {self.timeout:g} s"
            )
        failed: list[Message] = []
        problem: BaseException | None = None
        landed_after_failure = False
        stored = b""
        for message, reply in zip(messages, replies.replies):
            if reply is not None:
                data = reply.data
                # The usual answer, {"stream":"S","seq":N} (and "duplicate":true), needs no JSON parse.
                if data.startswith(b'{"stream":') and b'"error"' not in data:
                    if b'"duplicate":true' in data:
                        self.stats.duplicates += 1
                    landed_after_failure = landed_after_failure or bool(failed)
                    stored = data
                    continue
                problem = self._refusal(message, reply)
                if isinstance(problem, BridgeError):
                    raise problem
            failed.append(message)
        found = _SEQ.search(stored)
        if found is not None:
            self.sequence = int(found.group(1))
        if not failed:
            return []
        if not landed_after_failure:
            raise problem or LinkLost(
                f"{len(failed)} of {len(messages)} publishes to stream {self.stream!r} were not acknowledged "
                f"within {self.timeout:g} s"
            )
        log.warning(
            "forward: %d records (from %s) were not stored while later ones were (a stream leader change?); "
            "publishing them again, after those",
            len(failed), failed[0].position,
        )
        return failed

    def _refusal(self, message: Message, reply: Msg) -> SegqError:
        """Return the error an unusual acknowledgement stands for."""
        if reply.headers and reply.headers.get("Status") == "503":
            return LinkLost(f"no stream answered on {self.subject!r} (no JetStream, or no stream leader yet)")
        try:
            ack: Any = json.loads(reply.data)
        except ValueError:
            return LinkLost(f"a publish acknowledgement was not JSON: {reply.data[:80]!r}")
        error = api_error(ack)
        if error is None:
            return LinkLost(f"a publish acknowledgement said neither stored nor refused: {reply.data[:80]!r}")
        code, description = error
        if code in _REFUSALS:
            return BridgeError(
                f"stream {self.stream!r} refused the record at {message.position} on {self.subject!r}: "
                f"{description}",
                stream=self.stream,
                subject=self.subject,
            )
        return LinkLost(f"stream {self.stream!r} did not store a publish: {description} (code {code})")


class _Round:
    """The acknowledgements of one batch's publishes (serials ``first`` on), and a future done when all came."""

    __slots__ = ("first", "replies", "waiting", "done")

    def __init__(self, loop: asyncio.AbstractEventLoop, first: int, size: int) -> None:
        self.first = first
        self.replies: list[Msg | None] = [None] * size
        self.waiting = size
        self.done: asyncio.Future[None] = loop.create_future()

    def take(self, serial: int, reply: Msg) -> None:
        index = serial - self.first
        # A late reply to an earlier round's publish is ignored: that round is settled.
        if 0 <= index < len(self.replies) and self.replies[index] is None:
            self.replies[index] = reply
            self.waiting -= 1
            if not self.waiting:
                self.done.set_result(None)
