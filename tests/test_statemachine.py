"""A hypothesis state machine drives real Senders and Receivers beside an in-memory model.

The model is a list of every record ever sent and, per receiver name, the
index of the first uncommitted record and of the next one to deliver.
Every observation of the real queue is compared with the model's.
"""

from __future__ import annotations

import shutil
import tempfile

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

import segq

SEGMENT_SIZE = 512  # tiny: a few records per segment, so rollover and deletion happen all the time
NAMES = ("a", "b", "c")
payloads = st.binary(max_size=60)


class QueueMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.path = tempfile.mkdtemp(prefix="segq-sm-")
        self.sender: segq.Sender | None = segq.Sender(self.path, segment_size=SEGMENT_SIZE)
        self.sent: list[bytes] = []
        self.receivers: dict[str, segq.Receiver] = {}
        self.committed: dict[str, int] = {}  # name -> index of first uncommitted record
        self.delivered: dict[str, int] = {}  # name -> index of the next record to deliver
        self.pending: dict[str, segq.Message | segq.Batch] = {}
        self.serial = 0

    def teardown(self) -> None:
        if self.sender is not None:
            self.sender.close()
        for receiver in self.receivers.values():
            receiver.close()
        shutil.rmtree(self.path, ignore_errors=True)

    def unique(self, payload: bytes) -> bytes:
        """Prefix a serial number so the model can tell equal payloads apart."""
        self.serial += 1
        return b"%d:" % self.serial + payload

    # -- senders -----------------------------------------------------------

    @precondition(lambda self: self.sender is not None)
    @rule(payload=payloads)
    def send(self, payload: bytes) -> None:
        assert self.sender is not None
        payload = self.unique(payload)
        self.sender.send(payload)
        self.sent.append(payload)

    @precondition(lambda self: self.sender is not None)
    @rule(batch=st.lists(payloads, max_size=5))
    def send_batch(self, batch: list[bytes]) -> None:
        assert self.sender is not None
        batch = [self.unique(payload) for payload in batch]
        self.sender.send_batch(batch)
        self.sent.extend(batch)

    @precondition(lambda self: self.sender is not None)
    @rule()
    def close_sender(self) -> None:
        assert self.sender is not None
        self.sender.close()
        self.sender = None

    @precondition(lambda self: self.sender is None)
    @rule()
    def reopen_sender(self) -> None:
        self.sender = segq.Sender(self.path, segment_size=SEGMENT_SIZE)

    # -- receivers ---------------------------------------------------------

    @rule(name=st.sampled_from(NAMES))
    def open_receiver(self, name: str) -> None:
        if name in self.receivers:
            return
        new = name not in self.committed
        receiver = segq.Receiver(self.path, name)
        self.receivers[name] = receiver
        if new:
            # A new name starts at the oldest retained record: somewhere at
            # or before the oldest position any registered consumer holds.
            first = receiver.try_recv()
            if first is None:
                start = len(self.sent)
            else:
                first.rollback()
                start = self.sent.index(first.data)
                # Nothing a registered consumer still needs may be gone.
                assert start <= min(self.committed.values(), default=start)
            self.committed[name] = start
        self.delivered[name] = self.committed[name]

    @rule(name=st.sampled_from(NAMES))
    def close_receiver(self, name: str) -> None:
        receiver = self.receivers.pop(name, None)
        if receiver is not None:
            receiver.close()
            self.pending.pop(name, None)
            self.delivered[name] = self.committed[name]

    @rule(name=st.sampled_from(NAMES))
    def recv(self, name: str) -> None:
        receiver = self.receivers.get(name)
        if receiver is None or name in self.pending:
            return
        msg = receiver.try_recv()
        index = self.delivered[name]
        if index == len(self.sent):
            assert msg is None
            return
        assert msg is not None and msg.data == self.sent[index]
        self.delivered[name] = index + 1
        self.pending[name] = msg

    @rule(name=st.sampled_from(NAMES), count=st.integers(1, 6))
    def recv_batch(self, name: str, count: int) -> None:
        receiver = self.receivers.get(name)
        if receiver is None or name in self.pending:
            return
        index = self.delivered[name]
        if index == len(self.sent):
            assert receiver.try_recv() is None
            return
        batch = receiver.recv_batch(count, timeout=0)
        expected = self.sent[index : index + count]
        assert [m.data for m in batch] == expected
        self.delivered[name] = index + len(expected)
        self.pending[name] = batch

    @rule(name=st.sampled_from(NAMES))
    def commit(self, name: str) -> None:
        item = self.pending.pop(name, None)
        if item is not None:
            item.commit()
            self.committed[name] = self.delivered[name]

    @rule(name=st.sampled_from(NAMES))
    def rollback(self, name: str) -> None:
        item = self.pending.pop(name, None)
        if item is not None:
            item.rollback()
            self.delivered[name] = self.committed[name]

    @invariant()
    def every_sent_record_is_readable_by_a_lagging_name(self) -> None:
        # Nothing the slowest registered consumer has not committed is gone:
        # checked through the receivers' own observations above; here we
        # check the cheap structural facts.
        for name, receiver in self.receivers.items():
            assert receiver.committed_position is not None
            assert self.committed[name] <= self.delivered[name] <= len(self.sent)


QueueMachine.TestCase.settings = settings(max_examples=100, stateful_step_count=50, deadline=None)
TestQueueMachine = QueueMachine.TestCase
