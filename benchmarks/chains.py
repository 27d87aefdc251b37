"""Chained jobs and ``segq work``: what an ack with a follow-up costs, and how close a durable xargs gets to xargs.

Run from the repository root::

    python -m benchmarks.chains                 # 5 repeats
    python -m benchmarks.chains --quick         # 3 repeats, smaller runs

Method
------
- *claim+ack* and *claim+ack with one follow-up*: one worker, in this
  process, over a backlog of ``--jobs`` records of 100 bytes written before
  the clock starts; the loop is ``claim()`` then ``ack()`` (or
  ``ack(enqueue=[segq.Enqueue(data, queue=...)])``: one follow-up of 100 bytes
  into another queue, and into the job's own queue).  Rate: jobs per second.
- ``segq work -j 4 -- true`` against ``xargs -P 4 -n 1 true``: the same
  ``--commands`` input lines (in a queue for segq, on stdin for xargs); both
  run ``true`` once per line, four at a time.  ``segq work --drain`` exits
  when the queue is empty; the time includes its interpreter's start.
- Every figure is the median of ``--repeats`` runs taken round-robin (each
  variant once per repeat, so load changes hit all alike).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Callable

PAYLOAD = b"x" * 100


def _fill(path: str, count: int) -> None:
    import segq

    with segq.Sender(path, segment_size=64 << 20) as tx:
        for start in range(0, count, 1000):
            tx.send_batch([PAYLOAD] * min(1000, count - start))


def claim_ack(root: str, jobs: int, follow_up: str | None) -> float:
    """Return jobs/s of claim+ack, with one follow-up into ``follow_up`` ("other", "own") or none."""
    import segq

    path = os.path.join(root, "q")
    other = os.path.join(root, "next")
    _fill(path, jobs)
    if follow_up == "other":
        with segq.Sender(other, segment_size=64 << 20):
            pass
    target = other if follow_up == "other" else None
    with segq.WorkQueue(path, lease=600) as wq:
        started = time.perf_counter()
        if follow_up is None:
            for _ in range(jobs):
                wq.claim(timeout=0).ack()
        else:
            for _ in range(jobs):
                job = wq.claim(timeout=0)
                job.ack(enqueue=[segq.Enqueue(PAYLOAD, queue=target)])
        elapsed = time.perf_counter() - started
    return jobs / elapsed


def segq_work(root: str, commands: int) -> float:
    path = os.path.join(root, "q")
    import segq

    with segq.Sender(path, segment_size=16 << 20) as tx:
        tx.send_batch(b"%d" % number for number in range(commands))
    environment = dict(os.environ, PYTHONPATH=os.getcwd())
    started = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "segq", "work", path, "-j", "4", "--drain", "--", "true"],
        env=environment,
        check=True,
        stdout=subprocess.DEVNULL,
    )
    return commands / (time.perf_counter() - started)


def xargs(root: str, commands: int) -> float:
    lines = b"".join(b"%d\n" % number for number in range(commands))
    started = time.perf_counter()
    subprocess.run(["xargs", "-P", "4", "-n", "1", "true"], input=lines, check=True)
    return commands / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int)
    parser.add_argument("--jobs", type=int)
    parser.add_argument("--commands", type=int)
    parser.add_argument("--only", choices=["ack", "work"], help="run only one of the two comparisons")
    options = parser.parse_args()
    repeats = options.repeats or (3 if options.quick else 5)
    jobs = options.jobs or (20_000 if options.quick else 50_000)
    commands = options.commands or (1_000 if options.quick else 3_000)

    variants: dict[str, Callable[[str], float]] = {}
    if options.only in (None, "ack"):
        variants["claim+ack"] = lambda root: claim_ack(root, jobs, None)
        variants["claim+ack, one follow-up into another queue"] = lambda root: claim_ack(root, jobs, "other")
        variants["claim+ack, one follow-up into its own queue"] = lambda root: claim_ack(root, jobs, "own")
    if options.only in (None, "work"):
        variants["segq work -j 4 -- true"] = lambda root: segq_work(root, commands)
        variants["xargs -P 4 -n 1 true"] = lambda root: xargs(root, commands)
    rates: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, run in variants.items():
            root = tempfile.mkdtemp(prefix="segq-chains-")
            try:
                rates[name].append(run(root))
            finally:
                shutil.rmtree(root, ignore_errors=True)
    medians = {name: statistics.median(values) for name, values in rates.items()}
    print(f"{repeats} repeats; {jobs:,} jobs per claim+ack run, {commands:,} commands per work run; medians")
    for name, rate in medians.items():
        print(f"  {name:48} {rate:12,.0f} /s")
    if "claim+ack" in medians:
        for name in variants:
            if "follow-up" in name:
                print(f"  {name}: {medians[name] / medians['claim+ack']:.2f} x plain claim+ack")
    if "xargs -P 4 -n 1 true" in medians:
        ratio = medians["segq work -j 4 -- true"] / medians["xargs -P 4 -n 1 true"]
        print(f"  segq work / xargs: {ratio:.2f}")


if __name__ == "__main__":
    main()
