"""Job-option benchmark: the cost of a claim with a million jobs queued ahead of it, against an empty queue.

Run from the repository root::

    python -m benchmarks.jobs                # 1,000,000 jobs ahead
    python -m benchmarks.jobs --ahead 100000 # quicker

Method
------
Four queues, each measured the same way: ``--rounds`` times, enqueue one
job, then time ``claim`` (the claim alone, ``time.perf_counter`` around
it) and ack it.  The figure is the median claim time.  Each pair compares
one kind of job with and without a backlog:

- priority 9, empty queue / ``--ahead`` plain (priority 0) jobs queued
  first: the claim must find the new job past all of them;
- plain job, empty queue / ``--ahead`` jobs with ``run_at`` tomorrow
  queued first.

The backlog is written with ``send_batch`` before the WorkQueue opens; the
first claim reads it once to index it (each record once per process), and
that one-off cost is reported separately, as *first claim*.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time

import segq
from segq._headers import frame_body
from segq._options import RUN_AT


def _fill(path: str, ahead: int, tomorrow: bool) -> None:
    when = repr(time.time() + 86400).encode("ascii")
    with segq.Sender(path, segment_size=64 << 20) as tx:
        chunk = 50_000
        for first in range(0, ahead, chunk):
            count = min(chunk, ahead - first)
            if tomorrow:
                tx.send_batch([frame_body(b"later", {RUN_AT: when}, allow_reserved=True) for _ in range(count)])
            else:
                tx.send_batch([b"backlog"] * count)


def measure(ahead: int, kind: str, priority: int, rounds: int, directory: str | None) -> tuple[float, float]:
    """Return (median claim seconds, first claim seconds) for one scenario."""
    path = tempfile.mkdtemp(prefix="segq-jobs-", dir=directory)
    try:
        if kind != "empty":
            _fill(path, ahead, tomorrow=kind == "due tomorrow")
        times = []
        with segq.Sender(path, segment_size=64 << 20) as tx, segq.WorkQueue(path) as wq:
            tx.enqueue(b"first", priority=priority)
            started = time.perf_counter()
            wq.claim(timeout=5).ack()
            first = time.perf_counter() - started
            for _ in range(rounds):
                tx.enqueue(b"job", priority=priority)
                started = time.perf_counter()
                job = wq.claim(timeout=5)
                times.append(time.perf_counter() - started)
                assert job.data == b"job"
                job.ack()
        return statistics.median(times), first
    finally:
        shutil.rmtree(path, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ahead", type=int, default=1_000_000, help="jobs queued ahead (default 1,000,000)")
    parser.add_argument("--rounds", type=int, default=2000, help="claims timed per scenario")
    parser.add_argument("--tmp", default=None, help="where to make the queues")
    args = parser.parse_args()
    print(f"{'claim of':<12} {'queued ahead':<32} {'median claim':>12} {'first claim':>12}")
    scenarios = [
        ("priority 9", "empty", 9),
        ("priority 9", "priority 0", 9),
        ("plain", "empty", 0),
        ("plain", "due tomorrow", 0),
    ]
    for job, kind, priority in scenarios:
        median, first = measure(args.ahead, kind, priority, args.rounds, args.tmp)
        ahead = "nothing" if kind == "empty" else f"{args.ahead:,} jobs, {kind}"
        print(f"{job:<12} {ahead:<32} {median * 1e6:>9.1f} us {first * 1e3:>9.1f} ms", flush=True)


if __name__ == "__main__":
    main()
