"""Follow-up jobs: what a worker asks to be enqueued atomically with its ack.

A :class:`Enqueue` is only a description; ``Job.ack(enqueue=[...])`` (in the
work queue) is what makes the ack and the follow-ups land together.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass, field
from typing import Mapping, Union

from ._args import check_path
from ._segment import StrPath
from .errors import InvalidArgument

__all__ = ["Enqueue", "HeaderValue"]

HeaderValue = Union[bytes, str]


@dataclass(frozen=True)
class Enqueue:
    """Describe one follow-up job: ``data`` for ``queue`` (None: the acked job's own queue).

    ``run_at`` (a UTC ``datetime`` or epoch seconds) or ``delay`` (seconds),
    ``priority`` (0..9), ``dedup_key``, ``job_id`` and ``headers`` mean what
    they mean for ``Sender.enqueue``.

    >>> import segq
    >>> segq.Enqueue(b"upload photo-1.jpg", queue="uploads")
    Enqueue(data=b'upload photo-1.jpg', queue='uploads', run_at=None, delay=None, priority=0, dedup_key=None, job_id=None, headers=None)
    """

    data: bytes
    queue: StrPath | None = None
    run_at: datetime.datetime | float | None = None
    delay: float | None = None
    priority: int = 0
    dedup_key: str | None = None
    job_id: str | None = None
    headers: Mapping[str, HeaderValue] | None = field(default=None)

    def __post_init__(self) -> None:
        if isinstance(self.data, (bytearray, memoryview)):
            object.__setattr__(self, "data", bytes(self.data))
        elif isinstance(self.data, str):
            raise InvalidArgument("Enqueue data must be bytes, not str: encode it first (e.g. text.encode())")
        elif not isinstance(self.data, bytes):
            raise InvalidArgument(f"Enqueue data must be bytes, not {type(self.data).__name__}")
        if self.queue is not None:
            object.__setattr__(self, "queue", check_path(self.queue, "queue"))
        if self.run_at is not None and self.delay is not None:
            raise InvalidArgument("give a follow-up run_at or delay, not both")
        if self.delay is not None and (
            not isinstance(self.delay, (int, float)) or isinstance(self.delay, bool) or not self.delay >= 0
        ):
            raise InvalidArgument(f"delay must be a number of seconds >= 0, not {self.delay!r}")
        if not isinstance(self.priority, int) or isinstance(self.priority, bool) or not 0 <= self.priority <= 9:
            raise InvalidArgument(f"priority must be an int from 0 to 9, not {self.priority!r}")
