"""Compare two segq copies on single hot paths, alternating runs: sends, claim+ack, queue creation.

Run from the repository root::

    python -m benchmarks.paths_ab --against /tmp/old send      # 100 B and 4 KiB send, send_batch(100) of 100 B
    python -m benchmarks.paths_ab --against /tmp/old claim     # WorkQueue claim(timeout=0)+ack, 100 B
    python -m benchmarks.paths_ab --against /tmp/old durable   # sync="always" send of 100 B (an fdatasync each)
    python -m benchmarks.paths_ab --against /tmp/old create    # new queue + send + close; reopen + send + close

``--against`` is a directory holding another ``segq`` package (e.g. from
``git archive HEAD^``, with its C extension built).  The two copies run in
turn, so a busy machine slows both alike.  ``send``, ``claim`` and ``durable``
measure the thread's CPU time (system time included: the sends' pwrite and
the fdatasync's own work are in it, the wait for the disk is not),
``create`` the wall clock (its cost is mostly fsync and file creation).
Prints the medians and this/against.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from types import ModuleType


def _load(package_dir: str, name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        name, os.path.join(package_dir, "__init__.py"), submodule_search_locations=[package_dir]
    )
    if spec is None or spec.loader is None:
        raise SystemExit(f"no segq package in {package_dir}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _send_rate(segq: ModuleType, size: int, count: int, sync: str) -> float:
    """Records per CPU-second of send() of ``size``-byte records, past the segment's first pages."""
    path = tempfile.mkdtemp(prefix="segq-ab-")
    try:
        with segq.Sender(path, sync=sync) as sender:
            send = sender.send
            for _ in range(128):
                send(b"w" * 4096)
            data = os.urandom(size)
            started = time.thread_time()
            for _ in range(count):
                send(data)
            return count / (time.thread_time() - started)
    finally:
        shutil.rmtree(path)


def _send_100(segq: ModuleType) -> float:
    """Records per CPU-second of send() of 100-byte records (one per call: the mapped-copy path)."""
    return _send_rate(segq, 100, 100_000, "never")


def _send_4k(segq: ModuleType) -> float:
    """Records per CPU-second of send() of 4 KiB records."""
    return _send_rate(segq, 4096, 10_000, "never")


def _send_durable(segq: ModuleType) -> float:
    """Records per CPU-second of send() of 100 B with sync="always": the group commit and its lock each time."""
    return _send_rate(segq, 100, 1000, "always")


def _send_batch(segq: ModuleType) -> float:
    """Records per CPU-second of send_batch() of 100 records of 100 bytes."""
    path = tempfile.mkdtemp(prefix="segq-ab-")
    try:
        with segq.Sender(path) as sender:
            send_batch = sender.send_batch
            for _ in range(128):
                sender.send(b"w" * 4096)
            batch, count = [os.urandom(100)] * 100, 3000
            started = time.thread_time()
            for _ in range(count):
                send_batch(batch)
            return count * 100 / (time.thread_time() - started)
    finally:
        shutil.rmtree(path)


def _claim_ack(segq: ModuleType) -> float:
    """Claim+acks per CPU-second, one worker, 100-byte records."""
    path = tempfile.mkdtemp(prefix="segq-ab-")
    count = 20_000
    try:
        with segq.Sender(path) as sender:
            for _ in range(0, count, 1000):
                sender.send_batch([b"x" * 100] * 1000)
        with segq.WorkQueue(path) as work:
            claim = work.claim
            started = time.thread_time()
            for _ in range(count):
                claim(timeout=0).ack()
            return count / (time.thread_time() - started)
    finally:
        shutil.rmtree(path)


def _create(segq: ModuleType, base: str, index: int) -> tuple[float, float]:
    """Milliseconds (wall) to create a queue, send and close; then to reopen it, send and close."""
    path = os.path.join(base, f"{id(segq)}-{index}")
    started = time.perf_counter()
    with segq.Sender(path) as sender:
        sender.send(b"x" * 100)
    created = time.perf_counter()
    with segq.Sender(path) as sender:
        sender.send(b"x" * 100)
    return (created - started) * 1e3, (time.perf_counter() - created) * 1e3


def _compare(label: str, unit: str, versions: dict[str, ModuleType], run: Callable[[ModuleType], float], repeats: int) -> None:
    values: dict[str, list[float]] = {name: [] for name in versions}
    for _ in range(repeats):
        for name, module in versions.items():
            os.sync()
            values[name].append(run(module))
    medians = {name: statistics.median(found) for name, found in values.items()}
    for name, median in medians.items():
        print(f"{label} [{name}]: median {median:,.2f} {unit}")
    if "against" in medians:
        print(f"{label}: this/against = {medians['this'] / medians['against']:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["send", "claim", "durable", "create"])
    parser.add_argument("--against", help="a directory holding another segq package to compare with")
    parser.add_argument("--repeats", type=int, default=9)
    options = parser.parse_args()
    import segq

    versions = {"this": segq}
    if options.against:
        versions["against"] = _load(os.path.join(options.against, "segq"), "segq_against")
    if options.what == "send":
        _compare("send 100 B", "records/s", versions, _send_100, options.repeats)
        _compare("send 4 KiB", "records/s", versions, _send_4k, options.repeats)
        _compare("send_batch(100) 100 B", "records/s", versions, _send_batch, options.repeats)
    elif options.what == "durable":
        _compare('send sync="always" 100 B', "records/s", versions, _send_durable, options.repeats)
    elif options.what == "claim":
        _compare("claim+ack", "per s", versions, _claim_ack, options.repeats)
    else:
        base = tempfile.mkdtemp(prefix="segq-ab-")
        try:
            times: dict[str, list[tuple[float, float]]] = {name: [] for name in versions}
            for index in range(options.repeats):
                for name, module in versions.items():
                    times[name].append(_create(module, base, index))
        finally:
            shutil.rmtree(base)
        for column, label in ((0, "new queue + send + close"), (1, "reopen + send + close")):
            medians = {name: statistics.median(pair[column] for pair in found) for name, found in times.items()}
            for name, median in medians.items():
                print(f"{label} [{name}]: median {median:.2f} ms")
            if "against" in medians:
                print(f"{label}: against/this = {medians['against'] / medians['this']:.2f} (above 1: this is faster)")


if __name__ == "__main__":
    main()
