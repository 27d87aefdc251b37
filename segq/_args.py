"""Argument checks shared by every entry point: paths, timeouts, intervals.

Each check runs once per call at an entry point (a constructor, a blocking
call's start), never per record, and raises :class:`InvalidArgument` (a
``ValueError``) naming the argument and the value, so a NaN or a negative
timeout fails at once instead of hanging or passing silently.

| argument        | accepted                                   | refused                              |
|-----------------|--------------------------------------------|--------------------------------------|
| path            | str, bytes, ``os.PathLike`` of either      | empty, contains NUL, any other type  |
| timeout         | None (forever), int/float >= 0, inf (None) | negative, NaN, bool, str, ...        |
| interval (sync) | finite int/float in [MIN, MAX] seconds     | NaN, inf, out of range, bool, str    |
"""

from __future__ import annotations

import math
import os
from typing import Union

from .errors import InvalidArgument

__all__ = ["check_path", "check_timeout", "check_interval", "SyncPolicy", "parse_sync", "MIN_INTERVAL", "MAX_INTERVAL"]

# A group commit more often than every millisecond is a busy loop; one less
# often than daily is no policy at all (and overflows the wait primitives).
MIN_INTERVAL = 0.001
MAX_INTERVAL = 86400.0

PathArgument = Union[str, bytes, "os.PathLike[str]", "os.PathLike[bytes]"]
SyncPolicy = Union[str, float, int]  # "never", "always", or a group-commit interval in seconds


def check_path(path: object, name: str = "path") -> str:
    """Return ``path`` as a str, or raise :class:`InvalidArgument` saying what is wrong with it.

    Bytes paths are accepted and decoded the way ``os.fsdecode`` does, so any
    name the file system holds can be given.
    """
    try:
        text = os.fsdecode(path)  # type: ignore[arg-type]
    except TypeError:
        raise InvalidArgument(
            f"{name} must be a str, bytes or os.PathLike, not {type(path).__name__}", name=name
        ) from None
    if not text:
        raise InvalidArgument(f"{name} is empty", name=name)
    if "\0" in text:
        raise InvalidArgument(f"{name} {text!r} contains a NUL character", name=name)
    return text


def check_timeout(timeout: object, name: str = "timeout") -> float | None:
    """Return ``timeout`` as seconds (None to wait forever); refuse negative, NaN and non-numbers.

    A negative timeout raises, as ``queue.Queue`` does; ``inf`` (and anything
    past what the OS can wait) means forever.
    """
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
        raise InvalidArgument(
            f"{name} must be a number of seconds or None, not {type(timeout).__name__} {timeout!r}", name=name
        )
    seconds = float(timeout)
    if math.isnan(seconds):
        raise InvalidArgument(f"{name} must be a number of seconds, not NaN", name=name)
    if seconds < 0:
        raise InvalidArgument(f"{name} must be non-negative, not {timeout!r}", name=name)
    if seconds > 1e9:  # over 31 years: no wait primitive takes it, and it means "forever"
        return None
    return seconds


def check_interval(interval: object, name: str = "interval") -> float:
    """Return ``interval`` as seconds if it is a finite number in [MIN_INTERVAL, MAX_INTERVAL]."""
    if isinstance(interval, bool) or not isinstance(interval, (int, float)):
        raise InvalidArgument(f"{name} must be a number of seconds, not {type(interval).__name__}", name=name)
    seconds = float(interval)
    if not MIN_INTERVAL <= seconds <= MAX_INTERVAL:  # NaN fails this too
        raise InvalidArgument(
            f"{name} must be from {MIN_INTERVAL} to {MAX_INTERVAL:g} seconds, not {interval!r}", name=name
        )
    return seconds


def parse_sync(sync: SyncPolicy) -> float | None:
    """Return the group-commit interval of a sync policy: 0 for "always", None for "never"."""
    if sync == "never":
        return None
    if sync == "always":
        return 0.0
    if isinstance(sync, (int, float)) and not isinstance(sync, bool):
        return check_interval(sync, "sync")
    raise InvalidArgument(
        f"bad sync policy {sync!r}: use 'never', 'always' or a number of seconds from "
        f"{MIN_INTERVAL} to {MAX_INTERVAL:g}",
        name="sync",
    )
