"""Write tests/data/golden-v2: a small queue pinning format version 2.

Run it only when the format version changes (and then write golden-v3 beside
it): tests/test_golden.py checks that today's code reads this queue and every
older one (golden-v1, written by format version 1 and kept as it was), and
writes the very same bytes as this one.
"""

from __future__ import annotations

import os
import pathlib
import shutil

import segq

GOLDEN = pathlib.Path(__file__).with_name("golden-v2")
SEGMENT_SIZE = 256
# (data, headers): version 2 adds headers to a single record and to a batch record.
RECORDS: list[tuple[bytes, dict[str, bytes]]] = [
    (b"", {}),
    (b"a", {}),
    (b"hello, segq", {"trace-id": b"4bf9", "content-type": b"text/plain"}),
    (bytes(range(40)), {}),
    (b"x" * 100, {}),
    (b"batch-1", {"k": b""}),
    (b"batch-2", {}),
    (b"last", {}),
]

GOLDEN_V1 = pathlib.Path(__file__).with_name("golden-v1")
RECORDS_V1 = [b"", b"a", b"hello, segq", bytes(range(40)), b"x" * 100, b"batch-1", b"batch-2", b"last"]


def write_queue(path: os.PathLike[str] | str) -> None:
    """Send RECORDS (the two batch records as one batch) and commit the first two as 'default'."""
    with segq.Sender(path, segment_size=SEGMENT_SIZE) as tx:
        for data, headers in RECORDS[:5]:
            tx.send(data, headers=headers or None)
        tx.send_batch(RECORDS[5:7])
        tx.send(RECORDS[7][0])


def main() -> None:
    shutil.rmtree(GOLDEN, ignore_errors=True)
    segq.Sender(GOLDEN, segment_size=SEGMENT_SIZE).close()  # the first segment is small too
    segq.Receiver(GOLDEN).close()  # register "default" at the start
    write_queue(GOLDEN)
    with segq.Receiver(GOLDEN) as rx:
        for _ in range(2):
            rx.recv(timeout=1).commit()
    for path in list(GOLDEN.rglob("*")):
        if path.is_file() and not (path.suffix in (".seg", ".pos")):
            path.unlink()
    for path in GOLDEN.iterdir():
        if path.is_dir() and not any(path.iterdir()):
            path.rmdir()


if __name__ == "__main__":
    main()
