"""The queue id file, segq.id: made once, whole, never followed through a symlink."""

from __future__ import annotations

import multiprocessing
import os
from pathlib import Path

import pytest

import segq
from segq._queueid import QUEUE_ID_NAME, queue_id


def test_a_queue_gets_one_id_that_stays(queue_dir: Path) -> None:
    segq.Sender(queue_dir).close()
    first = queue_id(queue_dir)
    assert len(first) == 32 and int(first, 16) >= 0
    assert queue_id(queue_dir) == first
    assert (queue_dir / QUEUE_ID_NAME).read_bytes() == f"{first}\n".encode()
    assert sorted(name for name in os.listdir(queue_dir) if name.startswith("segq.id")) == [QUEUE_ID_NAME]


def _make_id(path: str, results: "multiprocessing.Queue[str]") -> None:
    results.put(queue_id(path))


def test_processes_making_the_id_at_once_agree_on_one(queue_dir: Path) -> None:
    segq.Sender(queue_dir).close()
    context = multiprocessing.get_context("spawn")
    results: multiprocessing.Queue[str] = context.Queue()
    children = [context.Process(target=_make_id, args=(str(queue_dir), results)) for _ in range(4)]
    for child in children:
        child.start()
    ids = {results.get(timeout=60) for _ in children}
    for child in children:
        child.join()
    assert ids == {queue_id(queue_dir)}


def test_a_symlinked_id_file_is_refused_not_followed(queue_dir: Path, tmp_path: Path) -> None:
    segq.Sender(queue_dir).close()
    target = tmp_path / "elsewhere"
    target.write_text("0" * 32 + "\n")
    (queue_dir / QUEUE_ID_NAME).symlink_to(target)
    with pytest.raises(segq.SegqError, match="symbolic link"):
        queue_id(queue_dir)


@pytest.mark.parametrize("content", [b"", b"xyz\n", b"0" * 32, b"0" * 33 + b"\n", b"A" * 32 + b"\n"])
def test_an_id_file_that_is_not_an_id_is_refused_with_its_path(queue_dir: Path, content: bytes) -> None:
    segq.Sender(queue_dir).close()
    (queue_dir / QUEUE_ID_NAME).write_bytes(content)
    with pytest.raises(segq.SegqError, match="segq.id: not a queue id"):
        queue_id(queue_dir)
