"""The golden queue pins format version 1: today's code reads it and writes the same bytes."""

from __future__ import annotations

import pathlib
import shutil
import sys

import segq

sys.path.insert(0, str(pathlib.Path(__file__).parent / "data"))
import make_golden  # noqa: E402


def test_the_golden_queue_reads_from_its_saved_position(tmp_path: pathlib.Path) -> None:
    queue = tmp_path / "golden"
    shutil.copytree(make_golden.GOLDEN, queue)
    with segq.Receiver(queue) as rx:
        got = []
        while (msg := rx.try_recv()) is not None:
            got.append(msg.data)
            msg.commit()
    assert got == make_golden.RECORDS[2:]  # the first two were committed


def test_today_writes_the_golden_bytes(tmp_path: pathlib.Path) -> None:
    queue = tmp_path / "fresh"
    make_golden.write_queue(queue)
    for golden in sorted(make_golden.GOLDEN.glob("*.seg")):
        assert (queue / golden.name).read_bytes() == golden.read_bytes(), f"format drift in {golden.name}"
