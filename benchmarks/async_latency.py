"""One-way latency between two processes: segq's AsyncReceiver against asyncio streams.

Run ``python -m benchmarks.async_latency [--count N] [--pause-us U] [--size B] [--json]``
from the repository root.

A child process sends ``count`` small messages, one every ``pause`` (so the
receiver is parked, waiting, when each one arrives: this measures the
wake-up path, not throughput), each stamped with ``time.monotonic_ns()``
(CLOCK_MONOTONIC, one clock for every process on the machine) just before
the send.  The parent receives in an asyncio event loop and takes the
difference as soon as the receive returns.  Targets:

* ``segq AsyncReceiver``: child ``segq.Sender.send``; parent ``await rx.recv()`` + commit.
* ``asyncio streams, socketpair``: child ``socket.sendall`` on one end of a
  Unix socket pair; parent ``await reader.readexactly(size)`` on the other.
* ``segq Receiver (blocking)``, for reference: the same as the first with a
  plain blocking ``rx.recv()`` and no event loop.

The first ``warmup`` messages of each run are not counted.  Targets take
turns over ``rounds`` rounds, so a change in machine load (2 cores shared
with other work) hits them alike; their latencies are pooled.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
STAMP = struct.Struct("<qq")  # sequence number, send time in ns
IDLE_TIMEOUT_S = 30.0  # a receiver that sees nothing for this long gives up


# -- the child: the sending side -------------------------------------------


def _paced(count: int, pause: float, size: int, send: Callable[[bytes], None]) -> None:
    padding = bytes(max(0, size - STAMP.size))
    for number in range(count):
        time.sleep(pause)
        send(STAMP.pack(number, time.monotonic_ns()) + padding)


def child_main(kind: str, target: str, count: int, pause: float, size: int) -> None:
    """Send ``count`` stamped messages to ``target`` (a queue path or a socket fd)."""
    if kind == "segq":
        import segq

        with segq.Sender(target) as tx:
            _paced(count, pause, size, tx.send)
    else:
        with socket.socket(fileno=int(target)) as sock:
            _paced(count, pause, size, sock.sendall)


def start_child(
    kind: str, target: str, count: int, pause: float, size: int, pass_fds: tuple[int, ...] = ()
) -> subprocess.Popen[bytes]:
    environment = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    command = [sys.executable, "-m", "benchmarks.async_latency", "--child", kind, target]
    command += ["--count", str(count), "--pause-us", str(pause * 1e6), "--size", str(size)]
    return subprocess.Popen(command, env=environment, cwd=REPO, pass_fds=pass_fds)


# -- the parent: the receiving side ----------------------------------------


def latency_ns(data: bytes) -> int:
    now = time.monotonic_ns()
    sent: int = STAMP.unpack_from(data)[1]
    return now - sent


async def segq_async(total: int, pause: float, size: int, tmp: Path) -> list[int]:
    import segq

    with tempfile.TemporaryDirectory(dir=tmp, prefix="segq-async-latency-") as path:
        latencies = []
        async with segq.AsyncReceiver(path) as rx:
            child = start_child("segq", path, total, pause, size)
            try:
                for _ in range(total):
                    msg = await rx.recv(timeout=IDLE_TIMEOUT_S)
                    latencies.append(latency_ns(msg.data))
                    await msg.commit()
            finally:
                child.wait(IDLE_TIMEOUT_S)
        return latencies


async def streams(total: int, pause: float, size: int, tmp: Path) -> list[int]:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with ours:
        with theirs:
            child = start_child("socket", str(theirs.fileno()), total, pause, size, pass_fds=(theirs.fileno(),))
        latencies = []
        reader, writer = await asyncio.open_unix_connection(sock=ours)
        try:
            for _ in range(total):
                data = await asyncio.wait_for(reader.readexactly(size), IDLE_TIMEOUT_S)
                latencies.append(latency_ns(data))
        finally:
            child.wait(IDLE_TIMEOUT_S)
            writer.close()
            await writer.wait_closed()
        return latencies


def segq_blocking(total: int, pause: float, size: int, tmp: Path) -> list[int]:
    import segq

    with tempfile.TemporaryDirectory(dir=tmp, prefix="segq-latency-") as path:
        latencies = []
        with segq.Receiver(path) as rx:
            child = start_child("segq", path, total, pause, size)
            try:
                for _ in range(total):
                    msg = rx.recv(timeout=IDLE_TIMEOUT_S)
                    latencies.append(latency_ns(msg.data))
                    msg.commit()
            finally:
                child.wait(IDLE_TIMEOUT_S)
        return latencies


TARGETS: dict[str, Callable[[int, float, int, Path], list[int]]] = {
    "segq AsyncReceiver": lambda *args: asyncio.run(segq_async(*args)),
    "asyncio streams, socketpair": lambda *args: asyncio.run(streams(*args)),
    "segq Receiver (blocking)": segq_blocking,
}


# -- report ------------------------------------------------------------------


def summarize(latencies_ns: list[int]) -> dict[str, float]:
    ordered = sorted(latencies_ns)

    def at(fraction: float) -> float:
        return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))] / 1000.0

    return {
        "count": len(ordered),
        "p50_us": at(0.50),
        "p90_us": at(0.90),
        "p99_us": at(0.99),
        "p99.9_us": at(0.999),
        "max_us": ordered[-1] / 1000.0,
        "mean_us": statistics.fmean(ordered) / 1000.0,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.async_latency", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--count", type=int, default=1000, help="messages counted per target and round (default: %(default)s)"
    )
    parser.add_argument(
        "--rounds", type=int, default=3, help="rounds; targets take turns in each (default: %(default)s)"
    )
    parser.add_argument("--warmup", type=int, default=200, help="messages sent first in each run, not counted")
    parser.add_argument("--pause-us", type=float, default=1000.0, help="pause between sends, in µs")
    parser.add_argument("--size", type=int, default=64, help="message size in bytes (at least 16)")
    parser.add_argument("--only", nargs="+", choices=list(TARGETS), metavar="TARGET", help="run only these")
    parser.add_argument("--tmp", type=Path, default=Path(tempfile.gettempdir()), help="where the queues go")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--child", nargs=2, metavar=("KIND", "TARGET"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    size, pause = max(args.size, STAMP.size), args.pause_us / 1e6
    if args.child:
        child_main(args.child[0], args.child[1], args.count, pause, size)
        return 0

    names = args.only or list(TARGETS)
    pooled: dict[str, list[int]] = {name: [] for name in names}
    for _ in range(args.rounds):
        for name in names:
            pooled[name] += TARGETS[name](args.warmup + args.count, pause, size, args.tmp)[args.warmup :]
    results = {name: summarize(latencies) for name, latencies in pooled.items()}
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    print(
        f"one-way latency, {args.rounds} x {args.count} messages of {size} B, one every {args.pause_us:.0f} µs; "
        f"Python {platform.python_version()}, {platform.system()} {platform.release()}, {os.cpu_count()} CPUs"
    )
    columns = ["p50_us", "p90_us", "p99_us", "p99.9_us", "max_us", "mean_us"]
    print(f"| {'target':<30} | " + " | ".join(f"{column[:-3] + ' µs':>9}" for column in columns) + " |")
    print(f"|{'-' * 32}|" + "|".join("-" * 11 for _ in columns) + "|")
    for name, summary in results.items():
        print(f"| {name:<30} | " + " | ".join(f"{summary[column]:>9.1f}" for column in columns) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
