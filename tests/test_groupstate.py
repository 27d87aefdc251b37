"""GroupState and journal replay under hypothesis: what a claimer computes is what a replay computes.

Records are synthetic (10 bytes each in segment 0); each operation appends
its journal entries, as a WorkQueue does, and applies them to a live state.
A fresh state replaying the journal must equal the live one, and so must
one replaying every prefix that ends on an entry boundary; a prefix cut
inside an entry must stop cleanly at that entry (CorruptionError naming
its offset, or, optimistic, the offset returned).
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from segq.errors import CorruptionError
from segq.workqueue._claims import (
    CLAIM_BODY,
    CLAIM_RECORD,
    LIST_HEAD,
    PAIR,
    RENEW_HEAD,
    STATE_BODY,
    GroupState,
    Skipped,
    attempt_word,
    encode_return,
    encode_skips,
    replay,
)
from segq.workqueue._journal import Kind, entry

BASE = 32
SIZE = 10
OWNER = (1234, 5.0)


def record(index: int) -> tuple[int, int]:
    return BASE + SIZE * index, BASE + SIZE * (index + 1)


def snapshot_of(state: GroupState) -> tuple[Any, ...]:
    return (
        state.head,
        state.mark,
        state.next_token,
        state.dead_total,
        state.acked_total,
        {start: (c.token, c.expires, c.attempt, c.priority) for start, c in state.claims.items()},
        {start: (w.attempts, w.available_at, w.reason, w.priority) for start, w in state.waiting.items()},
        dict(state.done),
        dict(state.skipped),
    )


operations = st.lists(
    st.tuples(st.sampled_from(["claim", "skip", "claim_skipped", "ack", "nack", "dead", "reclaim", "renew"]), st.integers(0, 4)),
    max_size=40,
)


def run(steps: list[tuple[str, int]]) -> tuple[GroupState, bytearray, list[int]]:
    """Apply ``steps`` to a live state; return it, the journal and each entry's end offset."""
    state = GroupState(BASE, BASE)
    journal = bytearray(entry(Kind.STATE, STATE_BODY.pack(BASE, BASE, 1, 0, 0)))
    ends = [len(journal)]

    def append(*entries: bytes) -> None:
        for item in entries:
            journal.extend(item)
            ends.append(len(journal))

    def claim(start: int, end: int, attempt: int, priority: int) -> None:
        token = state.next_token
        body = CLAIM_BODY.pack(token, 100.0, OWNER[0], OWNER[1], 1) + CLAIM_RECORD.pack(
            start, end, attempt_word(attempt, priority)
        )
        append(entry(Kind.CLAIM, body))
        state.claim(token, 100.0, OWNER, start, end, attempt, priority)

    for action, number in steps:
        index = (state.head - BASE) // SIZE
        claims = sorted(state.claims)
        if action == "claim":
            claim(*record(index), 1, number % 10)
        elif action == "skip":
            skips = [(record(index + k)[0], Skipped(record(index + k)[1], k % 3, 0.0)) for k in range(number + 1)]
            append(*encode_skips(Kind.SKIP, skips))
            for start, item in skips:
                state.skip(start, item.end, item.priority, item.run_at)
        elif action == "claim_skipped" and state.skipped:
            start = sorted(state.skipped)[number % len(state.skipped)]
            claim(start, state.skipped[start].end, 1, state.skipped[start].priority)
        elif action in ("ack", "dead") and claims:
            start = claims[number % len(claims)]
            token = state.claims[start].token
            append(entry(Kind.ACK if action == "ack" else Kind.DEAD, LIST_HEAD.pack(1) + PAIR.pack(start, token)))
            state.settle(start, token, dead=action == "dead")
        elif action == "nack" and claims:
            start = claims[number % len(claims)]
            held = state.claims[start]
            append(encode_return(Kind.RETURN, start, held.token, 50.0 + number, held.attempt, "nacked", held.priority))
            state.give_back(start, held.token, 50.0 + number, held.attempt, "nacked")
        elif action == "reclaim" and state.waiting:
            start = sorted(state.waiting)[number % len(state.waiting)]
            item = state.waiting[start]
            claim(start, item.end, item.attempts + 1, item.priority)
        elif action == "renew" and claims:
            start = claims[number % len(claims)]
            token = state.claims[start].token
            append(entry(Kind.RENEW, RENEW_HEAD.pack(200.0 + number, 1) + PAIR.pack(start, token)))
            state.renew(start, token, 200.0 + number)
    return state, journal, ends


def replayed(journal: bytearray, end: int, *, optimistic: bool = False) -> tuple[GroupState, int]:
    first = 8 + STATE_BODY.size  # past the STATE entry
    state = GroupState.from_state_entry(bytes(journal[8:first]))
    stopped = replay(state, journal, "journal", first, end, optimistic=optimistic)
    return state, stopped


@settings(max_examples=150, deadline=None)
@given(operations)
def test_replaying_the_journal_gives_the_state_the_claimer_computed(steps: list[tuple[str, int]]) -> None:
    state, journal, _ = run(steps)
    fresh, stopped = replayed(journal, len(journal))
    assert stopped == len(journal)
    assert snapshot_of(fresh) == snapshot_of(state)


@settings(max_examples=150, deadline=None)
@given(operations)
def test_a_snapshot_rebuilds_the_same_state(steps: list[tuple[str, int]]) -> None:
    state, _, _ = run(steps)
    body = bytearray(state.snapshot())
    (size,) = LIST_HEAD.unpack_from(body, 0)
    first = 8 + (size & 0xFF_FFFF)
    rebuilt = GroupState.from_state_entry(bytes(body[8:first]))
    replay(rebuilt, body, "snapshot", first, len(body))
    assert snapshot_of(rebuilt) == snapshot_of(state)


@settings(max_examples=100, deadline=None)
@given(operations, st.data())
def test_every_prefix_replays_whole_entries_or_stops_cleanly_at_the_cut_one(
    steps: list[tuple[str, int]], data: st.DataObject
) -> None:
    _, journal, ends = run(steps)
    cut = data.draw(st.integers(ends[0], len(journal)))
    whole = max(end for end in ends if end <= cut)
    expected, _ = replayed(journal, whole)
    state, stopped = replayed(journal, cut, optimistic=True)
    assert stopped == whole
    assert snapshot_of(state) == snapshot_of(expected)
    if cut != whole:
        with pytest.raises(CorruptionError) as caught:
            replayed(journal, cut)
        assert caught.value.offset == whole
