"""A work-queue group's state: records, their claims, and the journal entries that change them.

Theory of operation
-------------------
Every record of the queue is, for a group, in one of the states of
:class:`RecordState`; :data:`TRANSITIONS` is the whole state machine.  The
group keeps only what it needs to tell them apart:

- the *claim head*: records at or past it were never claimed (PENDING);
- the *low-water mark*: records below it are done and forgotten (PASSED);
- between the two, every record is in exactly one of four tables:
  ``claims`` (CLAIMED: token, lease end, owner, attempt), ``waiting``
  (WAITING: given back, claimable again from ``available_at``), ``done``
  (DONE: acked or dead-lettered, but a record before it is not) or
  ``skipped`` (PENDING below the head: a claim of a higher-priority or
  earlier-due record went past it; each carries its priority and run_at, so
  every replica can order it without reading the queue).

The mark moves when the record at it becomes DONE, over every DONE record
after it.  Records never straddle segments, so when no record starts at the
mark while the head is past it, the mark is at an end-of-segment marker and
moves to the next segment's first record.

A :class:`GroupState` is pure data: no I/O.  ``apply`` replays one journal
entry (``_journal``); the work queue calls the same methods for its own
operations after appending their entries, so the state a process computes
and the state a replay computes are one code path.
"""

from __future__ import annotations

import enum
import heapq
import math
import operator
import struct
import zlib
from functools import partial
from itertools import islice, starmap
from typing import Any, Iterable, NamedTuple, Sequence

from .._state import Position, word_segment
from .._liveness import Owner
from ._journal import ENTRY_HEADER, HEADER_SIZE, Journal, Kind, entry, entry_prefix_crc, recover_hint
from ..errors import CorruptionError, SegqError

__all__ = [
    "RecordState",
    "Event",
    "TRANSITIONS",
    "IllegalTransition",
    "next_state",
    "Claim",
    "Waiting",
    "GroupState",
    "Owner",
    "STATE_BODY",
    "CLAIM_BODY",
    "CLAIM_RECORD",
    "CLAIM_ONE",
    "ACK_ONE",
    "LIST_HEAD",
    "PAIR",
    "RETURN_BODY",
    "RENEW_HEAD",
    "OUTBOX_HEAD",
    "SKIP_RECORD",
    "Skipped",
    "attempt_word",
    "MAX_PRIORITY",
    "encode_return",
    "encode_skips",
    "describe_word",
    "load_state",
    "replay",
]



class RecordState(enum.Enum):
    """Where a record stands for one group."""

    PENDING = "pending"  # at or past the claim head: never claimed
    CLAIMED = "claimed"  # held by a worker until its lease ends
    WAITING = "waiting"  # given back; claimable again from its available_at
    DONE = "done"  # acked or dead-lettered, above the low-water mark
    PASSED = "passed"  # below the low-water mark: done and forgotten

    # Members are singletons: hash them by identity, in C, for the table lookups.
    __hash__ = object.__hash__


class Event(enum.Enum):
    """What can happen to a record."""

    CLAIM = "claim"
    ACK = "ack"
    DEAD = "dead-letter"
    RETURN = "return"  # nack, lease run out, owner died, worker closed
    RENEW = "renew"
    SKIP = "skip"  # a claim went past a PENDING record that must wait (lower priority, not yet due)

    __hash__ = object.__hash__


#: The state machine: (state, event) -> next state.  Anything else is illegal.
TRANSITIONS: dict[tuple[RecordState, Event], RecordState] = {
    (RecordState.PENDING, Event.CLAIM): RecordState.CLAIMED,
    (RecordState.WAITING, Event.CLAIM): RecordState.CLAIMED,
    (RecordState.CLAIMED, Event.ACK): RecordState.DONE,
    (RecordState.CLAIMED, Event.DEAD): RecordState.DONE,
    (RecordState.CLAIMED, Event.RETURN): RecordState.WAITING,
    (RecordState.CLAIMED, Event.RENEW): RecordState.CLAIMED,
    (RecordState.PENDING, Event.SKIP): RecordState.PENDING,
}


def next_state(start: int, state: RecordState, event: Event, detail: str = "") -> RecordState:
    """Look ``(state, event)`` up in :data:`TRANSITIONS`; a missing key raises ``IllegalTransition``."""
    following = TRANSITIONS.get((state, event))
    if following is None:
        raise IllegalTransition(start, state, event, detail)
    return following


class IllegalTransition(SegqError):
    """An event does not apply to the record's state; ``state`` and ``event`` say which."""

    def __init__(self, start: int, state: RecordState, event: Event, detail: str = "") -> None:
        self.start = start
        self.state = state
        self.event = event
        super().__init__(f"cannot {event.value} the record at {describe_word(start)}: it is {state.value}{detail}")


_PENDING, _WAITING, _CLAIMED = RecordState.PENDING, RecordState.WAITING, RecordState.CLAIMED
_transition = TRANSITIONS.get
_CLAIM = Event.CLAIM


def describe_word(word: int) -> str:
    """Print a position word as ``segment S offset O``."""
    return str(Position.from_word(word))


class Claim:
    """A CLAIMED record: who holds it, until when, which claim (token) it is, and the job's priority."""

    __slots__ = ("end", "token", "expires", "owner", "attempt", "priority")

    def __init__(self, end: int, token: int, expires: float, owner: Owner, attempt: int, priority: int = 0) -> None:
        self.end = end
        self.token = token
        self.expires = expires
        self.owner = owner
        self.attempt = attempt
        self.priority = priority


class Waiting:
    """A WAITING record: how many attempts it had, when it may go again, why it came back, its priority."""

    __slots__ = ("end", "attempts", "available_at", "reason", "priority")

    def __init__(self, end: int, attempts: int, available_at: float, reason: str, priority: int = 0) -> None:
        self.end = end
        self.attempts = attempts
        self.available_at = available_at
        self.reason = reason
        self.priority = priority


class Skipped(NamedTuple):
    """A PENDING record below the head: where it ends, its priority, and when it is due (0.0: now)."""

    end: int
    priority: int
    run_at: float


_first = operator.itemgetter(0)
_second = operator.itemgetter(1)

#: ``Skipped`` from a tuple ``(end, priority, run_at)``, without the NamedTuple's Python ``__new__``
#: (a claim going past a backlog makes one per record).
new_skipped = partial(tuple.__new__, Skipped)

# Entry bodies (docs/workqueue.md).
STATE_BODY = struct.Struct("<QQQQQ")  # head, mark, next token, dead-letter total, acked total
STATE_BODY_V1 = struct.Struct("<QQQQ")  # as written before the acked total: still read
CLAIM_BODY = struct.Struct("<QdIdI")  # token, lease end, owner PID, owner start time, count
CLAIM_RECORD = struct.Struct("<QQI")  # start, end, attempt word (attempt_word)
SKIP_RECORD = struct.Struct("<QQBd")  # start, end, priority, run_at (0.0: due at once)
_ATTEMPT_BITS = 24  # an attempt word: attempt (or attempts) in the low 24 bits, the job's priority above
_ATTEMPT_MASK = (1 << _ATTEMPT_BITS) - 1


def attempt_word(attempt: int, priority: int) -> int:
    """Pack an attempt count and a job priority into the u32 the journal stores (old journals: priority 0)."""
    return priority << _ATTEMPT_BITS | attempt
CLAIM_ONE = struct.Struct("<QdIdIQQI")  # a CLAIM of one record, packed in one call
LIST_HEAD = struct.Struct("<I")  # count of the pairs that follow (ACK, DEAD, DONE)
PAIR = struct.Struct("<QQ")  # (start, token) in ACK/DEAD/RENEW, (start, end) in DONE
ACK_ONE = struct.Struct("<IQQ")  # an ACK of one record
RETURN_BODY = struct.Struct("<QQdIH")  # start, token (end in WAITING), available_at, attempts, reason length
RENEW_HEAD = struct.Struct("<dI")  # lease end, count
OUTBOX_HEAD = struct.Struct("<QQI")  # acked record's start, claim token, follow-up count (segq._outbox)
_MAX_REASON = 4000
MAX_PRIORITY = 9


def encode_return(
    kind: int, start: int, token_or_end: int, available_at: float, attempts: int, reason: str, priority: int = 0
) -> bytes:
    """Return a framed RETURN (or snapshot WAITING) entry; long reasons are cut to 4000 bytes."""
    text = reason.encode("utf-8", "replace")[:_MAX_REASON]
    word = attempt_word(attempts, priority)
    return entry(kind, RETURN_BODY.pack(start, token_or_end, available_at, word, len(text)) + text)


def encode_skips(kind: int, records: list[tuple[int, Skipped]]) -> list[bytes]:
    """Return framed SKIP (or snapshot PENDING) entries for ``(start, Skipped)`` pairs, in chunks that fit."""
    # (start,) + item, packed, record by record in C: a claim may skip a million.
    return [
        entry(
            kind,
            LIST_HEAD.pack(len(chunk))
            + b"".join(
                starmap(SKIP_RECORD.pack, map(operator.add, zip(map(_first, chunk)), map(_second, chunk)))
            ),
        )
        for chunk in _chunks(records, 100_000)
    ]


def _pairs(body: bytes) -> Iterable[tuple[int, int]]:
    (count,) = LIST_HEAD.unpack_from(body, 0)
    if LIST_HEAD.size + count * PAIR.size != len(body):
        raise ValueError("list length does not match the entry size")
    return PAIR.iter_unpack(body[LIST_HEAD.size :])


class GroupState:
    """One group's records between its low-water mark and its claim head."""

    def __init__(self, head: int, mark: int, next_token: int = 1, dead_total: int = 0, acked_total: int = 0) -> None:
        self.head = head
        self.mark = mark
        self.next_token = next_token
        self.dead_total = dead_total
        self.acked_total = acked_total
        self.claims: dict[int, Claim] = {}
        self.waiting: dict[int, Waiting] = {}
        self.done: dict[int, int] = {}  # start -> end
        self.skipped: dict[int, Skipped] = {}  # PENDING records below the head
        # Every record the head passed (claimed or skipped), counted from this replica's load:
        # records in [head, x) number (records counted up to x) - head_ordinal.
        self.head_ordinal = 0
        # Records skipped since this replica was loaded, in order: the claim index picks them up.
        self.skip_log: list[tuple[int, Skipped]] = []
        self.owners: dict[Owner, int] = {}  # owner -> number of its claims
        self.next_expiry = math.inf  # no claim's lease ends before this (a lower bound)
        self._delayed: list[tuple[float, int]] = []  # heap of (available_at, start) of WAITING records
        self._ready: list[tuple[int, int]] = []  # heap of (-priority, start) of WAITING records whose time has come
        # The last journal entry, when it is an OUTBOX (its body) or the SENT after
        # one: the next lock holder finishes or cleans up after it (segq._outbox).
        self.outbox: bytes | None = None
        self.outbox_sent = False

    # -- what a record is ------------------------------------------------

    def state_of(self, start: int) -> RecordState:
        """Return the state of the record starting at ``start``."""
        if start in self.claims:
            return RecordState.CLAIMED
        if start in self.waiting:
            return RecordState.WAITING
        if start in self.done:
            return RecordState.DONE
        if start >= self.head or start in self.skipped:
            return RecordState.PENDING
        return RecordState.PASSED

    def _illegal(self, start: int, event: Event, token: int = 0) -> IllegalTransition:
        state = self.state_of(start)
        detail = ""
        if state is RecordState.CLAIMED and token:
            detail = f" by another claim (token {self.claims[start].token}, not {token})"
        return IllegalTransition(start, state, event, detail)

    def held(self, start: int, token: int) -> Claim | None:
        """Return the claim ``token`` on the record at ``start`` if it is still in force."""
        claim = self.claims.get(start)
        if claim is None or claim.token != token:
            return None
        return claim

    # -- transitions -----------------------------------------------------

    def claim(
        self, token: int, expires: float, owner: Owner, start: int, end: int, attempt: int, priority: int = 0
    ) -> None:
        """PENDING or WAITING -> CLAIMED."""
        head = self.head
        if start >= head:
            # Every claim and skip ends at or below the head, so a record at or past it is PENDING.
            # The hot path: the table lookup written out (next_state raises on a missing key).
            if _transition((_PENDING, _CLAIM)) is None:
                next_state(start, _PENDING, _CLAIM)
            if start != head and self.mark == head:
                # The reader stepped over an end-of-segment marker at the head,
                # where the mark waits too: move the mark over it as well.
                self.mark = start
            self.head = end
            self.head_ordinal += 1
        elif self.waiting.pop(start, None) is not None:
            next_state(start, _WAITING, _CLAIM)
        elif self.skipped.pop(start, None) is not None:
            next_state(start, _PENDING, _CLAIM)
        else:
            next_state(start, self.state_of(start), _CLAIM)  # raises: CLAIMED, DONE or PASSED
        self.claims[start] = Claim(end, token, expires, owner, attempt, priority)
        owners = self.owners
        owners[owner] = owners.get(owner, 0) + 1
        if expires < self.next_expiry:
            self.next_expiry = expires
        if token >= self.next_token:
            self.next_token = token + 1

    def skip(self, start: int, end: int, priority: int, run_at: float) -> None:
        """PENDING at the head -> PENDING below it: a claim goes past the record, which keeps its turn."""
        self.skip_run([(start, Skipped(end, priority, run_at))])

    def skip_run(self, records: Sequence[tuple[int, Skipped]]) -> None:
        """Skip records in position order (one table lookup for the run: each is PENDING at the head)."""
        if not records:
            return
        head, mark = self.head, self.mark
        first = records[0][0]
        if first >= head:
            next_state(first, _PENDING, Event.SKIP)
        starts = list(map(_first, records))
        ends = list(map(_first, map(_second, records)))
        # Each record past the end of the one before, each ending past its start (checked in C):
        # then only the first can move the mark, and the head ends at the last one's end.
        if first >= head and all(map(operator.ge, starts[1:], ends)) and all(map(operator.gt, ends, starts)):
            if first != head and mark == head:
                mark = first  # over an end-of-segment marker, as in claim
            count = len(records)
            head = ends[-1]
        else:
            count = 0
            for start, item in records:  # the walk record by record, to stop where it goes wrong
                if start < head:
                    break
                if start != head and mark == head:
                    mark = start
                head = item[0]  # end
                count += 1
        run = records if count == len(records) else records[:count]
        self.skipped.update(run)
        self.skip_log.extend(run)
        self.head, self.mark = head, mark
        self.head_ordinal += count
        if count < len(records):
            start = records[count][0]
            raise IllegalTransition(start, self.state_of(start), Event.SKIP, " (below the claim head)")

    def check_claim(self, below: list[int], steps: list[int]) -> None:
        """Raise ``IllegalTransition`` unless one append may claim and skip these records; change nothing.

        ``below``: records below the head to claim (WAITING, or PENDING in
        ``skipped``); ``steps``: the records the head passes (claimed or
        skipped), in position order.  Called before the entry is appended,
        while the lock is held: an entry the replay would refuse must fail in
        its caller, never reach the journal (where it would stop every later
        replay).
        """
        head = self.head
        if below:
            waiting, skipped = self.waiting, self.skipped
            seen: set[int] = set()
            for start in below:
                if start in seen:
                    raise IllegalTransition(start, _CLAIMED, _CLAIM, " (twice in one claim)")
                seen.add(start)
                if start >= head or (start not in waiting and start not in skipped):
                    raise IllegalTransition(start, self.state_of(start), _CLAIM, " (not claimable below the claim head)")
        # Each step past the last (the head moves over them one by one); the comparison runs in C.
        if steps and (steps[0] < head or not all(map(operator.lt, steps, islice(steps, 1, None)))):
            for start in steps:
                if start < head:
                    raise IllegalTransition(start, self.state_of(start), _CLAIM, " (below the claim head)")
                head = start + 1

    def _release(self, start: int, token: int, event: Event) -> Claim:
        claim = self.claims.get(start)
        if claim is None:
            next_state(start, self.state_of(start), event)  # raises: only a CLAIMED record can be released
        if _transition((_CLAIMED, event)) is None:
            next_state(start, _CLAIMED, event)
        if claim is None or claim.token != token:
            raise self._illegal(start, event, token)  # CLAIMED, by another claim
        del self.claims[start]
        owners = self.owners
        left = owners[claim.owner] - 1
        if left:
            owners[claim.owner] = left
        else:
            del owners[claim.owner]
        return claim

    def settle(self, start: int, token: int, dead: bool = False) -> None:
        """CLAIMED -> DONE (ack, or dead-lettered when ``dead``); move the mark if it can."""
        claim = self._release(start, token, Event.DEAD if dead else Event.ACK)
        if dead:
            self.dead_total += 1
        else:
            self.acked_total += 1
        if start == self.mark:
            self.mark = claim.end
            if self.done or self.mark < self.head:
                self._advance_mark()
        else:
            self.done[start] = claim.end

    def give_back(self, start: int, token: int, available_at: float, attempts: int, reason: str) -> None:
        """CLAIMED -> WAITING: claimable again from ``available_at``."""
        claim = self._release(start, token, Event.RETURN)
        self.waiting[start] = Waiting(claim.end, attempts, available_at, reason, claim.priority)
        heapq.heappush(self._delayed, (available_at, start))

    def renew(self, start: int, token: int, expires: float) -> None:
        """CLAIMED -> CLAIMED with a new lease end."""
        claim = self.claims.get(start)
        next_state(start, _CLAIMED if claim is not None else self.state_of(start), Event.RENEW)
        if claim is None or claim.token != token:
            raise self._illegal(start, Event.RENEW, token)  # CLAIMED, by another claim
        claim.expires = expires
        if expires < self.next_expiry:
            self.next_expiry = expires

    def _advance_mark(self) -> None:
        mark, head, done = self.mark, self.head, self.done
        while mark < head:
            end = done.pop(mark, None)
            if end is not None:
                mark = end
            elif mark in self.claims or mark in self.waiting or mark in self.skipped:
                break
            elif word_segment(mark) >= word_segment(head):
                break
            else:
                # No record starts here yet the head is past: an end-of-segment marker.
                mark = Position.bottom(word_segment(mark) + 1).word
        self.mark = mark

    def raise_mark(self, floor: int) -> None:
        """Forget every record below ``floor`` (known done elsewhere) and move the mark there."""
        for table in (self.claims, self.waiting, self.done, self.skipped):
            for start in [start for start in table if start < floor]:
                del table[start]
        self.owners = {}
        for claim in self.claims.values():
            self.owners[claim.owner] = self.owners.get(claim.owner, 0) + 1
        self.mark = floor
        self.head = max(self.head, floor)
        self._advance_mark()

    # -- what can be claimed --------------------------------------------

    def _move_due(self, now: float) -> None:
        delayed, ready, waiting = self._delayed, self._ready, self.waiting
        while delayed and delayed[0][0] <= now:
            available_at, start = heapq.heappop(delayed)
            item = waiting.get(start)
            if item is not None and item.available_at == available_at:
                heapq.heappush(ready, (-item.priority, start))

    def ready_priority(self, now: float) -> int:
        """Return the highest priority of a WAITING record claimable at ``now``, or -1 if none is."""
        self._move_due(now)
        ready, waiting = self._ready, self.waiting
        while ready:
            negative, start = ready[0]
            item = waiting.get(start)
            if item is not None and item.available_at <= now and item.priority == -negative:
                return -negative
            heapq.heappop(ready)  # claimed meanwhile, or given back again for later
        return -1

    def take_ready(self, now: float, limit: int, priority: int = 0) -> list[int]:
        """Remove and return up to ``limit`` WAITING records claimable at ``now`` of at least ``priority``.

        Highest priority first, lowest position first within one.
        """
        self._move_due(now)
        ready, waiting = self._ready, self.waiting
        picked: list[int] = []
        while ready and len(picked) < limit and -ready[0][0] >= priority:
            _, start = heapq.heappop(ready)
            item = waiting.get(start)
            if item is None or item.available_at > now or (picked and picked[-1] == start):
                continue  # claimed meanwhile, or given back again for later, or a duplicate
            picked.append(start)
        return picked

    def has_ready(self, now: float) -> bool:
        """Tell whether a WAITING record is claimable at ``now`` (may be true for a stale entry)."""
        return bool(self._ready) or bool(self._delayed and self._delayed[0][0] <= now)

    def next_available(self) -> float:
        """Return when the next WAITING record becomes claimable (inf if none waits)."""
        while self._delayed:
            available_at, start = self._delayed[0]
            item = self.waiting.get(start)
            if item is not None and item.available_at == available_at:
                return available_at
            heapq.heappop(self._delayed)
        return math.inf

    def expired(self, now: float) -> list[int]:
        """Return the CLAIMED records whose lease ended by ``now``, lowest first; refresh next_expiry."""
        found = []
        earliest = math.inf
        for start, claim in self.claims.items():
            if claim.expires <= now:
                found.append(start)
            elif claim.expires < earliest:
                earliest = claim.expires
        self.next_expiry = earliest
        found.sort()
        return found

    # -- the journal -----------------------------------------------------

    def apply(self, kind: int, body: bytes) -> None:
        """Replay one journal entry.  Raises ``IllegalTransition``, or ValueError on a bad body."""
        if self.outbox is not None and kind != Kind.SENT:
            self.outbox = None  # an entry after it: its follow-ups were delivered and the pins released
        if kind == Kind.CLAIM or kind == Kind.HELD:
            token, expires, pid, started, count = CLAIM_BODY.unpack_from(body, 0)
            if CLAIM_BODY.size + count * CLAIM_RECORD.size != len(body):
                raise ValueError("CLAIM record count does not match the entry size")
            owner = (pid, started)
            for start, end, word in CLAIM_RECORD.iter_unpack(body[CLAIM_BODY.size :]):
                attempt, priority = word & _ATTEMPT_MASK, word >> _ATTEMPT_BITS
                if kind == Kind.HELD:
                    # A snapshot's claim: the STATE entry already put the head past it.
                    if start in self.claims or start in self.waiting or start in self.done:
                        raise self._illegal(start, Event.CLAIM)
                    self.waiting[start] = Waiting(end, attempt - 1, math.inf, "", priority)
                self.claim(token, expires, owner, start, end, attempt, priority)
        elif kind == Kind.ACK or kind == Kind.DEAD:
            dead = kind == Kind.DEAD
            for start, token in _pairs(body):
                self.settle(start, token, dead)
        elif kind == Kind.RETURN or kind == Kind.WAITING:
            start, second, available_at, word, length = RETURN_BODY.unpack_from(body, 0)
            if RETURN_BODY.size + length != len(body):
                raise ValueError("reason length does not match the entry size")
            attempts, priority = word & _ATTEMPT_MASK, word >> _ATTEMPT_BITS
            reason = body[RETURN_BODY.size :].decode("utf-8", "replace")
            if kind == Kind.RETURN:
                self.give_back(start, second, available_at, attempts, reason)
            else:
                if start in self.claims or start in self.waiting or start in self.done:
                    raise self._illegal(start, Event.RETURN)
                self.waiting[start] = Waiting(second, attempts, available_at, reason, priority)
                heapq.heappush(self._delayed, (available_at, start))
        elif kind == Kind.RENEW:
            expires, count = RENEW_HEAD.unpack_from(body, 0)
            if RENEW_HEAD.size + count * PAIR.size != len(body):
                raise ValueError("RENEW record count does not match the entry size")
            for start, token in PAIR.iter_unpack(body[RENEW_HEAD.size :]):
                self.renew(start, token, expires)
        elif kind == Kind.DONE:
            for start, end in _pairs(body):
                self.done[start] = end
        elif kind == Kind.SKIP or kind == Kind.PENDING:
            (count,) = LIST_HEAD.unpack_from(body, 0)
            if LIST_HEAD.size + count * SKIP_RECORD.size != len(body):
                raise ValueError("SKIP record count does not match the entry size")
            records = [
                (start, Skipped(end, priority, run_at))
                for start, end, priority, run_at in SKIP_RECORD.iter_unpack(body[LIST_HEAD.size :])
            ]
            if any(item.priority > MAX_PRIORITY for _, item in records):
                raise ValueError(f"a priority is over {MAX_PRIORITY}")
            if kind == Kind.SKIP:
                self.skip_run(records)
                return
            for start, item in records:
                # A snapshot's pending record: the STATE entry already put the head past it.
                if start >= self.head or self.state_of(start) is not RecordState.PASSED:
                    raise self._illegal(start, Event.SKIP)
                self.skipped[start] = item
                self.skip_log.append((start, item))
        elif kind == Kind.OUTBOX or kind == Kind.OPEN_OUTBOX:
            if len(body) < OUTBOX_HEAD.size:
                raise ValueError("OUTBOX entry is too short")
            if kind == Kind.OUTBOX:
                start, token, _ = OUTBOX_HEAD.unpack_from(body, 0)
                self.settle(start, token)
            self.outbox = body
            self.outbox_sent = False
        elif kind == Kind.SENT:
            if self.outbox is not None:
                self.outbox_sent = True
        elif kind == Kind.STATE:
            raise ValueError("a STATE entry may only start a journal")
        else:
            raise ValueError(f"unknown journal entry kind {kind}")

    @classmethod
    def from_state_entry(cls, body: bytes) -> "GroupState":
        """Return the state a journal's first entry (STATE) describes."""
        if len(body) == STATE_BODY.size:
            head, mark, next_token, dead_total, acked_total = STATE_BODY.unpack(body)
        elif len(body) == STATE_BODY_V1.size:
            head, mark, next_token, dead_total = STATE_BODY_V1.unpack(body)
            acked_total = 0
        else:
            raise ValueError("STATE entry has the wrong size")
        if mark > head:
            raise ValueError(f"mark {describe_word(mark)} is past the head {describe_word(head)}")
        return cls(head, mark, next_token, dead_total, acked_total)

    def snapshot(self) -> bytes:
        """Return the journal entries that rebuild this state (a compacted journal's body)."""
        parts = [
            entry(Kind.STATE, STATE_BODY.pack(self.head, self.mark, self.next_token, self.dead_total, self.acked_total))
        ]
        by_claim: dict[tuple[int, float, Owner], list[tuple[int, Claim]]] = {}
        for start, claim in sorted(self.claims.items()):
            by_claim.setdefault((claim.token, claim.expires, claim.owner), []).append((start, claim))
        for (token, expires, owner), members in by_claim.items():
            for chunk in _chunks(members, 50_000):
                records = b"".join(
                    CLAIM_RECORD.pack(start, claim.end, attempt_word(claim.attempt, claim.priority))
                    for start, claim in chunk
                )
                head = CLAIM_BODY.pack(token, expires, owner[0], owner[1], len(chunk))
                parts.append(entry(Kind.HELD, head + records))
        for start, item in sorted(self.waiting.items()):
            parts.append(
                encode_return(
                    Kind.WAITING, start, item.end, item.available_at, item.attempts, item.reason, item.priority
                )
            )
        parts.extend(encode_skips(Kind.PENDING, sorted(self.skipped.items())))
        for chunk in _chunks(sorted(self.done.items()), 100_000):
            body = LIST_HEAD.pack(len(chunk)) + b"".join(PAIR.pack(start, end) for start, end in chunk)
            parts.append(entry(Kind.DONE, body))
        if self.outbox is not None and not self.outbox_sent:
            parts.append(entry(Kind.OPEN_OUTBOX, self.outbox))  # last: the next lock holder finishes it
        return b"".join(parts)


def _chunks(items: list, size: int) -> Iterable[list]:  # type: ignore[type-arg]
    for index in range(0, len(items), size):
        yield items[index : index + size]


def _entry_word(kind: int, size: int) -> int:
    word: int = struct.unpack("<I", entry_prefix_crc(kind, size)[0])[0]
    return word


_CLAIM_ONE_WORD = _entry_word(Kind.CLAIM, CLAIM_ONE.size)
_ACK_ONE_WORD = _entry_word(Kind.ACK, ACK_ONE.size)
_PREFIX_CRC = {
    _CLAIM_ONE_WORD: entry_prefix_crc(Kind.CLAIM, CLAIM_ONE.size)[1],
    _ACK_ONE_WORD: entry_prefix_crc(Kind.ACK, ACK_ONE.size)[1],
}
_LENGTH_MASK = 0xFF_FFFF


def replay(
    state: GroupState, buffer: Any, path: str, start: int, end: int, *, optimistic: bool = False
) -> int:
    """Apply the entries of ``buffer[start:end]`` (a journal map) to ``state``; return where it stopped.

    A bad entry raises ``CorruptionError`` naming ``path`` and its offset.
    With ``optimistic`` (reading without the group lock, where a weakly
    ordered CPU may show the end word before the bytes below it) a bad entry
    just stops the replay; the caller finishes under the lock.
    """
    offset = start
    unpack_header = ENTRY_HEADER.unpack_from
    crc32 = zlib.crc32
    prefix_crc = _PREFIX_CRC
    claim_one, ack_one = _CLAIM_ONE_WORD, _ACK_ONE_WORD
    unpack_claim, unpack_ack = CLAIM_ONE.unpack, ACK_ONE.unpack
    problem = ""
    while offset < end:
        if offset + 8 > end:
            problem = "journal entry header cut short"
            break
        word, crc = unpack_header(buffer, offset)
        body_end = offset + 8 + (word & _LENGTH_MASK)
        if body_end > end:
            problem = "journal entry runs past the journal's end"
            break
        body = buffer[offset + 8 : body_end]
        state_crc = prefix_crc.get(word)
        if state_crc is None:
            state_crc = crc32(buffer[offset : offset + 4])
        if crc32(body, state_crc) != crc:
            problem = "journal entry checksum mismatch"
            break
        try:
            if word == claim_one:
                token, expires, pid, started, _, record_start, record_end, attempt = unpack_claim(body)
                state.claim(
                    token, expires, (pid, started), record_start, record_end, attempt & _ATTEMPT_MASK, attempt >> 24
                )
            elif word == ack_one:
                _, record_start, token = unpack_ack(body)
                state.settle(record_start, token)
            else:
                state.apply(word >> 24, body)
        except (IllegalTransition, ValueError, struct.error) as error:
            problem = f"{Kind.NAMES.get(word >> 24, word >> 24)} entry: {error}"
            break
        offset = body_end
    if problem and not optimistic:
        raise CorruptionError(path, offset, problem, hint=recover_hint(path))
    return offset


def load_state(journal: Journal, end: int | None = None) -> GroupState:
    """Replay a whole journal (up to ``end``) into a fresh state."""
    stop = journal.end if end is None else end
    entries = journal.entries(HEADER_SIZE, stop)
    try:
        kind, body, offset = next(entries)
    except StopIteration:
        raise CorruptionError(journal.path, HEADER_SIZE, "journal holds no STATE entry") from None
    if kind != Kind.STATE:
        raise CorruptionError(journal.path, offset, f"journal starts with {Kind.NAMES.get(kind, kind)}, not STATE")
    try:
        state = GroupState.from_state_entry(body)
    except ValueError as error:
        raise CorruptionError(journal.path, offset, f"STATE entry: {error}") from None
    replay(state, journal.map, journal.path, offset + 8 + len(body), stop)
    return state
