"""Job options: what ``Sender.enqueue`` takes, checked once, carried in reserved record headers.

A job's options travel inside its record as headers whose names start with
``segq-`` (reserved: ``send`` refuses them from users), so the record stays
self-describing: a plain ``Receiver`` sees them, a dead letter keeps them,
and any process can rebuild a group's claim index by reading the queue.

=================== ================================================
header              value (ASCII unless said)
=================== ================================================
``segq-priority``   one digit ``1``..``9`` (absent: 0)
``segq-run-at``     seconds since the epoch, ``repr`` of a float
``segq-dedup-key``  the dedup key (UTF-8)
``segq-id``         the job id given with ``job_id`` (UTF-8)
=================== ================================================

Only the options given are written: ``enqueue(data)`` writes no header.
A header that does not parse (written by something else) is ignored, so a
foreign record is a plain job rather than an error.
"""

from __future__ import annotations

import datetime
import logging
import math
from collections.abc import Mapping
from typing import NamedTuple, Union

from ._headers import RESERVED_PREFIX
from ._state import word_offset, word_segment
from .errors import InvalidArgument

__all__ = [
    "RESERVED_PREFIX",
    "PRIORITY",
    "RUN_AT",
    "DEDUP_KEY",
    "JOB_ID",
    "MAX_PRIORITY",
    "JobOptions",
    "Enqueued",
    "check_options",
    "check_user_headers",
    "encode_options",
    "default_job_id",
    "job_id_of",
    "decode_options",
]

log = logging.getLogger(__name__)

PRIORITY = "segq-priority"
RUN_AT = "segq-run-at"
DEDUP_KEY = "segq-dedup-key"
JOB_ID = "segq-id"
MAX_PRIORITY = 9
MAX_KEY_BYTES = 1024  # a dedup key or a job id, UTF-8

TimeLike = Union[datetime.datetime, int, float]


class JobOptions(NamedTuple):
    """A job's options: priority 0..9, run_at (epoch seconds, 0.0 = at once), dedup key and explicit id."""

    priority: int = 0
    run_at: float = 0.0
    dedup_key: str | None = None
    job_id: str | None = None


PLAIN_OPTIONS = JobOptions()


class Enqueued(NamedTuple):
    """What ``Sender.enqueue`` did: the job's ``id``, and ``duplicate`` when its dedup key matched a job."""

    id: str
    duplicate: bool


def _epoch(value: object, what: str) -> float:
    if isinstance(value, datetime.datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=datetime.timezone.utc)  # API.md: run_at is a UTC datetime
        return value.timestamp()
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0:
        return float(value)
    raise InvalidArgument(f"{what} must be a datetime or seconds since the epoch (a finite number > 0), not {value!r}")


def _key(value: object, what: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise InvalidArgument(f"{what} must be a non-empty str, not {value!r}")
    if "\x00" in value or len(value.encode("utf-8", "surrogatepass")) > MAX_KEY_BYTES:
        raise InvalidArgument(f"{what} must be at most {MAX_KEY_BYTES} bytes of UTF-8 without NUL, not {value[:40]!r}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidArgument(f"{what} must be valid Unicode (no lone surrogates): {value[:40]!r}") from None
    return value


def check_options(
    *,
    run_at: TimeLike | None,
    delay: float | None,
    priority: int,
    dedup_key: str | None,
    job_id: str | None,
    now: float,
) -> JobOptions:
    """Check ``enqueue``'s options and return them; raise ``InvalidArgument`` naming the first bad one."""
    if isinstance(priority, bool) or not isinstance(priority, int) or not 0 <= priority <= MAX_PRIORITY:
        raise InvalidArgument(f"priority must be an int from 0 to {MAX_PRIORITY}, not {priority!r}")
    if run_at is not None and delay is not None:
        raise InvalidArgument("give run_at or delay, not both")
    when = 0.0
    if run_at is not None:
        when = _epoch(run_at, "run_at")
    elif delay is not None:
        if isinstance(delay, bool) or not isinstance(delay, (int, float)) or not math.isfinite(delay) or delay < 0:
            raise InvalidArgument(f"delay must be a finite number of seconds >= 0, not {delay!r}")
        if delay > 0:
            when = now + delay
    return JobOptions(priority, when, _key(dedup_key, "dedup_key"), _key(job_id, "job_id"))


def check_user_headers(headers: object) -> dict[str, bytes]:
    """Return ``headers`` as ``dict[str, bytes]``; raise ``InvalidArgument`` on a bad or reserved one."""
    if headers is None:
        return {}
    if not isinstance(headers, Mapping):
        raise InvalidArgument(f"headers must be a mapping of str to bytes, not {type(headers).__name__}")
    checked: dict[str, bytes] = {}
    for name, value in headers.items():
        if not isinstance(name, str) or not name or "\x00" in name:
            raise InvalidArgument(f"a header name must be a non-empty str without NUL, not {name!r}")
        if name.startswith(RESERVED_PREFIX):
            raise InvalidArgument(f"header {name!r}: names starting with {RESERVED_PREFIX!r} are reserved for segq")
        if isinstance(value, str):
            value = value.encode("utf-8")
        elif isinstance(value, (bytearray, memoryview)):
            value = bytes(value)
        elif not isinstance(value, bytes):
            raise InvalidArgument(f"header {name!r}: the value must be bytes or str, not {type(value).__name__}")
        checked[name] = value
    return checked


def default_job_id(start: int) -> str:
    """Return the id of a job enqueued without ``job_id``: its record's position, ``SEGMENT-OFFSET``."""
    return f"{word_segment(start)}-{word_offset(start)}"


def job_id_of(options: JobOptions, start: int) -> str:
    """Return the id of the job whose record starts at word ``start`` and carries ``options``."""
    return options.job_id if options.job_id is not None else default_job_id(start)


def encode_options(options: JobOptions) -> dict[str, bytes]:
    """Return the reserved headers that carry ``options`` (none for a plain job)."""
    headers: dict[str, bytes] = {}
    if options.priority:
        headers[PRIORITY] = b"%d" % options.priority
    if options.run_at:
        headers[RUN_AT] = repr(options.run_at).encode("ascii")
    if options.dedup_key is not None:
        headers[DEDUP_KEY] = options.dedup_key.encode("utf-8")
    if options.job_id is not None:
        headers[JOB_ID] = options.job_id.encode("utf-8")
    return headers


def decode_options(headers: Mapping[str, bytes]) -> JobOptions:
    """Return the options a record's headers carry; an unparsable value is ignored (plain default)."""
    if not headers:
        return PLAIN_OPTIONS
    priority = 0
    run_at = 0.0
    raw = headers.get(PRIORITY)
    if raw is not None:
        if len(raw) == 1 and 0x30 <= raw[0] <= 0x39:
            priority = raw[0] - 0x30
        else:
            log.warning("ignoring a %s header that is not one digit: %r", PRIORITY, raw[:20])
    raw = headers.get(RUN_AT)
    if raw is not None:
        try:
            run_at = float(raw)
            if not math.isfinite(run_at) or run_at < 0:
                raise ValueError(raw)
        except ValueError:
            log.warning("ignoring a %s header that is not a time: %r", RUN_AT, raw[:40])
            run_at = 0.0
    dedup = headers.get(DEDUP_KEY)
    job_id = headers.get(JOB_ID)
    return JobOptions(
        priority,
        run_at,
        dedup.decode("utf-8", "replace") if dedup is not None else None,
        job_id.decode("utf-8", "replace") if job_id is not None else None,
    )
