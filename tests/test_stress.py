"""Concurrency stress: 8 producer processes, 4 named receivers, exact accounting at the end.

Producers send for a bounded time (singles and batches, blocking on
``max_queue_bytes`` when the slowest receiver lags), then close.  Each
receiver name receives, sometimes in batches, sometimes rolling back and
receiving again, and commits.  At the end every name must have received every
record of every producer exactly once, in each producer's order, batches
whole and contiguous, and all four names the very same queue order.

``SEGQ_STRESS_SECONDS`` (default 4) bounds the sending; ``-m soak`` runs it
for ``SEGQ_SOAK_SECONDS`` (default 300).
"""

from __future__ import annotations

import os
import pathlib

import pytest
from _fleet import Fleet, Ledger
from _harness import drain, record_figure

import segq

NAMES = ["east", "west", "north", "south"]


def stress(tmp_path: pathlib.Path, seconds: float) -> None:
    path = str(tmp_path / "queue")
    workdir = tmp_path / "journals"
    workdir.mkdir()
    with segq.Sender(path, segment_size=64 * 1024):
        for name in NAMES:
            segq.Receiver(path, name).close()
    with Fleet(path, str(workdir)) as fleet:
        producers = [
            fleet.add_producer(
                segment_size=64 * 1024,
                duration=seconds,
                max_queue_bytes=512 * 1024,
                max_size=300,
                batch_share=0.3,
            )
            for _ in range(8)
        ]
        stop_file = tmp_path / "producers-done"
        consumers = [
            fleet.add_consumer(name, stop_file=str(stop_file), batch_share=0.4, rollback_share=0.02) for name in NAMES
        ]
        fleet.start_all()
        for child in producers:
            fleet.join(child, timeout=seconds + 120)
        stop_file.touch()
        for child in consumers:
            fleet.join(child, timeout=180)
        fleet.assert_no_failures()
        ledger = Ledger(fleet)
        assert all(producer.done for producer in ledger.producers.values()), "a producer did not finish"
        orders = [ledger.consumer_stream(name, drain(path, name)) for name in NAMES]
        for name, order in zip(NAMES, orders):
            ledger.check_stream(order)
            assert len(order) == ledger.acknowledged, f"{name}: {len(order)} records, {ledger.acknowledged} sent"
            assert order == orders[0], f"{name} and {NAMES[0]} saw different queue orders"
        record_figure("stress records checked", len(orders[0]) * len(NAMES))


@pytest.mark.timeout(600)
def test_eight_producers_four_receivers(tmp_path: pathlib.Path) -> None:
    stress(tmp_path, float(os.environ.get("SEGQ_STRESS_SECONDS", "4")))


@pytest.mark.soak
@pytest.mark.timeout(0)
def test_soak_eight_producers_four_receivers(tmp_path: pathlib.Path) -> None:
    stress(tmp_path, float(os.environ.get("SEGQ_SOAK_SECONDS", "300")))
