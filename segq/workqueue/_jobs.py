"""Jobs: the claimed records a worker holds, and what it may do with them.

A job's life, seen from its worker, is :data:`JOB_TRANSITIONS`: held until
acked, nacked or lost (its lease ran out and the record went back).  The
record's life, seen from the group, is ``_claims.TRANSITIONS``.
"""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING, Iterable, Iterator, Protocol, Sequence

from .._headers import split_body
from .._lifetime import WithBlock
from .._options import PLAIN_OPTIONS, JobOptions, decode_options, job_id_of
from .._state import Position
from ..errors import ClaimLost, Closed, UsageError

if TYPE_CHECKING:
    from .._followups import Enqueue

__all__ = ["JobState", "JOB_TRANSITIONS", "next_job_state", "Job", "JobBatch", "reason_of"]


class Settler(Protocol):
    """What a job needs of the WorkQueue that claimed it (``_queue.WorkQueue``; no import, so imports flow one way)."""

    path: str

    def _ack(self, job: "Job") -> None: ...

    def _ack_with(self, job: "Job", requests: "Iterable[Enqueue]") -> None: ...

    def _ack_many(self, jobs: list["Job"]) -> None: ...

    def _nack(self, jobs: list["Job"], delay: float, reason: str | None) -> None: ...

    def _renew(self, jobs: list["Job"], lease: float | None) -> None: ...


class JobState(enum.Enum):
    """Where a job stands for the worker holding it."""

    HELD = "held"
    ACKED = "acked"
    NACKED = "nacked"
    LOST = "lost"  # its lease ran out (or its claim went back) before the worker settled it

    __hash__ = object.__hash__  # members are singletons: a C-speed hash for the table lookups


#: A job's life, seen from its worker: (state, call) -> next state.
JOB_TRANSITIONS: dict[tuple[JobState, str], JobState] = {
    (JobState.HELD, "ack"): JobState.ACKED,
    (JobState.HELD, "nack"): JobState.NACKED,
    (JobState.HELD, "renew"): JobState.HELD,
    (JobState.HELD, "lose"): JobState.LOST,
}

_HELD = JobState.HELD


def next_job_state(job: "Job", call: str) -> JobState:
    """Look ``(job.state, call)`` up in :data:`JOB_TRANSITIONS`; a missing key is the error.

    Raises ``ClaimLost`` for a LOST job (its claim went back before), else
    ``UsageError`` naming the call and the job's state.
    """
    following = JOB_TRANSITIONS.get((job.state, call))
    if following is None:
        if job.state is JobState.LOST:
            raise ClaimLost(f"cannot {call} the job at {job.position}: its claim was lost before")
        raise UsageError(f"cannot {call} the job at {job.position}: it is already {job.state.value}")
    return following


class _SettledByWith(WithBlock):
    """What a job and a batch share: leaving a ``with`` block acks what is still held, or nacks it on an exception."""

    __slots__ = ()

    def _still_held(self) -> bool:
        raise NotImplementedError

    def ack(self) -> None:
        raise NotImplementedError

    def nack(self, delay: float = 0.0, reason: str | None = None) -> None:
        raise NotImplementedError

    def _leave(self, error: BaseException | None) -> None:
        if not self._still_held():
            return
        if error is None:
            self.ack()
        else:
            try:
                self.nack(reason=reason_of(error))
            except (ClaimLost, Closed):
                pass  # the record went back anyway; the body's exception matters more


class Job(_SettledByWith):
    """One claimed record.  ``data`` is its payload, ``attempt`` counts claims of it from 1.

    Settle it with ``ack`` (done for good) or ``nack`` (give it back); as a
    context manager it is acked on normal exit and nacked on an exception.
    """

    __slots__ = ("data", "attempt", "lease_expires_at", "state", "_headers", "_queue", "_start", "_token")

    def __init__(
        self, queue: Settler, data: bytes, start: int, token: int, attempt: int, expires: float
    ) -> None:
        if type(data) is not bytes:  # a Framed body: the record has headers
            data, self._headers = split_body(data, queue.path, start)
        self.data = data
        self.attempt = attempt
        self.lease_expires_at = expires  # in the queue's clock (time.time by default)
        self.state = _HELD
        self._queue = queue
        self._start = start
        self._token = token

    @property
    def position(self) -> Position:
        """Where the record starts in the queue."""
        return Position.from_word(self._start)

    @property
    def headers(self) -> dict[str, bytes]:
        """The record's headers, name to value (job options included, as ``segq-`` ones); empty when none."""
        try:
            return self._headers
        except AttributeError:  # a plain record
            return {}

    @property
    def _options(self) -> JobOptions:
        try:
            return decode_options(self._headers)
        except AttributeError:  # a plain record
            return PLAIN_OPTIONS

    @property
    def id(self) -> str:
        """The job's id: the ``job_id`` it was enqueued with, else one derived from its position."""
        return job_id_of(self._options, self._start)

    @property
    def priority(self) -> int:
        """The job's priority, 0 (the default) to 9 (first)."""
        return self._options.priority

    @property
    def run_at(self) -> float | None:
        """When the job was scheduled to run (seconds since the epoch), None if at once."""
        return self._options.run_at or None

    def ack(self, enqueue: "Sequence[Enqueue] | None" = None) -> None:
        """Mark the record done for good; with ``enqueue``, enqueue those follow-ups atomically with it.

        The ack and every follow-up land together or not at all, across a
        SIGKILL at any instant, whatever queue each follow-up targets; each
        lands exactly once.  Raises ``ClaimLost`` (and changes nothing, no
        follow-up included) if the claim is gone.  ``ack()`` is ``ack(enqueue=[])``.
        """
        if enqueue:
            self._queue._ack_with(self, enqueue)  # which refuses a lone Enqueue, not iterating its fields
        else:
            self._queue._ack(self)

    def nack(self, delay: float = 0.0, reason: str | None = None) -> None:
        """Give the record back: claimable again after ``delay`` seconds.

        On the job's ``max_attempts``-th attempt the record goes to the
        dead-letter queue instead, with ``reason``.  Raises ``ClaimLost`` if
        the claim is gone.
        """
        self._queue._nack([self], delay, reason)

    def renew(self, lease: float | None = None) -> None:
        """Extend the lease to ``lease`` seconds from now (default: the queue's lease)."""
        self._queue._renew([self], lease)

    def _still_held(self) -> bool:
        return self.state is _HELD

    def __repr__(self) -> str:
        return f"<segq.Job {len(self.data)} bytes at {self.position}, attempt {self.attempt}, {self.state.value}>"


class JobBatch(_SettledByWith):
    """Jobs claimed together by ``claim_batch``: one lease; settle them together or one by one."""

    __slots__ = ("jobs", "_queue")

    def __init__(self, queue: Settler, jobs: list[Job]) -> None:
        self.jobs = jobs
        self._queue = queue

    def __iter__(self) -> Iterator[Job]:
        return iter(self.jobs)

    def __len__(self) -> int:
        return len(self.jobs)

    def __getitem__(self, index: int) -> Job:
        return self.jobs[index]

    def _held(self) -> list[Job]:
        return [job for job in self.jobs if job.state is _HELD]

    def ack(self) -> None:
        """Ack every job still held, in one transaction; ``ClaimLost`` (nothing changed) if any is gone."""
        self._queue._ack_many(self._held())

    def nack(self, delay: float = 0.0, reason: str | None = None) -> None:
        """Give back every job still held, in one transaction."""
        self._queue._nack(self._held(), delay, reason)

    def renew(self, lease: float | None = None) -> None:
        """Extend the lease of every job still held."""
        self._queue._renew(self._held(), lease)

    def _still_held(self) -> bool:
        return any(job.state is _HELD for job in self.jobs)

    def __repr__(self) -> str:
        return f"<segq.JobBatch of {len(self.jobs)} jobs>"


def reason_of(error: BaseException | None) -> str:
    """Return a nack reason for ``error``: its type name and message."""
    if error is None:
        return ""
    text = str(error)
    return f"{type(error).__name__}: {text}" if text else type(error).__name__
