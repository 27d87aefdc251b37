"""Several processes on one queue: exact counts, per-producer order, contiguous batches."""

from __future__ import annotations

import multiprocessing
import pathlib
import time

import segq

CONTEXT = multiprocessing.get_context("spawn")
SEGMENT_SIZE = 16384
PER_PRODUCER = 3000
BATCH = 7


def produce(path: str, producer: int) -> None:
    with segq.Sender(path, segment_size=SEGMENT_SIZE) as tx:
        serial = 0
        while serial < PER_PRODUCER:
            if serial % 3 == 0:
                size = min(BATCH, PER_PRODUCER - serial)
                tx.send_batch([b"%d:%d:%d" % (producer, serial + i, size) for i in range(size)])
                serial += size
            else:
                tx.send(b"%d:%d:1" % (producer, serial))
                serial += 1


def consume(path: str, total: int, results: "multiprocessing.Queue[list[bytes]]") -> None:
    got: list[bytes] = []
    with segq.Receiver(path) as rx:
        while len(got) < total:
            batch = rx.recv_batch(500, timeout=60)
            got.extend(m.data for m in batch)
            batch.commit()
    results.put(got)


def test_producers_and_a_consumer_in_separate_processes(queue_dir: pathlib.Path) -> None:
    path = str(queue_dir)
    segq.Receiver(path, create=True).close()  # register the receiver first so nothing is skipped
    producers = 3
    results: multiprocessing.Queue[list[bytes]] = CONTEXT.Queue()
    consumer = CONTEXT.Process(target=consume, args=(path, producers * PER_PRODUCER, results))
    consumer.start()
    workers = [CONTEXT.Process(target=produce, args=(path, p)) for p in range(producers)]
    for worker in workers:
        worker.start()
    try:
        got = results.get(timeout=120)
    finally:
        for process in [*workers, consumer]:
            process.join(timeout=30)
            if process.is_alive():
                process.kill()
    assert all(worker.exitcode == 0 for worker in workers)
    assert len(got) == producers * PER_PRODUCER
    records = [tuple(int(field) for field in record.split(b":")) for record in got]
    for producer in range(producers):
        assert [serial for p, serial, _ in records if p == producer] == list(range(PER_PRODUCER))
    # A batch is contiguous: its records follow each other with nothing in between.
    index = 0
    while index < len(records):
        producer, serial, size = records[index]
        assert records[index : index + size] == [(producer, serial + i, size) for i in range(size)]
        index += size


def wait_and_receive(path: str, results: "multiprocessing.Queue[bytes]") -> None:
    with segq.Receiver(path, create=True) as rx:  # started before the sender
        results.put(b"ready")
        with rx.recv(timeout=60) as msg:  # blocks: no polling, woken by the sender
            results.put(msg.data)


def test_a_blocked_receiver_is_woken_by_another_process(queue_dir: pathlib.Path) -> None:
    path = str(queue_dir)
    results: multiprocessing.Queue[bytes] = CONTEXT.Queue()
    receiver = CONTEXT.Process(target=wait_and_receive, args=(path, results))
    receiver.start()
    try:
        assert results.get(timeout=60) == b"ready"
        time.sleep(0.2)  # let it block in recv
        with segq.Sender(path) as tx:
            tx.send(b"wake up")
        assert results.get(timeout=60) == b"wake up"
    finally:
        receiver.join(timeout=30)
        if receiver.is_alive():
            receiver.kill()
    assert receiver.exitcode == 0
