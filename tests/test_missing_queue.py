"""Consumers do not create queues: a missing path is an error unless ``create=True``."""

from __future__ import annotations

import pathlib
from collections.abc import Callable

import pytest

import segq

OPENERS: dict[str, Callable[..., object]] = {
    "Receiver": segq.Receiver,
    "WorkQueue": segq.WorkQueue,
}


@pytest.mark.parametrize("kind", sorted(OPENERS))
def test_a_consumer_on_a_missing_path_raises_naming_it_and_creates_nothing(kind: str, tmp_path: pathlib.Path) -> None:
    typo = tmp_path / "qeueu"
    with pytest.raises(segq.SegqError, match="no queue at") as caught:
        OPENERS[kind](typo)
    assert str(typo) in str(caught.value) and "create=True" in str(caught.value) and kind in str(caught.value)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("kind", sorted(OPENERS))
def test_create_true_makes_an_empty_queue_without_a_large_segment(kind: str, queue_dir: pathlib.Path) -> None:
    consumer = OPENERS[kind](queue_dir, create=True)
    try:
        segments = sorted(queue_dir.glob("*.seg"))
        assert len(segments) == 1 and segments[0].stat().st_size <= 1 << 20
        assert segments[0].stat().st_blocks * 512 <= 1 << 20  # nothing large preallocated either
        with segq.Sender(queue_dir, segment_size=1 << 16) as tx:  # producers come later
            tx.send_batch([b"%d" % number for number in range(5000)])  # rolls over past the small segment
    finally:
        consumer.close()  # type: ignore[attr-defined]
    with segq.Receiver(queue_dir, "reader") as rx:
        assert [message.data for message in rx.recv_batch(5000, timeout=1)] == [b"%d" % n for n in range(5000)]


def test_an_existing_queue_opens_without_create(queue_dir: pathlib.Path) -> None:
    segq.Sender(queue_dir).close()
    segq.Receiver(queue_dir).close()
    segq.WorkQueue(queue_dir).close()


async def test_async_consumers_refuse_a_missing_path_too(tmp_path: pathlib.Path) -> None:
    with pytest.raises(segq.SegqError, match="no queue at"):
        segq.AsyncReceiver(tmp_path / "missing")
    with pytest.raises(segq.SegqError, match="no queue at"):
        segq.AsyncWorkQueue(tmp_path / "missing")
    async with segq.AsyncReceiver(tmp_path / "made", create=True):
        pass
    assert (tmp_path / "made").is_dir()
