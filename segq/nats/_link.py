"""One connection to NATS for a bridge: connect, ask JetStream's API, back off, convert headers.

Theory of operation
-------------------
A bridge owns its connection's whole life.  nats-py's own reconnection is
turned off (``allow_reconnect=False``) on purpose: while it reconnects it
buffers publishes and sends them on the *next* connection, so a record
published after the link broke could land before one that was lost with the
broken link, and the stream would no longer hold a prefix of the queue.
With one connection per attempt, everything sent on a dead connection is
either in the stream or lost, in order; the bridge then finds out which (see
``_forward``) and continues on a new connection.

Errors come in two kinds.  ``LinkLost`` (server unreachable, connection
dropped, an acknowledgement that never came, a stream without a leader) is
retried with ``Backoff`` (by ``_pump``).  ``BridgeError`` (no such stream, a
subject the stream does not take, a record the stream refuses) is the
user's to fix: the bridge stops and says what and where.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import random
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from ..errors import SegqError

if TYPE_CHECKING:
    from nats.aio.client import Client

__all__ = [
    "BridgeError",
    "LinkLost",
    "Backoff",
    "Link",
    "connect",
    "api_request",
    "stream_config",
    "subject_matches",
    "to_nats_headers",
    "from_nats_headers",
    "wait_or_stop",
    "servers_list",
    "stored_headers",
]

log = logging.getLogger("segq.nats")

# JetStream API error codes the bridges tell apart (nats-server's errors.json).
STREAM_NOT_FOUND = 10059
CONSUMER_NOT_FOUND = 10014
NO_MESSAGE = 10037  # STREAM.MSG.GET found nothing (an empty subject, nothing after that sequence)
# A record header whose value is not plain text is sent base64-encoded; this
# header lists the names of those (comma-separated), so the far side can undo it.
B64_HEADER = "segq-b64"


class BridgeError(SegqError):
    """NATS refused what the bridge asked: ``server``, ``stream`` and ``subject`` say where; fix and restart."""

    def __init__(
        self, message: str, *, server: str | None = None, stream: str | None = None, subject: str | None = None
    ) -> None:
        super().__init__(message)
        self.server = server
        self.stream = stream
        self.subject = subject


class LinkLost(SegqError):
    """The connection to NATS broke or stalled; the bridge reconnects and carries on."""


class Backoff:
    """Delays between reconnection attempts: doubling from ``first`` to ``longest``, with jitter."""

    def __init__(self, first: float = 0.1, longest: float = 5.0) -> None:
        self.first = first
        self.longest = longest
        self._next = first

    def reset(self) -> None:
        self._next = self.first

    def next_delay(self) -> float:
        delay = self._next
        self._next = min(self.longest, self._next * 2)
        # Jitter spreads the reconnections of many bridges after one server restart.
        return delay * random.uniform(0.5, 1.0)


async def wait_or_stop(stop: asyncio.Event, seconds: float) -> bool:
    """Sleep ``seconds`` unless ``stop`` is set first; return True if it was."""
    try:
        await asyncio.wait_for(stop.wait(), seconds)
    except asyncio.TimeoutError:
        return False
    return True


def _import_nats() -> Any:
    try:
        import nats
    except ImportError:
        raise SegqError("the NATS bridge needs nats-py: pip install 'segq[nats]'") from None
    return nats


class Link:
    """One connection: ``client``, and ``lost``, set when it closes for any reason."""

    def __init__(self, client: Client, lost: asyncio.Event) -> None:
        self.client = client
        self.lost = lost

    @property
    def server(self) -> str:
        url = self.client.connected_url
        return url.netloc if url is not None else "?"

    async def close(self) -> None:
        """Close the connection; a broken one may fail to close, and is gone either way."""
        try:
            await self.client.close()
        except Exception as error:  # noqa: BLE001
            log.debug("closing the NATS connection: %s", error)


async def connect(servers: Sequence[str], *, name: str, timeout: float = 2.0) -> Link:
    """Open one connection (tried on each server in turn); raise ``LinkLost`` if none answers."""
    nats = _import_nats()
    lost = asyncio.Event()

    async def quiet(error: Exception) -> None:
        log.debug("nats: %s", error)

    async def on_lost() -> None:
        lost.set()

    try:
        client: Client = await nats.connect(
            list(servers),
            name=name,
            allow_reconnect=False,
            connect_timeout=timeout,
            # Each server is tried twice (nats-py counts from 0; 0 would mean forever).
            max_reconnect_attempts=1,
            reconnect_time_wait=0.05,
            error_cb=quiet,
            # The bridges check their subjects once, at the start; not per publish.
            skip_subject_validation=True,
            disconnected_cb=on_lost,
            closed_cb=on_lost,
        )
    except Exception as error:  # noqa: BLE001 - nats-py raises many kinds; all mean "not reachable"
        raise LinkLost(f"cannot reach NATS at {', '.join(servers)}: {_describe(error)}") from None
    return Link(client, lost)


def _describe(error: BaseException) -> str:
    text = str(error).strip()
    name = type(error).__name__
    return f"{name}: {text}" if text and text != name else name


async def api_request(client: Client, subject: str, request: Mapping[str, Any] | None, timeout: float) -> Any:
    """Send one JetStream API request and return its decoded JSON reply (errors included).

    Raises ``LinkLost`` when no reply comes (no JetStream, no leader, a dead link).
    """
    payload = b"" if request is None else json.dumps(request).encode()
    try:
        reply = await client.request(subject, payload, timeout=timeout)
    except Exception as error:  # noqa: BLE001 - timeouts, no responders, closed connections
        raise LinkLost(f"JetStream did not answer {subject}: {_describe(error)}") from None
    try:
        return json.loads(reply.data)
    except ValueError:
        raise LinkLost(f"JetStream answered {subject} with something that is not JSON: {reply.data[:80]!r}") from None


def api_error(reply: Any) -> tuple[int, str] | None:
    """Return (error code, description) if the API reply is an error, else None."""
    error = reply.get("error") if isinstance(reply, dict) else None
    if not error:
        return None
    return int(error.get("err_code") or error.get("code") or 0), str(error.get("description", error))


async def stream_config(client: Client, stream: str, server: str, timeout: float) -> dict[str, Any]:
    """Return the stream's configuration; ``BridgeError`` if there is no such stream."""
    reply = await api_request(client, f"$JS.API.STREAM.INFO.{stream}", None, timeout)
    error = api_error(reply)
    if error is not None:
        code, description = error
        if code == STREAM_NOT_FOUND:
            raise BridgeError(
                f"no stream {stream!r} on {server}: create it first (e.g. `nats stream add {stream}`)",
                server=server,
                stream=stream,
            )
        raise BridgeError(f"stream {stream!r} on {server}: {description}", server=server, stream=stream)
    config: dict[str, Any] = reply["config"]
    return config


def subject_matches(subject: str, pattern: str) -> bool:
    """Tell whether the literal ``subject`` is matched by ``pattern`` (NATS wildcards ``*`` and ``>``)."""
    tokens = subject.split(".")
    wanted = pattern.split(".")
    for index, token in enumerate(wanted):
        if token == ">":
            return len(tokens) > index
        if index >= len(tokens) or (token != "*" and token != tokens[index]):
            return False
    return len(tokens) == len(wanted)


def _is_plain(value: str) -> bool:
    # NATS header lines end at CR/LF and lose surrounding blanks: such values travel base64-encoded.
    return value == value.strip() and "\r" not in value and "\n" not in value and value.isprintable()


def to_nats_headers(headers: Mapping[str, bytes], where: str) -> dict[str, str]:
    """Turn a record's headers into NATS headers (values NATS cannot carry as text go base64).

    Raises ``BridgeError`` for a header name NATS cannot carry (``where``
    names the record).
    """
    converted: dict[str, str] = {}
    encoded: list[str] = []
    for key, value in headers.items():
        if not key.isprintable() or ":" in key or any(ch.isspace() for ch in key) or key == B64_HEADER:
            raise BridgeError(f"{where}: header name {key!r} cannot be carried by NATS (no ':', blanks or controls)")
        try:
            text = value.decode("utf-8")
        except UnicodeDecodeError:
            text = ""
            plain = False
        else:
            plain = _is_plain(text)
        if plain:
            converted[key] = text
        else:
            converted[key] = base64.b64encode(value).decode("ascii")
            encoded.append(key)
    if encoded:
        converted[B64_HEADER] = ",".join(encoded)
    return converted


def from_nats_headers(headers: Mapping[str, str] | None) -> dict[str, bytes]:
    """Turn a NATS message's headers back into record headers (NATS's own ``Nats-*`` ones dropped)."""
    if not headers:
        return {}
    encoded = set(filter(None, headers.get(B64_HEADER, "").split(",")))
    record: dict[str, bytes] = {}
    for key, value in headers.items():
        if key == B64_HEADER or key.lower().startswith("nats-") or key.lower() in ("status", "description"):
            continue
        record[key] = base64.b64decode(value) if key in encoded else value.encode("utf-8")
    return record


def servers_list(servers: str | Sequence[str]) -> list[str]:
    """Return ``servers`` (one URL or many) as a list."""
    return [servers] if isinstance(servers, str) else list(servers)


def stored_headers(message: dict[str, Any]) -> dict[str, str]:
    """Decode the headers of a message returned by ``STREAM.MSG.GET`` (base64 of a NATS/1.0 block)."""
    raw = message.get("hdrs")
    if not raw:
        return {}
    lines = base64.b64decode(raw).decode("utf-8", "replace").split("\r\n")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        key, colon, value = line.partition(":")
        if colon:
            headers.setdefault(key.strip(), value.strip())
    return headers

