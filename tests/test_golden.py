"""The golden queues pin the format: today's code reads every version and writes version 2's bytes."""

from __future__ import annotations

import pathlib
import shutil
import sys

import segq

sys.path.insert(0, str(pathlib.Path(__file__).parent / "data"))
import make_golden  # noqa: E402


def read_all(queue: pathlib.Path) -> list[tuple[bytes, dict[str, bytes]]]:
    got = []
    with segq.Receiver(queue) as rx:
        while (msg := rx.try_recv()) is not None:
            got.append((msg.data, msg.headers))
            msg.commit()
    return got


def test_the_golden_queue_reads_from_its_saved_position(tmp_path: pathlib.Path) -> None:
    queue = tmp_path / "golden"
    shutil.copytree(make_golden.GOLDEN, queue)
    assert read_all(queue) == make_golden.RECORDS[2:]  # the first two were committed


def test_a_version_1_queue_still_reads_with_no_headers(tmp_path: pathlib.Path) -> None:
    queue = tmp_path / "golden-v1"
    shutil.copytree(make_golden.GOLDEN_V1, queue)
    assert read_all(queue) == [(data, {}) for data in make_golden.RECORDS_V1[2:]]


def test_a_version_1_queue_takes_records_with_headers_after_its_old_ones(tmp_path: pathlib.Path) -> None:
    queue = tmp_path / "golden-v1"
    shutil.copytree(make_golden.GOLDEN_V1, queue)
    with segq.Sender(queue) as tx:
        tx.send(b"new", headers={"k": b"v"})
    assert read_all(queue) == [(data, {}) for data in make_golden.RECORDS_V1[2:]] + [(b"new", {"k": b"v"})]


def test_today_writes_the_golden_bytes(tmp_path: pathlib.Path) -> None:
    queue = tmp_path / "fresh"
    make_golden.write_queue(queue)
    for golden in sorted(make_golden.GOLDEN.glob("*.seg")):
        assert (queue / golden.name).read_bytes() == golden.read_bytes(), f"format drift in {golden.name}"
