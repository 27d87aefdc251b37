"""Time one thread's recv+commit, try_recv+commit (and recv_batch+commit) loops: the Receiver's per-record cost.

Run from the repository root::

    python -m benchmarks.receiver_lock                       # this segq alone
    python -m benchmarks.receiver_lock --against /tmp/old    # and /tmp/old/segq, interleaved
    python -m benchmarks.receiver_lock --kinds recv_batch    # recv_batch(100), as the suite's batch case

``--against`` loads another copy of the ``segq`` package (e.g. from
``git archive``, with its C extension built) under another name, and the
runs of the two alternate, so a busy machine slows both alike.  Time is the
thread's CPU time (``time.thread_time``), which other processes on a busy
machine disturb less than the wall clock.  Prints the median over the
repeats, in records per CPU-second and nanoseconds per record.
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
from types import ModuleType

RECORDS = 100_000


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


def _time_loop(segq: ModuleType, kind: str) -> float:
    path = tempfile.mkdtemp(prefix="segq-bench-")
    try:
        with segq.Sender(path, segment_size=64 << 20) as sender:
            for _ in range(0, RECORDS, 1000):
                sender.send_batch([b"x" * 64] * 1000)
        with segq.Receiver(path) as receiver:
            started = time.thread_time()
            if kind == "recv":
                recv = receiver.recv
                for _ in range(RECORDS):
                    recv().commit()
            elif kind == "try_recv":
                try_recv = receiver.try_recv
                for _ in range(RECORDS):
                    try_recv().commit()
            else:  # as the suite's batch case: recv_batch(100), read each message's data, commit
                recv_batch = receiver.recv_batch
                for _ in range(RECORDS // 100):
                    batch = recv_batch(100)
                    [message.data for message in batch]
                    batch.commit()
            elapsed = time.thread_time() - started
        return RECORDS / elapsed
    finally:
        shutil.rmtree(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--against", help="a directory holding another segq package to compare with")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--kinds", nargs="+", choices=["recv", "try_recv", "recv_batch"], default=["recv", "try_recv"])
    options = parser.parse_args()
    import segq

    versions = {"this": segq}
    if options.against:
        versions["against"] = _load(os.path.join(options.against, "segq"), "segq_against")
    for kind in options.kinds:
        rates: dict[str, list[float]] = {label: [] for label in versions}
        for _ in range(options.repeats):
            for label, module in versions.items():
                rates[label].append(_time_loop(module, kind))
        medians = {label: statistics.median(values) for label, values in rates.items()}
        for label, median in medians.items():
            print(f"{kind}+commit [{label}]: median {median:,.0f} records/s ({1e9 / median:.0f} ns per record)")
        if "against" in medians:
            print(f"{kind}+commit: this/against = {medians['this'] / medians['against']:.3f}")


if __name__ == "__main__":
    main()
