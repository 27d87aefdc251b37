"""Run measurement code in bounded child processes, and bound in-process runs too.

Children start clean: no file handles or library state from the parent. By
default they are forked from a 'forkserver' (a fresh interpreter, started like
'spawn') that has already imported the harness and the libraries under test:
a child then starts in ~20 ms instead of ~230 ms+ (segq alone takes ~0.1-0.2 s
to import), which over ~80 child groups is what keeps ``--quick`` under a
minute. Groups that measure memory ask for ``clean=True`` and get 'spawn', so
a child's RSS holds only the library it measures. A group of children shares
one deadline: on overrun, or when one of them fails, all are killed and the
parent raises, so the harness never hangs on a stuck queue.

The child bodies (``produce``, ``consume``, ``grow``) live here too because
the start methods pickle a target by module and name.
"""

from __future__ import annotations

import multiprocessing as mp
import queue
import resource
import signal
import struct
import time
import traceback
from array import array
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from .peers import Adapter, Role, by_name

#: Every message of the two-process workloads starts with (sequence, send time in ns).
HEADER = struct.Struct("<qq")


class MeasurementTimeout(Exception):
    """Raised when a run overruns its deadline."""


class ChildError(Exception):
    """Raised when a child process fails, dies, or overruns."""


@contextmanager
def deadline(seconds: float, what: str) -> Iterator[None]:
    """Raise MeasurementTimeout in the main thread if the block runs past ``seconds``."""

    def on_alarm(signum: int, frame: object) -> None:
        raise MeasurementTimeout(f"{what} overran {seconds:.0f} s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@dataclass(frozen=True)
class Endpoint:
    """Name a queue a child can open: an adapter and its target (path or Connection)."""

    adapter: str
    target: Any
    durable: bool = False

    def open(self, role: Role) -> Adapter:
        """Open the queue from inside the child."""
        return by_name(self.adapter)(self.target, role=role, durable=self.durable)


@dataclass
class Job:
    """One child: a module-level function and its keyword arguments.

    The function receives ``ready`` (call it once set up) and ``wait_go``
    (blocks until every child of the group is ready) besides ``kwargs``.
    """

    fn: Callable[..., dict[str, Any]]
    kwargs: dict[str, Any] = field(default_factory=dict)


def _child_main(fn: Callable[..., dict[str, Any]], kwargs: dict[str, Any], idx: int,
                out: Any, go: Any, go_timeout: float) -> None:
    """Run one job in the child and report ready/done/error on ``out``."""

    def ready() -> None:
        out.put(("ready", idx, None))

    def wait_go() -> None:
        if not go.wait(go_timeout):
            raise ChildError("start signal never came")

    try:
        result = fn(ready=ready, wait_go=wait_go, **kwargs)
    except BaseException:
        out.put(("error", idx, traceback.format_exc()))
    else:
        out.put(("done", idx, result))


_preload: list[str] = [__name__]


def preload(modules: list[str]) -> None:
    """Have the fork server import ``modules`` (call before the first group)."""
    _preload[:] = [__name__, *modules]


def _mp_context(clean: bool) -> Any:
    if clean or "forkserver" not in mp.get_all_start_methods():
        return mp.get_context("spawn")
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(_preload)
    return ctx


def run_group(jobs: list[Job], timeout: float, *, clean: bool = False) -> list[dict[str, Any]]:
    """Start ``jobs`` as child processes, release them together, return their results.

    Every child first reports "ready"; once all have, the shared start event is
    set. Raises ChildError when a child fails, exits without reporting, or the
    group is not done within ``timeout`` seconds; all children are killed then.
    ``clean`` starts each child as a new interpreter ('spawn') that imports
    only what it uses, for measuring memory.
    """
    ctx = _mp_context(clean)
    out = ctx.Queue()
    go = ctx.Event()
    procs = [
        ctx.Process(target=_child_main, args=(job.fn, job.kwargs, i, out, go, timeout),
                    name=f"bench-{job.fn.__name__}-{i}", daemon=True)
        for i, job in enumerate(jobs)
    ]
    end = time.monotonic() + timeout
    results: dict[int, dict[str, Any]] = {}
    ready: set[int] = set()
    try:
        for p in procs:
            p.start()
        while len(results) < len(jobs):
            try:
                what, idx, payload = out.get(timeout=0.2)
            except queue.Empty:
                if time.monotonic() > end:
                    raise ChildError(f"children overran {timeout:.0f} s; killed") from None
                _check_alive(procs, results)
                continue
            if what == "error":
                raise ChildError(f"child {idx} ({jobs[idx].fn.__name__}) failed:\n{payload}")
            if what == "ready":
                ready.add(idx)
                if len(ready) == len(jobs):
                    go.set()
            else:
                results[idx] = payload
        for p in procs:
            p.join(max(0.1, end - time.monotonic()))
    finally:
        _reap(procs)
        out.close()
        out.join_thread()
    return [results[i] for i in range(len(jobs))]


def _check_alive(procs: list[Any], results: dict[int, Any]) -> None:
    for i, p in enumerate(procs):
        if i not in results and p.exitcode is not None:
            raise ChildError(f"child {i} exited with code {p.exitcode} without reporting")


def _reap(procs: list[Any]) -> None:
    """Terminate, then kill, any child still running; these are all our own."""
    for p in procs:
        if p.is_alive():
            p.terminate()
    for p in procs:
        p.join(2)
        if p.is_alive():
            p.kill()
            p.join()


def _send_all(q: Adapter, n: int, payload: bytes) -> None:
    put = q.put
    for _ in range(n):
        put(payload)
    q.flush()


def produce(*, ready: Callable[[], None], wait_go: Callable[[], None], endpoint: Endpoint,
            n: int, size: int, rate: float | None = None) -> dict[str, Any]:
    """Send ``n`` records of ``size`` bytes, as fast as possible or paced at ``rate``/s.

    Paced messages carry their sequence number and ``time.perf_counter_ns()`` at
    send; CLOCK_MONOTONIC is shared by all processes on Linux, so the consumer
    can subtract it from its own clock.
    """
    with endpoint.open(Role.PRODUCER) as q:
        ready()
        wait_go()
        start = time.perf_counter_ns()
        if rate is None:
            _send_all(q, n, b"x" * size)
        else:
            pad = b"\0" * (size - HEADER.size)
            put, flush, clock = q.put, q.flush, time.perf_counter_ns
            interval = 1e9 / rate
            for seq in range(n):
                due = start + seq * interval
                lag = (due - clock()) / 1e9
                if lag > 0:
                    time.sleep(lag)
                put(HEADER.pack(seq, clock()) + pad)
                flush()
        q.flush()
        end = time.perf_counter_ns()
        return {"t_start_ns": start, "t_end_ns": end, **q.stats()}


def consume(*, ready: Callable[[], None], wait_go: Callable[[], None], endpoint: Endpoint,
            total: int, idle_timeout: float, latency: bool = False) -> dict[str, Any]:
    """Receive and acknowledge ``total`` records; with ``latency``, time each one.

    Latency is taken as soon as a record is handed over, before its ack, so
    queues are compared on delivery alone (Pipe has no ack at all). A wait of
    ``idle_timeout`` seconds with nothing received fails the run; a wait that
    returns empty before its timeout is counted in ``early_empty`` (a bug in
    the queue) and retried.
    """
    with endpoint.open(Role.CONSUMER) as q:
        ready()
        lat = array("q")
        clock, monotonic = time.perf_counter_ns, time.monotonic
        early_empty = 0
        for got in range(total):
            started = monotonic()
            while True:
                item = q.take_wait(idle_timeout)
                now = clock()
                if item is not None:
                    break
                if monotonic() - started >= idle_timeout:
                    raise ChildError(f"nothing received for {idle_timeout:.0f} s "
                                     f"after {got} of {total} records")
                # The wait gave up before its timeout: count it, wait again.
                early_empty += 1
            if latency:
                lat.append(now - HEADER.unpack_from(item[0])[1])
            q.ack(item[1])
        return {"t_last_ns": clock(), "latencies_ns": lat.tolist(), "early_empty": early_empty}


def memory_kib() -> dict[str, int]:
    """Return this process's VmHWM (peak RSS), RssAnon and RssFile in KiB.

    VmHWM belongs to the address space, so it starts afresh in each child.
    ru_maxrss does not: it survives fork and exec, so a child would report at
    least its parent's RSS at fork time and hide its own peak.
    """
    fields = {"VmHWM:": "peak", "RssAnon:": "anon", "RssFile:": "file"}
    out = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                name = line.split(maxsplit=1)[0] if line.strip() else ""
                if name in fields:
                    out[fields[name]] = int(line.split()[1])
    except OSError:
        pass
    out.setdefault("peak", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)  # KiB on Linux
    return out


def grow(*, ready: Callable[[], None], wait_go: Callable[[], None], endpoint: Endpoint,
         n: int, size: int) -> dict[str, Any]:
    """Put ``n`` records, then get+ack them all, and report rates and peak RSS."""
    with endpoint.open(Role.BOTH) as q:
        ready()
        wait_go()
        rss_start = memory_kib()["peak"]
        start = time.perf_counter()
        _send_all(q, n, b"x" * size)
        mid = time.perf_counter()
        try_get = q.try_get
        for got in range(n):
            if try_get() is None:
                raise ChildError(f"queue empty after {got} of {n} records")
        end = time.perf_counter()
        # Read before close, while the queue still holds whatever it maps.
        mem = memory_kib()
    return {"put_s": mid - start, "get_s": end - mid, "rss_start_kib": rss_start,
            "rss_peak_kib": mem["peak"], "rss_anon_kib": mem.get("anon", 0),
            "rss_file_kib": mem.get("file", 0)}
