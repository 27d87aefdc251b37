"""Compare send and recv+commit rates of two segq trees, side by side, with and without headers.

Run from the repository root::

    python -m benchmarks.headers_ab /tmp/segq-base . --repeats 7

Each tree is imported in its own child process (its directory first on
``sys.path``, C extension built in place); the children alternate, so load
on the machine hits both alike.  Rates are records per second of the
process's CPU time (``time.process_time``), so a child descheduled by other
load on a shared machine is not charged for the wait.  A tree whose
``Sender.send`` has no ``headers`` parameter is measured without headers
only.  Prints medians, and the median of the paired per-repeat new/old ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

_CHILD = r"""
import json, shutil, sys, tempfile, time, inspect
sys.path.insert(0, sys.argv[1])
import segq
count, with_headers, parent = int(sys.argv[2]), sys.argv[3] == "1", sys.argv[4]
headers = {"trace-id": b"4bf92f3577b34da6", "content-type": b"application/json"} if with_headers else None
if with_headers and "headers" not in inspect.signature(segq.Sender.send).parameters:
    print(json.dumps(None)); sys.exit(0)
payload = b"x" * 100
queue = tempfile.mkdtemp(dir=parent)
try:
    with segq.Sender(queue, segment_size=256 << 20) as tx, segq.Receiver(queue) as rx:
        send = tx.send
        start = time.process_time()
        if headers is None:
            for _ in range(count):
                send(payload)
        else:
            for _ in range(count):
                send(payload, headers=headers)
        sent = time.process_time() - start
        start = time.process_time()
        for _ in range(count):
            msg = rx.recv(timeout=0)
            msg.headers if with_headers else msg.data
            msg.commit()
        received = time.process_time() - start
    print(json.dumps({"send": count / sent, "recv": count / received, "segq": segq.__file__}))
finally:
    shutil.rmtree(queue)
"""


def run(tree: str, count: int, with_headers: bool, parent: str) -> dict[str, float] | None:
    """Return the rates one child measured for ``tree``."""
    output = subprocess.run(
        [sys.executable, "-c", _CHILD, os.path.abspath(tree), str(count), "1" if with_headers else "0", parent],
        check=True,
        capture_output=True,
        text=True,
        env={key: value for key, value in os.environ.items() if key != "PYTHONPATH"},
    ).stdout
    result: dict[str, float] | None = json.loads(output)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("old")
    parser.add_argument("new")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--count", type=int, default=200_000)
    args = parser.parse_args()
    runs: dict[tuple[str, bool], list[dict[str, float]]] = {}
    with tempfile.TemporaryDirectory() as parent:
        for _ in range(args.repeats):
            for tree in (args.old, args.new):
                for with_headers in (False, True):
                    result = run(tree, args.count, with_headers, parent)
                    if result is not None:
                        runs.setdefault((tree, with_headers), []).append(result)
    print(f"{args.count:,} records of 100 bytes, medians of {args.repeats} runs (records/s)")
    print(f"{'tree':<20} {'headers':<8} {'send':>12} {'recv+commit':>12}")
    medians = {}
    for (tree, with_headers), results in runs.items():
        send = statistics.median(r["send"] for r in results)
        recv = statistics.median(r["recv"] for r in results)
        medians[tree, with_headers] = (send, recv)
        print(f"{tree:<20} {'2 small' if with_headers else 'none':<8} {send:>12,.0f} {recv:>12,.0f}")
    pairs = list(zip(runs[args.old, False], runs[args.new, False]))
    send_ratio = statistics.median(new["send"] / old["send"] for old, new in pairs)
    recv_ratio = statistics.median(new["recv"] / old["recv"] for old, new in pairs)
    print(f"new/old without headers (median of paired ratios): send {send_ratio:.3f}, recv+commit {recv_ratio:.3f}")
    new = medians[args.new, False]
    if (args.new, True) in medians:
        headed = medians[args.new, True]
        print(f"new with headers / without: send {headed[0] / new[0]:.3f}, recv+commit {headed[1] / new[1]:.3f}")


if __name__ == "__main__":
    main()
