"""Record headers: sent with a record, received with it, kept by every tool."""

from __future__ import annotations

import json
import pathlib

import pytest
from click.testing import CliRunner

import segq
import segq.aio
from segq import recovery
from segq._headers import frame_body
from segq.cli import cli
from segq.workqueue import DeadLetter, WorkQueue, dead_letter_path, requeue_dead

SEGMENT_SIZE = 1 << 16


def receive_all(queue: pathlib.Path, name: str = "default") -> list[tuple[bytes, dict[str, bytes]]]:
    got = []
    with segq.Receiver(queue, name) as rx:
        while (msg := rx.try_recv()) is not None:
            got.append((msg.data, msg.headers))
            msg.commit()
    return got


def test_headers_travel_with_a_sent_record_and_a_plain_record_has_none(queue_dir: pathlib.Path) -> None:
    with segq.Sender(queue_dir, segment_size=SEGMENT_SIZE) as tx:
        tx.send(b"plain")
        tx.send(b"body", headers={"trace-id": b"4bf9", "content-type": "application/json"})
        tx.send(b"empty headers", headers={})
    assert receive_all(queue_dir) == [
        (b"plain", {}),
        (b"body", {"trace-id": b"4bf9", "content-type": b"application/json"}),
        (b"empty headers", {}),
    ]


def test_a_batch_mixes_records_with_and_without_headers(queue_dir: pathlib.Path) -> None:
    with segq.Sender(queue_dir, segment_size=SEGMENT_SIZE) as tx:
        tx.send_batch([(b"a", {"k": b"v"}), b"b", (b"c", None), (bytearray(b"d"), {"x": "é"})])
    with segq.Receiver(queue_dir) as rx, rx.recv_batch(10, timeout=1) as batch:
        assert [(msg.data, msg.headers) for msg in batch] == [
            (b"a", {"k": b"v"}),
            (b"b", {}),
            (b"c", {}),
            (b"d", {"x": "é".encode()}),
        ]


def test_empty_headers_cost_not_one_byte(tmp_path: pathlib.Path) -> None:
    for name, headers in (("none", None), ("empty", {})):
        with segq.Sender(tmp_path / name, segment_size=SEGMENT_SIZE) as tx:
            tx.send(b"x" * 100, headers=headers)
    plain = (tmp_path / "none" / "000000000000.seg").read_bytes()
    assert (tmp_path / "empty" / "000000000000.seg").read_bytes() == plain


@pytest.mark.parametrize(
    "headers, problem",
    [
        ({"": b"v"}, "non-empty str"),
        ({b"k": b"v"}, "non-empty str"),
        ({"a\x00b": b"v"}, "NUL"),
        ({"k": 5}, "bytes or str"),
        ({"segq-run-at": b"1"}, "reserved"),
        ([("k", b"v")], "dict"),
    ],
)
def test_bad_headers_are_refused_and_write_nothing(queue_dir: pathlib.Path, headers: object, problem: str) -> None:
    with segq.Sender(queue_dir, segment_size=SEGMENT_SIZE) as tx:
        with pytest.raises(segq.SegqError, match=problem):
            tx.send(b"x", headers=headers)  # type: ignore[arg-type]
        with pytest.raises(segq.SegqError, match=problem):
            tx.send_batch([b"ok", (b"x", headers)])  # type: ignore[list-item]
    assert receive_all(queue_dir) == []


def test_headers_count_in_max_record_size(queue_dir: pathlib.Path) -> None:
    with segq.Sender(queue_dir, segment_size=SEGMENT_SIZE, max_record_size=100) as tx:
        tx.send(b"x" * 100)
        with pytest.raises(segq.RecordTooLarge):
            tx.send(b"x" * 90, headers={"name": b"y" * 10})
        with pytest.raises(segq.RecordTooLarge):
            tx.send_batch([b"fine", (b"x" * 90, {"name": b"y" * 10})])
    assert receive_all(queue_dir) == [(b"x" * 100, {})]


def test_segq_itself_can_write_reserved_headers(queue_dir: pathlib.Path) -> None:
    with segq.Sender(queue_dir, segment_size=SEGMENT_SIZE) as tx:
        tx.send(frame_body(b"job", {"segq-priority": b"9"}, allow_reserved=True))
        tx.send_batch([frame_body(b"job2", {"segq-delay": b"1"}, allow_reserved=True), b"plain"])
    assert receive_all(queue_dir) == [
        (b"job", {"segq-priority": b"9"}),
        (b"job2", {"segq-delay": b"1"}),
        (b"plain", {}),
    ]


def test_verify_and_recovery_read_records_with_headers(queue_dir: pathlib.Path) -> None:
    with segq.Sender(queue_dir, segment_size=1024) as tx:
        for index in range(50):
            tx.send(b"r%d" % index, headers={"n": str(index)} if index % 2 else None)
    report = segq._inspect.verify(queue_dir)
    assert report.records == 50 and not report.damaged
    recovery.recover(queue_dir)
    got = receive_all(queue_dir)
    assert got == [(b"r%d" % i, {"n": str(i).encode()} if i % 2 else {}) for i in range(50)]


def test_a_work_queue_job_has_its_headers_and_its_dead_letter_keeps_them(queue_dir: pathlib.Path) -> None:
    with segq.Sender(queue_dir, segment_size=SEGMENT_SIZE) as tx:
        tx.send(b"job", headers={"trace-id": b"t1"})
        tx.send(frame_body(b"own", {"segq-x": b"1", "k": b"v"}, allow_reserved=True))
    with WorkQueue(queue_dir, max_attempts=1) as wq:
        for expected in ({"trace-id": b"t1"}, {"segq-x": b"1", "k": b"v"}):
            job = wq.claim(timeout=1)
            assert job.headers == expected
            job.nack(reason="boom")
    with segq.Receiver(dead_letter_path(queue_dir), name="test") as rx:
        first = rx.recv(timeout=1)
        assert first.headers == {"trace-id": b"t1"}
        letter = DeadLetter.decode(first.data, first.headers)
        assert (letter.data, letter.reason, letter.attempts, letter.headers) == (b"job", "boom", 1, {"trace-id": b"t1"})
        first.rollback()
    assert requeue_dead(queue_dir) == 2
    with WorkQueue(queue_dir) as wq:
        requeued = [wq.claim(timeout=1) for _ in range(2)]
        assert [(job.data, job.headers) for job in requeued] == [
            (b"job", {"trace-id": b"t1"}),
            (b"own", {"segq-x": b"1", "k": b"v"}),
        ]
        for job in requeued:
            job.ack()


async def test_the_async_classes_carry_headers(queue_dir: pathlib.Path) -> None:
    async with segq.AsyncSender(queue_dir, segment_size=SEGMENT_SIZE) as tx:
        await tx.send(b"one", headers={"k": b"v"})
        await tx.send_batch([(b"two", {"n": "2"}), b"three"])
    async with segq.AsyncReceiver(queue_dir) as rx:
        got = []
        for _ in range(3):
            async with await rx.recv(timeout=1) as msg:
                got.append((msg.data, msg.headers))
    assert got == [(b"one", {"k": b"v"}), (b"two", {"n": b"2"}), (b"three", {})]


def test_segq_send_header_and_recv_json_show_headers(queue_dir: pathlib.Path) -> None:
    runner = CliRunner()
    sent = runner.invoke(cli, ["send", str(queue_dir), "--header", "trace=4bf9", "--header", "empty="], input=b"a\n")
    assert sent.exit_code == 0, sent.output
    with segq.Sender(queue_dir) as tx:
        tx.send(b"\xff", headers={"bin": b"\x00\xff"})
    received = runner.invoke(cli, ["recv", str(queue_dir), "--json"])
    assert received.exit_code == 0, received.output
    lines = [json.loads(line) for line in received.stdout.splitlines()]
    assert [(line["data"], line["headers"]) for line in lines] == [
        ("a", {"trace": "4bf9", "empty": ""}),
        ({"base64": "/w=="}, {"bin": {"base64": "AP8="}}),
    ]
    assert lines[0]["position"] == {"segment": 0, "offset": 32}


def test_segq_send_refuses_a_reserved_or_malformed_header(queue_dir: pathlib.Path) -> None:
    runner = CliRunner()
    for bad in ("segq-x=1", "novalue"):
        result = runner.invoke(cli, ["send", str(queue_dir), "--header", bad], input=b"a\n")
        assert result.exit_code == 2 and "--header" in result.output


async def test_the_async_sender_refuses_bad_headers_like_the_blocking_one(queue_dir: pathlib.Path) -> None:
    async with segq.AsyncSender(queue_dir, segment_size=SEGMENT_SIZE) as tx:
        for bad in ([], {"segq-x": b"1"}, {"k": 1}):
            with pytest.raises(segq.SegqError):
                await tx.send(b"x", headers=bad)  # type: ignore[arg-type]
    assert receive_all(queue_dir) == []
