"""Work-queue benchmark: claim+ack per record, segq.WorkQueue against persist-queue and litequeue.

Run from the repository root::

    python -m benchmarks.workqueue            # 5 repeats
    python -m benchmarks.workqueue --quick    # 3 repeats, smaller runs (under a minute)
    python -m benchmarks.workqueue --json results.json --tmp /var/tmp

Peers (``pip install persist-queue litequeue``) that fail to import are skipped.

Method
------
- Every timed run starts from a fresh directory holding the same backlog:
  ``--backlog`` records of 100 bytes (default 10,000), written before the
  clock starts.  The backlog matters: litequeue's ``pop`` gets slower as its
  table grows, so all libraries get the same one.
- One worker: the loop is ``claim``/``get``/``pop`` then ``ack``/``done``,
  one record at a time, in this process.  It stops when the backlog is
  drained or after ``--seconds`` (slow peers), and the rate is records
  acked per second of that loop.
- Four workers: four processes (spawned, each with the queue already open)
  start together on one backlog and drain it; the rate is records acked
  divided by the time until the last worker stops.  Records acked twice are
  counted (persist-queue's ``SQLiteAckQueue`` is not made for several
  processes).
- Each figure is the median of ``--repeats`` runs, taken round-robin (every
  library once per repeat, so a change in machine load hits all alike); the
  ratios are computed from medians of the same invocation.  segq runs with its defaults
  (``sync="never"``: an ack that returned survives SIGKILL; power loss is the
  OS's business), persist-queue with its defaults (WAL, synchronous=FULL:
  an fsync per commit), litequeue with its defaults (WAL, synchronous=NORMAL:
  no fsync per commit).  segq with ``sync="always"`` (an msync per claim and
  per ack) is measured too, for a like-for-like look at persist-queue.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

PAYLOAD_SIZE = 100
SEGMENT_SIZE = 16 << 20


def _payload(index: int) -> bytes:
    head = b"%08d:" % index
    return head + b"x" * (PAYLOAD_SIZE - len(head))


# -- one adapter per library: fill, open, take-one-and-ack -------------------


class Library:
    name = ""
    multi_process_note = ""

    def available(self) -> str | None:
        """Return why the library cannot run here, or None."""
        return None

    def fill(self, directory: str, count: int) -> None:
        raise NotImplementedError

    def open(self, directory: str) -> Any:
        raise NotImplementedError

    def take_and_ack(self, handle: Any) -> bytes | None:
        """Take one record, ack it, return it; None when the queue is empty."""
        raise NotImplementedError

    def close(self, handle: Any) -> None:
        pass


class Segq(Library):
    def __init__(self, sync: str = "never", batch: int = 1) -> None:
        self.sync = sync
        self.batch = batch
        self.name = "segq WorkQueue" + (f' sync="{sync}"' if sync != "never" else "")
        if batch > 1:
            self.name += f" claim_batch({batch})"

    def fill(self, directory: str, count: int) -> None:
        import segq

        with segq.Sender(directory, segment_size=SEGMENT_SIZE) as sender:
            for start in range(0, count, 1000):
                sender.send_batch([_payload(index) for index in range(start, min(count, start + 1000))])
        segq.WorkQueue(directory).close()  # register the group before the clock starts

    def open(self, directory: str) -> Any:
        import segq

        queue = segq.WorkQueue(directory, sync=self.sync)
        return queue, []

    def take_and_ack(self, handle: Any) -> bytes | None:
        queue, buffered = handle
        if self.batch > 1:
            if not buffered:
                import segq

                try:
                    jobs = queue.claim_batch(self.batch, timeout=0)
                except segq.Empty:
                    return None
                data = [job.data for job in jobs]
                jobs.ack()  # one transaction for the whole batch
                buffered.extend(reversed(data))
            record: bytes = buffered.pop()
            return record
        job = queue.try_claim()
        if job is None:
            return None
        job.ack()
        data: bytes = job.data
        return data

    def close(self, handle: Any) -> None:
        handle[0].close()


class PersistQueue(Library):
    name = "persist-queue SQLiteAckQueue"
    multi_process_note = "not made for several processes: a record may go to two of them"

    def available(self) -> str | None:
        try:
            import persistqueue  # noqa: F401
        except ImportError as error:
            return f"not installed ({error})"
        return None

    def fill(self, directory: str, count: int) -> None:
        from persistqueue import SQLiteAckQueue

        queue = SQLiteAckQueue(directory, auto_commit=False)  # fill in one transaction
        for index in range(count):
            queue.put(_payload(index))
        queue.task_done()
        queue.close()

    def open(self, directory: str) -> Any:
        from persistqueue import SQLiteAckQueue

        return SQLiteAckQueue(directory, auto_commit=True)

    def take_and_ack(self, handle: Any) -> bytes | None:
        import persistqueue

        try:
            item = handle.get(block=False)
        except persistqueue.Empty:
            return None
        handle.ack(item)
        data: bytes = item
        return data

    def close(self, handle: Any) -> None:
        handle.close()


class Litequeue(Library):
    name = "litequeue"

    def available(self) -> str | None:
        try:
            import litequeue  # noqa: F401
        except ImportError as error:
            return f"not installed ({error})"
        return None

    def fill(self, directory: str, count: int) -> None:
        from litequeue import LiteQueue

        queue = LiteQueue(os.path.join(directory, "litequeue.sqlite3"))
        queue.conn.execute("BEGIN")  # fill in one transaction
        for index in range(count):
            queue.put(_payload(index).decode())
        queue.conn.execute("COMMIT")
        queue.close()

    def open(self, directory: str) -> Any:
        from litequeue import LiteQueue

        return LiteQueue(os.path.join(directory, "litequeue.sqlite3"))

    def take_and_ack(self, handle: Any) -> bytes | None:
        message = handle.pop()
        if message is None:
            return None
        handle.done(message.message_id)
        return message.data.encode()  # type: ignore[no-any-return]

    def close(self, handle: Any) -> None:
        handle.close()


# -- measurements -------------------------------------------------------------


def _fresh_directory(parent: str | None) -> str:
    directory = tempfile.mkdtemp(prefix="segq-wqbench-", dir=parent)
    os.sync()  # write-back of the fill must not land in the timed loop
    return directory


def one_worker(library: Library, backlog: int, seconds: float, parent: str | None) -> float:
    """Return records acked per second by one worker in this process."""
    directory = _fresh_directory(parent)
    try:
        library.fill(directory, backlog)
        os.sync()
        handle = library.open(directory)
        take = library.take_and_ack
        done = 0
        started = time.perf_counter()
        stop = started + seconds
        while True:
            if take(handle) is None:
                break
            done += 1
            if done % 64 == 0 and time.perf_counter() > stop:
                break
        elapsed = time.perf_counter() - started
        library.close(handle)
        return done / elapsed
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def _worker(library: Library, directory: str, seconds: float, ready: Any, start: Any, results: Any) -> None:
    handle = library.open(directory)
    take = library.take_and_ack
    seen: list[bytes] = []
    ready.put(os.getpid())
    start.wait()
    stop = time.perf_counter() + seconds
    while True:
        data = take(handle)
        if data is None:
            break
        seen.append(data[:8])
        if len(seen) % 64 == 0 and time.perf_counter() > stop:
            break
    finished = time.time()
    library.close(handle)
    results.put((seen, finished))


def many_workers(library: Library, workers: int, backlog: int, seconds: float, parent: str | None) -> tuple[float, int]:
    """Return (records acked per second by ``workers`` processes, records acked twice)."""
    directory = _fresh_directory(parent)
    context = multiprocessing.get_context("spawn")
    try:
        library.fill(directory, backlog)
        os.sync()
        ready, results, start = context.Queue(), context.Queue(), context.Event()
        processes = [
            context.Process(target=_worker, args=(library, directory, seconds, ready, start, results))
            for _ in range(workers)
        ]
        for process in processes:
            process.start()
        for _ in processes:
            ready.get(timeout=120)
        started = time.time()
        start.set()
        outcomes = [results.get(timeout=seconds + 300) for _ in processes]
        for process in processes:
            process.join(60)
        elapsed = max(finished for _, finished in outcomes) - started
        seen = [record for records, _ in outcomes for record in records]
        return len(seen) / elapsed, len(seen) - len(set(seen))
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def _median(runs: int, measure: Callable[[], float]) -> tuple[float, list[float]]:
    values = [measure() for _ in range(runs)]
    return statistics.median(values), values


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.workqueue", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 repeats and shorter peer runs")
    parser.add_argument("--repeats", type=int, default=None, help="runs per figure (default 5, 3 with --quick)")
    parser.add_argument("--backlog", type=int, default=10_000, help="records in the queue when a run starts")
    parser.add_argument("--seconds", type=float, default=None, help="cap of one run (slow peers)")
    parser.add_argument("--workers", type=int, default=4, help="processes in the multi-worker runs")
    parser.add_argument("--tmp", default=None, help="parent directory of the queues (default: system temp)")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    arguments = parser.parse_args(argv)
    repeats = arguments.repeats or (3 if arguments.quick else 5)
    seconds = arguments.seconds or (1.0 if arguments.quick else 2.0)
    backlog = arguments.backlog

    libraries: list[Library] = [Segq(), Segq(batch=100), Segq(sync="always"), PersistQueue(), Litequeue()]
    print(f"# segq work-queue benchmark ({'quick' if arguments.quick else 'full'})")
    print(
        f"Python {platform.python_version()} on {platform.system()} {platform.machine()}, "
        f"{os.cpu_count()} CPUs; backlog {backlog:,} records of {PAYLOAD_SIZE} bytes; "
        f"median of {repeats} runs; runs capped at {seconds:g} s"
    )
    results: dict[str, Any] = {"repeats": repeats, "backlog": backlog, "workers": arguments.workers, "libraries": {}}
    runnable = []
    for library in libraries:
        reason = library.available()
        if reason is None:
            runnable.append(library)
        else:
            results["libraries"][library.name] = {"skipped": reason}
    single_runs: dict[str, list[float]] = {library.name: [] for library in runnable}
    multi_runs: dict[str, list[tuple[float, int]]] = {library.name: [] for library in runnable}
    # Round-robin: each repeat runs every library once, so a change in the
    # machine's load (a shared machine, write-back) hits them all alike.
    for repeat in range(repeats):
        for library in runnable:
            single_runs[library.name].append(one_worker(library, backlog, seconds, arguments.tmp))
            multi_runs[library.name].append(
                many_workers(library, arguments.workers, backlog, seconds, arguments.tmp)
            )
        print(f"  repeat {repeat + 1}/{repeats} done", file=sys.stderr, flush=True)
    print()
    print(f"| library | claim+ack/s, 1 worker | claim+ack/s, {arguments.workers} workers | notes |")
    print("|---|---:|---:|---|")
    for library in libraries:
        if library.name not in single_runs:
            print(f"| {library.name} | skipped | skipped | {results['libraries'][library.name]['skipped']} |")
            continue
        single = statistics.median(single_runs[library.name])
        multi = statistics.median(rate for rate, _ in multi_runs[library.name])
        duplicates = sum(twice for _, twice in multi_runs[library.name])
        note = library.multi_process_note
        if duplicates:
            note = f"{duplicates} records acked twice in {arguments.workers}-worker runs; " + note
        print(f"| {library.name} | {single:,.0f} | {multi:,.0f} | {note} |")
        results["libraries"][library.name] = {
            "one_worker": single,
            "one_worker_runs": single_runs[library.name],
            "many_workers": multi,
            "many_worker_runs": [rate for rate, _ in multi_runs[library.name]],
            "acked_twice": duplicates,
        }
    print()
    segq_result = results["libraries"].get("segq WorkQueue", {})
    for peer in ("persist-queue SQLiteAckQueue", "litequeue"):
        peer_result = results["libraries"].get(peer, {})
        if "one_worker" in peer_result and "one_worker" in segq_result:
            ratio = segq_result["one_worker"] / peer_result["one_worker"]
            multi_ratio = segq_result["many_workers"] / peer_result["many_workers"]
            results.setdefault("ratios", {})[peer] = {"one_worker": ratio, "many_workers": multi_ratio}
            verdict = "meets" if ratio >= 100 else "misses"
            print(
                f"- segq / {peer}: {ratio:,.0f}x with 1 worker ({verdict} the 100x target), "
                f"{multi_ratio:,.0f}x with {arguments.workers} workers"
            )
    durable = results["libraries"].get('segq WorkQueue sync="always"', {})
    persist = results["libraries"].get("persist-queue SQLiteAckQueue", {})
    if "one_worker" in durable and "one_worker" in persist:
        print(
            f'- like for like (an fsync/msync per operation): segq sync="always" / persist-queue = '
            f"{durable['one_worker'] / persist['one_worker']:,.1f}x with 1 worker"
        )
    if arguments.json:
        with open(arguments.json, "w") as handle:
            json.dump(results, handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
