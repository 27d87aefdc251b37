"""Define the workloads: each drives every usable library and records its rows.

Bodies (the ``_*_body`` functions) run once in a fresh directory with N
records and return named values; ``Context.measure`` repeats and records them.
Every rate is per second, so a slow library measured with a smaller N is
compared fairly.
"""

from __future__ import annotations

import compileall
import importlib
import importlib.util
import math
import multiprocessing as mp
import os
import statistics
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from functools import partial
from pathlib import Path
from typing import Any

from . import limits
from .config import (BATCH, DURABLE_PRODUCERS, MAX_RUN_BYTES, PRODUCERS, RECORD_SIZES, WARMUP_BYTES,
                     size_label, size_text)
from .context import Case, Context, Plan
from .peers import Adapter, SegqAdapter
from .procs import Endpoint, Job, consume, grow, produce, run_group
from .results import LIMIT, NA, SEGQ, SKIPPED

SMALL = 100  # bytes: the record size of the multi-process workloads
#: Latency samples dropped at the start (consumer and page cache warming up).
WARMUP_MSGS = 50
#: Peers measured in the growth workload besides segq (the others are slower
#: still, so their large backlogs would only be skipped for time).
GROWTH_PEERS = ("queuelib FifoDiskQueue", "persist-queue Queue")
SEQ = struct.Struct("<q")
#: Extra value of the consumer bodies: waits that returned empty before their
#: timeout although records were coming (reported in the row's note).
EARLY_EMPTY = "early_empty"
SCAN_RECEIVER = "bench-scan"

# Cases referenced by more than one workload or by the targets.
PIPELINE = Case(f"pipeline/{size_label(SMALL)}",
                f"1 producer → 1 consumer process, {size_text(SMALL)}", key="rate")
LATENCY = [
    Case(f"latency_{name}", f"one-way latency {name}, {size_text(SMALL)}", unit="µs",
         higher_is_better=False, key=name)
    for name in ("p50", "p90", "p99", "p99.9", "max")
]


# --- bodies -----------------------------------------------------------------

def _warm_up(q: Adapter, size: int, batched: bool) -> None:
    """Put and get back ``WARMUP_BYTES`` of records, untimed: the clock then sees the steady state."""
    payload = b"x" * size
    count = max(1, WARMUP_BYTES // size)
    if batched:
        batches = max(1, count // BATCH)
        for _ in range(batches):
            q.put_batch([payload] * BATCH)
        q.flush()
        got = 0
        while got < batches * BATCH:
            chunk = q.get_batch(BATCH)
            if not chunk:
                raise RuntimeError(f"queue empty after {got} warm-up records")
            got += len(chunk)
        return
    for _ in range(count):
        q.put(payload)
    q.flush()
    for got in range(count):
        if q.try_get() is None:
            raise RuntimeError(f"queue empty after {got} warm-up records")


def _put_get_body(cls: type[Adapter], size: int, batched: bool, d: Path, n: int) -> dict[str, float]:
    """Put ``n`` records then get+ack them all, in one process, after a warm-up; return both rates."""
    payload = b"x" * size
    with cls(d) as q:
        _warm_up(q, size, batched)
        if batched:
            items = [payload] * BATCH
            batches = max(1, n // BATCH)
            n = batches * BATCH
            put_batch, get_batch = q.put_batch, q.get_batch
            start = time.perf_counter()
            for _ in range(batches):
                put_batch(items)
            q.flush()
            mid = time.perf_counter()
            got = 0
            while got < n:
                chunk = get_batch(BATCH)
                if not chunk:
                    raise RuntimeError(f"queue empty after {got} of {n} records")
                got += len(chunk)
        else:
            put, try_get = q.put, q.try_get
            start = time.perf_counter()
            for _ in range(n):
                put(payload)
            q.flush()
            mid = time.perf_counter()
            for got in range(n):
                if try_get() is None:
                    raise RuntimeError(f"queue empty after {got} of {n} records")
        end = time.perf_counter()
    return {"put": n / (mid - start), "get": n / (end - mid)}


def _create_body(cls: type[Adapter], size: int, d: Path, n: int) -> dict[str, float]:
    """Open ``n`` new queues, each putting one record; return the median ms from open to that put's return."""
    payload = b"x" * size
    times = []
    for i in range(n):
        # The directory exists first: some peers (litequeue) open a database
        # file in it and do not create it.
        (d / f"q{i}").mkdir()
        start = time.perf_counter()
        q = cls(d / f"q{i}")
        try:
            q.put(payload)
            q.flush()
            times.append((time.perf_counter() - start) * 1e3)
        finally:
            q.close()
    return {"create": statistics.median(times)}


def _create_file(size: int, d: Path, n: int) -> dict[str, float]:
    return {"create": statistics.median(limits.create_and_write(d, n, size)) * 1e3}


def _python_run(args: list[str]) -> list[str]:
    """Run this Python with ``args`` (segq importable as in this process); return stdout lines."""
    spec = importlib.util.find_spec("segq")
    env = dict(os.environ)
    if spec is not None and spec.origin:
        root = os.path.dirname(os.path.dirname(spec.origin))
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    done = subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, check=True)
    return done.stdout.splitlines()


_PEAK_RSS = ("import sys; print([l.split()[1] for l in open('/proc/self/status') "
             "if l.startswith('VmHWM')][0])")


def _startup_body(code: str | None, args: list[str] | None, d: Path, n: int) -> dict[str, float]:
    """Start ``n`` interpreters running ``code`` (or ``args``); return median wall ms and peak RSS MiB."""
    times, rss = [], []
    for _ in range(n):
        start = time.perf_counter()
        out = _python_run(args if args is not None else ["-c", f"{code}\n{_PEAK_RSS}"])
        times.append((time.perf_counter() - start) * 1e3)
        if args is None:
            rss.append(int(out[-1]) / 1024)
    values = {"start": statistics.median(times)}
    if rss:
        values["rss"] = statistics.median(rss)
    return values


def _put_body(cls: type[Adapter], size: int, durable: bool, d: Path, n: int) -> dict[str, float]:
    """Put ``n`` records one per call and return the rate."""
    payload = b"x" * size
    with cls(d, durable=durable) as q:
        put = q.put
        start = time.perf_counter()
        for _ in range(n):
            put(payload)
        q.flush()
        return {"put": n / (time.perf_counter() - start)}


@contextmanager
def _endpoints(cls: type[Adapter], d: Path, durable: bool = False) -> Iterator[tuple[Endpoint, Endpoint]]:
    """Yield (producer, consumer) endpoints: the directory, or the two ends of a Pipe."""
    if cls.on_disk:
        # Create the queue before the children race to: two SQLite-based
        # peers opening a new database at once can fail with "database is
        # locked" while switching it to WAL.
        cls(d).close()
        ep = Endpoint(cls.name, str(d), durable)
        yield ep, ep
        return
    recv_end, send_end = mp.Pipe(duplex=False)
    try:
        yield Endpoint(cls.name, send_end), Endpoint(cls.name, recv_end)
    finally:
        # The children hold their own duplicates; ours only leak descriptors.
        recv_end.close()
        send_end.close()


def _stream_body(ctx: Context, cls: type[Adapter], producers: int, with_consumer: bool,
                 durable: bool, d: Path, n: int) -> dict[str, float]:
    """Run ``producers`` sender processes (and a consumer) on one queue; return records/s.

    The clock starts when the producers are released together and stops when
    the consumer has the last record (or, with no consumer, the last producer
    returns).
    """
    per = max(1, n // producers)
    total = per * producers
    with _endpoints(cls, d, durable) as (pe, ce):
        jobs = [Job(consume, {"endpoint": ce, "total": total,
                              "idle_timeout": ctx.mode.idle_timeout_s})] if with_consumer else []
        jobs += [Job(produce, {"endpoint": pe, "n": per, "size": SMALL})
                 for _ in range(producers)]
        res = run_group(jobs, ctx.mode.child_timeout_s)
    start = min(r["t_start_ns"] for r in res if "t_start_ns" in r)
    if not with_consumer:
        values = {"rate": total / ((max(r["t_end_ns"] for r in res) - start) / 1e9)}
        syncs = [r["fdatasyncs"] for r in res if "fdatasyncs" in r]
        if syncs:
            values["syncs"] = sum(syncs) / total
        return values
    return {"rate": total / ((res[0]["t_last_ns"] - start) / 1e9),
            EARLY_EMPTY: res[0]["early_empty"]}


def _percentile(sorted_values: list[int], pct: float) -> float:
    """Return the nearest-rank percentile of an ascending list."""
    rank = max(1, math.ceil(pct / 100 * len(sorted_values)))
    return float(sorted_values[min(rank, len(sorted_values)) - 1])


def _latency_body(ctx: Context, cls: type[Adapter], d: Path, n: int) -> dict[str, float]:
    """Send ``n`` timestamped messages at ``mode.latency_rate``/s; return percentiles in µs."""
    with _endpoints(cls, d) as (pe, ce):
        cons, _ = run_group([
            Job(consume, {"endpoint": ce, "total": n, "latency": True,
                          "idle_timeout": ctx.mode.idle_timeout_s}),
            Job(produce, {"endpoint": pe, "n": n, "size": SMALL, "rate": ctx.mode.latency_rate}),
        ], ctx.mode.child_timeout_s)
    lat = sorted(cons["latencies_ns"][min(WARMUP_MSGS, n // 10):])
    values = {c.value_key: (lat[-1] if c.value_key == "max" else _percentile(lat, float(c.value_key[1:]))) / 1e3
              for c in LATENCY}
    return {**values, EARLY_EMPTY: cons["early_empty"]}


def _grow_body(ctx: Context, cls: type[Adapter], d: Path, n: int) -> dict[str, float]:
    """Put then get+ack ``n`` records in a child; return rates and its peak RSS in MiB."""
    (res,) = run_group([Job(grow, {"endpoint": Endpoint(cls.name, str(d)), "n": n, "size": SMALL})],
                       ctx.mode.child_timeout_s, clean=True)
    return {"put": n / res["put_s"], "get": n / res["get_s"], "rss": res["rss_peak_kib"] / 1024,
            "anon": res["rss_anon_kib"] / 1024, "rss_file_mib": res["rss_file_kib"] / 1024,
            "rss_at_start_mib": res["rss_start_kib"] / 1024}


def _fill_segq(d: Path, n: int, size: int) -> None:
    """Fill a segq queue with ``n`` records, each starting with its sequence number."""
    segq = importlib.import_module("segq")
    pad = b"s" * (size - SEQ.size)
    with segq.Sender(str(d)) as tx:
        for lo in range(0, n, 1000):
            tx.send_batch([SEQ.pack(i) + pad for i in range(lo, min(n, lo + 1000))])


def _scan_body(size: int, d: Path, n: int) -> dict[str, float]:
    """Read every record with a Receiver in batches of 1000; return payload MB/s.

    segq allows one pending batch per receiver, so the scan commits each batch,
    but under its own receiver name: "default" is registered first and never
    moves, so no record is consumed for it and no segment is deleted.
    """
    segq = importlib.import_module("segq")
    segq.Receiver(str(d), name="default").close()
    _fill_segq(d, n, size)
    rx = segq.Receiver(str(d), name=SCAN_RECEIVER)
    try:
        got = nbytes = 0
        last = b""
        start = time.perf_counter()
        while got < n:
            batch = rx.recv_batch(1000, timeout=5.0)
            data = [m.data for m in batch]
            batch.commit()
            got += len(data)
            nbytes += sum(map(len, data))
            last = data[-1]
        elapsed = time.perf_counter() - start
    finally:
        rx.close()
    if got != n or SEQ.unpack_from(last)[0] != n - 1:
        raise RuntimeError(f"scan saw {got} records ending at #{SEQ.unpack_from(last)[0]}, "
                           f"expected {n} ending at #{n - 1}")
    return {"scan": nbytes / elapsed / 1e6}


def _verify_body(fn: Callable[[str], Any], size: int, d: Path, n: int) -> dict[str, float]:
    """Time segq's own verify/scan function over a filled queue; return payload MB/s."""
    _fill_segq(d, n, size)
    start = time.perf_counter()
    fn(str(d))
    return {"scan": n * size / (time.perf_counter() - start) / 1e6}


def _find_verify() -> tuple[str, Callable[[str], Any]] | None:
    """Return segq's verify function and its dotted name, if it has one."""
    owners: list[Any] = []
    for mod in ("segq", "segq.recovery"):
        with suppress(ImportError):
            owners.append(importlib.import_module(mod))
    for owner in owners:
        for attr in ("verify", "scan", "check"):
            fn = getattr(owner, attr, None)
            if callable(fn) and not isinstance(fn, type):
                return f"{owner.__name__}.{attr}", fn
    return None


# --- limit bodies ---------------------------------------------------------------

def _write_loop(size: int, sync: bool, d: Path, n: int) -> dict[str, float]:
    return {"put": n / limits.write_loop(d, n, size, fdatasync=sync)}


def _read_loop(size: int, d: Path, n: int) -> dict[str, float]:
    limits.write_loop(d, n, size)
    return {"get": n / limits.read_loop(d, n, size)}


def _write_chunks(size: int, d: Path, n: int) -> dict[str, float]:
    return {"put": n / limits.write_chunks(d, n, size)}


def _read_chunks(size: int, key: str, unit_mb: bool, d: Path, n: int) -> dict[str, float]:
    limits.write_chunks(d, n, size)
    seconds = limits.read_chunks(d)
    return {key: n * size / seconds / 1e6 if unit_mb else n / seconds}


# --- workloads --------------------------------------------------------------

def single(ctx: Context) -> None:
    """Put N, then get+ack N, in one process, one record per call (steady state); and queue creation."""
    create = Case(f"create/{size_label(SMALL)}", f"open a new queue + first put, {size_text(SMALL)}",
                  unit="ms", higher_is_better=False, key="create")
    n = ctx.mode.create_samples
    ctx.measure_all("single", [
        *(Plan(cls.name, cls.kind, [create], partial(_create_body, cls, SMALL), n=n)
          for cls in ctx.pick(on_disk=True)),
        Plan(limits.CREATE_FILE, LIMIT, [create], partial(_create_file, SMALL), n=n)])
    for size in RECORD_SIZES:
        lbl, txt = size_label(size), size_text(size)
        put = Case(f"put/{lbl}", f"put, {txt}, one per call", key="put")
        get = Case(f"get/{lbl}", f"get+ack, {txt}, one per call", key="get")
        cap = MAX_RUN_BYTES // size
        plans = [Plan(cls.name, cls.kind, [put, get], partial(_put_get_body, cls, size, False), max_n=cap)
                 for cls in ctx.pick(on_disk=True)]
        plans += [Plan(limits.WRITE_LOOP, LIMIT, [put], partial(_write_loop, size, False), max_n=cap),
                  Plan(limits.READ_LOOP, LIMIT, [get], partial(_read_loop, size), max_n=cap)]
        ctx.measure_all("single", plans)


def batch(ctx: Context) -> None:
    """Put N, then get+ack N, in batches of 100 where the library can batch."""
    for size in RECORD_SIZES:
        lbl, txt = size_label(size), size_text(size)
        put = Case(f"put_batch/{lbl}", f"put, {txt}, batches of {BATCH}", key="put")
        get = Case(f"get_batch/{lbl}", f"get+ack, {txt}, batches of {BATCH}", key="get")
        cap = MAX_RUN_BYTES // size
        plans = []
        for cls in ctx.pick(on_disk=True):
            if cls.batch:
                plans.append(Plan(cls.name, cls.kind, [put, get], partial(_put_get_body, cls, size, True),
                                  max_n=cap))
            else:
                for case in (put, get):
                    ctx.mark("batch", cls.name, cls.kind, case, NA, "no batch API")
        plans += [Plan(limits.WRITE_CHUNKS, LIMIT, [put], partial(_write_chunks, size), max_n=cap),
                  Plan(limits.READ_CHUNKS, LIMIT, [get], partial(_read_chunks, size, "get", False),
                       max_n=cap)]
        ctx.measure_all("batch", plans)


def _pipeline_plan(ctx: Context, cls: type[Adapter]) -> Plan:
    return Plan(cls.name, cls.kind, [PIPELINE], partial(_stream_body, ctx, cls, 1, True, False),
                target_s=ctx.mode.stream_target_s, note=_poll_note(cls))


def _poll_note(cls: type[Adapter]) -> str:
    return "" if cls.native_blocking else "consumer polls (50-500 µs sleeps)"


def _cross_process(ctx: Context, workload: str, cases: list[Case]) -> list[type[Adapter]]:
    """Return the adapters that work across processes; mark the others n/a for ``cases``."""
    usable = []
    for cls in ctx.pick():
        if cls.cross_process:
            usable.append(cls)
        else:
            for case in cases:
                ctx.mark(workload, cls.name, cls.kind, case, NA, cls.cross_process_note)
    return usable


def pipeline(ctx: Context) -> None:
    """Producer and consumer in two processes: throughput."""
    usable = _cross_process(ctx, "pipeline", [PIPELINE])
    ctx.measure_all("pipeline", [_pipeline_plan(ctx, cls) for cls in usable])


def latency(ctx: Context) -> None:
    """Two-process one-way latency at a low rate: p50/p90/p99/p99.9/max (run last, alone)."""
    usable = _cross_process(ctx, "latency", LATENCY)
    rows = ctx.measure_all("latency", [
        Plan(cls.name, cls.kind, LATENCY, partial(_latency_body, ctx, cls), n=ctx.mode.latency_msgs,
             note=_poll_note(cls))
        for cls in usable])
    for row in rows:
        # The median hides how much repeats differ: give the range of each.
        for case_id, m in row.items():
            if m.repeats and len(m.repeats) > 1:
                spread = f"repeats {min(m.repeats):,.0f}–{max(m.repeats):,.0f} µs"
                m.note = "; ".join(filter(None, [spread, m.note]))


def durable(ctx: Context) -> None:
    """Put one record per call with each library's most durable setting; then group commit."""
    lbl, txt = size_label(SMALL), size_text(SMALL)
    put = Case(f"durable_put/{lbl}", f"durable put, {txt}, one per call", key="put")
    plans = []
    for cls in ctx.pick(on_disk=True):
        if cls.durable_mode is None:
            ctx.mark("durable", cls.name, cls.kind, put, NA, "no durable setting")
        else:
            plans.append(Plan(cls.name, cls.kind, [put], partial(_put_body, cls, SMALL, True),
                              note=cls.durable_mode))
    plans.append(Plan(limits.FDATASYNC_LOOP, LIMIT, [put], partial(_write_loop, SMALL, True)))
    ctx.measure_all("durable", plans)
    if not ctx.has(SegqAdapter.name):
        return
    # Group commit: the aggregate rate, and the mechanism behind it, the
    # fdatasync calls per record (ideally about 1/k with k producers).
    ctx.measure_all("durable", [
        Plan(SegqAdapter.name, SEGQ,
             [Case(f"durable_p{k}/{lbl}", f'{k} producer process{"es" if k > 1 else ""}, '
                   f'sync="always", {txt}', key="rate"),
              Case(f"durable_syncs_p{k}/{lbl}", f"fdatasync calls per record, {k} durable "
                   f'producer{"s" if k > 1 else ""}', unit="fdatasync/record", higher_is_better=False,
                   key="syncs")],
             partial(_stream_body, ctx, SegqAdapter, k, False, True), target_s=ctx.mode.stream_target_s)
        for k in DURABLE_PRODUCERS])


def fanin(ctx: Context) -> None:
    """Run several producer processes into one consumer process; compare with one producer."""
    k = PRODUCERS
    case = Case(f"fanin_p{k}/{size_label(SMALL)}",
                f"{k} producer processes → 1 consumer, {size_text(SMALL)}", key="rate")
    usable = []
    for cls in ctx.pick(on_disk=True):
        if cls.cross_process:
            usable.append(cls)
        else:
            ctx.mark("fanin", cls.name, cls.kind, case, NA, cls.cross_process_note)
    # The one-producer rate each is compared with, if `pipeline` did not run.
    ctx.measure_all("pipeline", [_pipeline_plan(ctx, cls) for cls in usable
                                 if ctx.results.get(PIPELINE.id, cls.name) is None])
    rows = ctx.measure_all("fanin", [
        Plan(cls.name, cls.kind, [case], partial(_stream_body, ctx, cls, k, True, False),
             target_s=ctx.mode.stream_target_s, note=_poll_note(cls))
        for cls in usable])
    for cls, row in zip(usable, rows, strict=True):
        one, many = ctx.results.median(PIPELINE.id, cls.name), row[case.id].median
        if one and many:
            row[case.id].note = "; ".join(filter(None, [f"{many / one:.2f}× one producer", row[case.id].note]))


def growth(ctx: Context) -> None:
    """Put then get a backlog of 1×, 10×, 100× the base size; track rates and peak RSS."""
    m = ctx.mode
    probe = [Case("probe_put", "", key="put"), Case("probe_get", "", key="get")]
    for cls in ctx.pick(on_disk=True):
        if cls.kind != SEGQ and cls.name not in GROWTH_PEERS:
            continue
        # Seconds per record (put + get), first from a small in-process probe,
        # then from the last point measured. Peers only get the points that
        # fit the time budget; segq, the subject, gets every point.
        per_record = 0.0
        if cls.kind != SEGQ:
            # On failure the measurement below fails too, and is recorded as an error.
            with suppress(Exception):
                per_record = ctx.per_record_s("growth", cls.name,
                                              partial(_put_get_body, cls, SMALL, False), probe)
        for mult in m.growth_multipliers:
            n = m.growth_base * mult
            cases = [
                Case(f"growth_put/{mult}x", f"put, backlog {mult}× ({n:,} records)", key="put"),
                Case(f"growth_get/{mult}x", f"get+ack, backlog {mult}× ({n:,} records)", key="get"),
                Case(f"growth_rss/{mult}x", f"peak RSS (VmHWM), backlog {mult}× ({n:,} records)",
                     unit="MiB", higher_is_better=False, key="rss"),
                # Anonymous (heap) memory alone, without the file pages a
                # queue may have mapped: tells a leak from a mapping.
                Case(f"growth_anon/{mult}x", f"RssAnon at end, backlog {mult}× ({n:,} records)",
                     unit="MiB", higher_is_better=False, key="anon"),
            ]
            estimate = per_record * n * m.repeats
            if cls.kind != SEGQ and estimate > m.growth_budget_s:
                why = f"est. {estimate:.0f} s for {m.repeats} repeats > budget {m.growth_budget_s:.0f} s"
                for case in cases:
                    ctx.mark("growth", cls.name, cls.kind, case, SKIPPED, why)
                continue
            rows = ctx.measure("growth", cls.name, cls.kind, cases,
                               partial(_grow_body, ctx, cls), n=n)
            put, get = rows[cases[0].id].median, rows[cases[1].id].median
            per_record = 1 / put + 1 / get if put and get else math.inf


def scan(ctx: Context) -> None:
    """Read a full segq queue as a scan would, and with segq's verify if it has one."""
    if not ctx.has(SegqAdapter.name):
        ctx.log("  scan needs segq; skipped")
        return
    verify = _find_verify()
    if verify is None:
        ctx.log("  no segq.verify / segq.recovery.verify found; Receiver scan only")
    for size in RECORD_SIZES:
        lbl, txt = size_label(size), size_text(size)
        n = ctx.mode.scan_bytes // size
        scan_case = Case(f"scan/{lbl}", f"Receiver scan (recv_batch 1000), {txt}", unit="MB/s", key="scan")
        plans = [Plan(SegqAdapter.name, SEGQ, [scan_case], partial(_scan_body, size), n=n)]
        cases = [scan_case]
        if verify is not None:
            vcase = Case(f"verify/{lbl}", f"{verify[0]}(), {txt}", unit="MB/s", key="scan")
            plans.append(Plan(SegqAdapter.name, SEGQ, [vcase], partial(_verify_body, verify[1], size), n=n))
            cases.append(vcase)
        # The limit shares the case ids, so one measurement is recorded per case.
        plans.append(Plan(limits.READ_CHUNKS, LIMIT, cases, partial(_read_chunks, size, "scan", True), n=n))
        ctx.measure_all("scan", plans)


def startup(ctx: Context) -> None:
    """Start a new interpreter: `import segq`, `segq --help`, and the peak RSS after the import."""
    spec = importlib.util.find_spec("segq")
    if spec is None or spec.origin is None:
        ctx.log("  startup needs segq; skipped")
        return
    # Installed packages come with bytecode; a source checkout may not have it
    # (PYTHONDONTWRITEBYTECODE), and compiling on every start is not start-up.
    compileall.compile_dir(os.path.dirname(spec.origin), quiet=1)
    n = ctx.mode.create_samples
    imp = Case("startup_import", "new interpreter: import + exit", unit="ms", higher_is_better=False, key="start")
    rss = Case("startup_rss", "peak RSS (VmHWM) after the import", unit="MiB", higher_is_better=False, key="rss")
    cli = Case("startup_help", "new interpreter: `segq --help`", unit="ms", higher_is_better=False, key="start")
    plans = [Plan(SegqAdapter.name, SEGQ, [imp, rss], partial(_startup_body, "import segq", None), n=n),
             Plan(SegqAdapter.name, SEGQ, [cli], partial(_startup_body, None, ["-m", "segq", "--help"]), n=n),
             Plan(limits.BARE_PYTHON, LIMIT, [imp, rss], partial(_startup_body, "pass", None), n=n)]
    for cls in ctx.pick(on_disk=True):
        if cls.kind != SEGQ:
            plans.append(Plan(cls.name, cls.kind, [imp, rss],
                              partial(_startup_body, f"import {cls.module}", None), n=n))
    ctx.measure_all("startup", plans)


#: Workloads by CLI name, in run order.
WORKLOADS: dict[str, Callable[[Context], None]] = {
    "startup": startup,
    "single": single,
    "batch": batch,
    "pipeline": pipeline,
    "durable": durable,
    "fanin": fanin,
    "growth": growth,
    "scan": scan,
    "latency": latency,  # last: its tail percentiles suffer most from anything else running
}
