"""Sender.send's C path (``_speedups.Appender``) writes exactly what its Python path writes.

Each test sends the same records twice, through a Sender whose small sends
take the C path and through one with the C path turned off (the pure-Python
reference), and compares the segment files byte for byte and the control
words the append touches.  The others drive what the C path hands back to
Python: rollover, a closed Sender, threads racing on one Sender.
"""

from __future__ import annotations

import os
import pathlib
import random
import threading
from collections.abc import Callable

import pytest

import segq
from segq import _control, _format
from segq._control import CONTROL_NAME, OWNER_INDEX, TAIL_INDEX
from segq._headers import frame_body

if _format.appender_class is None:
    pytest.skip("no C Appender (SEGQ_PURE_PYTHON=1, or no POSIX semaphores)", allow_module_level=True)


def script(seed: int, count: int) -> list[tuple[int, bytes]]:
    """Return ``count`` sends as (which sender, payload): sizes across the map/pwrite/Python-only bounds."""
    rng = random.Random(seed)
    sends = []
    for index in range(count):
        size = rng.choice([0, 1, 7, 100, 1000, 1023, 1024, 1025, 4096, 20_000, 65_535, 65_536, 70_000])
        payload = bytes([index % 251]) * size
        if rng.random() < 0.1:
            payload = frame_body(payload, {"k": b"v%d" % index})  # a Framed body sent as data
        sends.append((rng.randrange(2), payload))
    return sends


def run(queue_dir: pathlib.Path, sends: list[tuple[int, bytes]], c_path: bool) -> list[tuple[int, int]]:
    """Send ``sends`` through two Senders; return (tail, owner word) after each, the owner cleared before each."""
    observed = []
    sent_by_c = []
    senders = [segq.Sender(queue_dir, segment_size=1 << 17) for _ in range(2)]
    try:
        for sender in senders:
            assert type(sender._appender) is _format.appender_class
            if not c_path:
                sender._appender.size_limit = -1  # every send takes the Python path
            append_small = sender._append_small

            def counted(data: object, append_small: Callable[[object], int] = append_small) -> int:
                sent = append_small(data)
                sent_by_c.append(sent)
                return sent

            sender._append_small = counted
        words = senders[0]._control.words
        for which, payload in sends:
            words[OWNER_INDEX] = 0  # so each send shows whether it wrote the owner word
            senders[which].send(payload)
            observed.append((words[TAIL_INDEX], words[OWNER_INDEX]))
    finally:
        for sender in senders:
            sender.close()
    done_in_c = sum(1 for sent in sent_by_c if sent)
    assert done_in_c > len(sends) // 2 if c_path else done_in_c == 0
    return observed


def segment_bytes(queue_dir: pathlib.Path) -> dict[str, bytes]:
    return {name: (queue_dir / name).read_bytes() for name in sorted(os.listdir(queue_dir)) if name.endswith(".seg")}


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_the_c_path_writes_the_same_segments_and_control_words_as_the_python_path(
    tmp_path: pathlib.Path, seed: int
) -> None:
    sends = script(seed, 300)
    c_words = run(tmp_path / "c", sends, c_path=True)
    python_words = run(tmp_path / "python", sends, c_path=False)
    assert c_words == python_words
    c_segments = segment_bytes(tmp_path / "c")
    assert len(c_segments) > 3  # the script rolled over several times
    assert c_segments == segment_bytes(tmp_path / "python")
    with segq.Receiver(tmp_path / "c") as rx:
        for index, (_, payload) in enumerate(sends):
            message = rx.try_recv()
            assert message is not None
            if type(payload) is bytes:
                assert message.data == payload and message.headers == {}
            else:
                assert message.headers == {"k": b"v%d" % index}
            rx.commit()
        assert rx.try_recv() is None


def test_small_sends_take_the_c_path_and_a_send_past_the_window_rolls_over(tmp_path: pathlib.Path) -> None:
    with segq.Sender(tmp_path, segment_size=4096) as tx:
        appender = tx._appender
        assert type(appender) is _format.appender_class
        assert appender.send(b"w") == 0  # nothing mapped yet: Python's path shows the window
        tx.send(b"w")
        assert appender.send(b"x" * 100) == 1  # sent by C alone
        tail = tx._control.words[TAIL_INDEX]
        assert appender.last_word == tail
        # Too big for what is left of the segment: C declines, Python rolls over.
        assert appender.send(b"y" * 4000) == 0
        assert tx._control.words[TAIL_INDEX] == tail
        tx.send(b"y" * 4000)
        assert tx._control.words[TAIL_INDEX] >> 32 == (tail >> 32) + 1
        tx.send(b"z" * 10)
    with segq.Receiver(tmp_path) as rx:
        got = []
        while (message := rx.try_recv()) is not None:
            got.append(message.data)
            rx.commit()
    assert got == [b"w", b"x" * 100, b"y" * 4000, b"z" * 10]


def test_a_closed_sender_still_raises_closed_and_its_appender_sends_nothing(tmp_path: pathlib.Path) -> None:
    tx = segq.Sender(tmp_path)
    appender = tx._appender
    tx.send(b"before")
    tx.close()
    assert appender.send(b"after") == 0
    with pytest.raises(segq.Closed):
        tx.send(b"after")
    with segq.Receiver(tmp_path) as rx:
        message = rx.try_recv()
        assert message is not None and message.data == b"before"
        rx.commit()
        assert rx.try_recv() is None


def test_senders_that_must_wait_or_sync_take_the_python_path(tmp_path: pathlib.Path) -> None:
    with segq.Sender(tmp_path / "a", sync="always") as durable, segq.Sender(tmp_path / "b", max_queue_bytes=1 << 20) as bounded:
        assert durable._appender.size_limit == -1
        assert bounded._appender.size_limit == -1
        durable.send(b"d")
        bounded.send(b"b")


def test_the_control_map_and_segment_map_are_let_go_on_close(tmp_path: pathlib.Path) -> None:
    # The Appender holds buffer exports: a close that failed to drop them
    # would leave the maps mapped (mmap.close raises BufferError).
    with segq.Sender(tmp_path, segment_size=1 << 16) as tx:
        for index in range(2000):
            tx.send(b"%d" % index)
        window = tx._window
    assert window is not None and window.map is None
    assert tx._control.map.closed
    assert (tmp_path / CONTROL_NAME).exists()


def test_threads_sharing_a_sender_lose_nothing_across_rollovers(tmp_path: pathlib.Path) -> None:
    threads_count, per_thread = 4, 3000
    with segq.Sender(tmp_path, segment_size=1 << 14) as tx:

        def produce(tag: int) -> None:
            rng = random.Random(tag)
            for index in range(per_thread):
                tx.send(b"%d:%d:" % (tag, index) + b"." * rng.choice([0, 10, 100, 2000]))

        threads = [threading.Thread(target=produce, args=(tag,)) for tag in range(threads_count)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    seen: dict[int, list[int]] = {tag: [] for tag in range(threads_count)}
    with segq.Receiver(tmp_path) as rx:
        while (message := rx.try_recv()) is not None:
            tag, index, _ = message.data.split(b":", 2)
            seen[int(tag)].append(int(index))
            rx.commit()
    assert seen == {tag: list(range(per_thread)) for tag in range(threads_count)}


def test_a_queue_locked_by_flock_sends_through_the_python_path(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Where named semaphores are missing (the macOS fallback) there is no sem_t for C to take.
    monkeypatch.setattr(_control, "_semlock_class", lambda: None)
    with segq.Sender(tmp_path) as tx:
        assert type(tx._appender) is not _format.appender_class
        for index in range(100):
            tx.send(b"%d" % index)
    with segq.Receiver(tmp_path) as rx:
        got = []
        while (message := rx.try_recv()) is not None:
            got.append(message.data)
            rx.commit()
    assert got == [b"%d" % index for index in range(100)]
