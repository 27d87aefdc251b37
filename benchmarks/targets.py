"""Check segq's performance targets against the ratios measured in the same run."""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from . import limits
from .config import PRODUCERS
from .results import ResultSet

Value = Callable[[ResultSet], "float | None"]


@dataclass(frozen=True)
class Target:
    """State one goal: a measured quantity, a comparison and a threshold."""

    goal: str
    measured: str  # how the value is computed, for the report
    value: Value
    op: str  # ">=" or "<="
    threshold: float
    unit: str

    def check(self, results: ResultSet) -> dict[str, Any]:
        """Return the value and PASS/FAIL (or "missing" when not measured this run)."""
        v = self.value(results)
        compare = operator.ge if self.op == ">=" else operator.le
        verdict = "missing" if v is None else ("PASS" if compare(v, self.threshold) else "FAIL")
        return {"goal": self.goal, "measured": self.measured, "value": v, "op": self.op,
                "threshold": self.threshold, "unit": self.unit, "verdict": verdict}


def ratio(case_a: str, lib_a: str, case_b: str, lib_b: str) -> Value:
    """Return a function computing median(case_a, lib_a) / median(case_b, lib_b)."""
    def value(r: ResultSet) -> float | None:
        a, b = r.median(case_a, lib_a), r.median(case_b, lib_b)
        return None if a is None or not b else a / b
    return value


def median(case: str, lib: str) -> Value:
    """Return a function reading one median."""
    return lambda r: r.median(case, lib)


def best(*values: Value) -> Value:
    """Return the largest of the available values (e.g. verify vs Receiver scan)."""
    def value(r: ResultSet) -> float | None:
        got = [v for v in (f(r) for f in values) if v is not None]
        return max(got) if got else None
    return value


S = "segq"
TARGETS: tuple[Target, ...] = (
    Target("send one record per call >= 1.5x bare os.write loop (100 B)",
           "put/100B segq ÷ os.write loop", ratio("put/100B", S, "put/100B", limits.WRITE_LOOP),
           ">=", 1.5, "×"),
    Target("recv+commit per record >= 1.5x queuelib pop (100 B)",
           "get/100B segq ÷ queuelib", ratio("get/100B", S, "get/100B", "queuelib FifoDiskQueue"),
           ">=", 1.5, "×"),
    Target("send one 4 KiB record per call >= 1.5x queuelib push",
           "put/4KiB segq ÷ queuelib", ratio("put/4KiB", S, "put/4KiB", "queuelib FifoDiskQueue"),
           ">=", 1.5, "×"),
    Target("send_batch(100) >= 0.5x os.write 1 MiB, in records/s (100 B)",
           "put_batch/100B segq ÷ os.write 1 MiB",
           ratio("put_batch/100B", S, "put_batch/100B", limits.WRITE_CHUNKS), ">=", 0.5, "×"),
    Target("recv_batch(100)+commit >= 0.5x os.write 1 MiB, in records/s (100 B)",
           "get_batch/100B segq ÷ os.write 1 MiB",
           ratio("get_batch/100B", S, "put_batch/100B", limits.WRITE_CHUNKS), ">=", 0.5, "×"),
    Target('sync="always" >= 0.9x os.write+fdatasync loop (100 B)',
           "durable_put/100B segq ÷ write+fdatasync",
           ratio("durable_put/100B", S, "durable_put/100B", limits.FDATASYNC_LOOP),
           ">=", 0.9, "×"),
    Target(f"{PRODUCERS} durable producers >= 3x one durable producer (group commit)",
           f"durable_p{PRODUCERS} ÷ durable_p1",
           ratio(f"durable_p{PRODUCERS}/100B", S, "durable_p1/100B", S),
           ">=", 3.0, "×"),
    Target("one-way latency p50 <= 1.5x multiprocessing.Pipe p50",
           "latency_p50 segq ÷ Pipe",
           ratio("latency_p50", S, "latency_p50", "multiprocessing.Pipe"), "<=", 1.5, "×"),
    Target("one-way latency p99 <= 100 µs", "latency_p99 segq", median("latency_p99", S),
           "<=", 100.0, "µs"),
    Target(f"{PRODUCERS} producers + 1 consumer >= 1x one producer + 1 consumer",
           f"fanin_p{PRODUCERS} ÷ pipeline (1 producer)",
           ratio(f"fanin_p{PRODUCERS}/100B", S, "pipeline/100B", S),
           ">=", 1.0, "×"),
    Target("peak RSS at 100x backlog within 10% of 1x",
           "growth_rss/100x ÷ growth_rss/1x", ratio("growth_rss/100x", S, "growth_rss/1x", S),
           "<=", 1.10, "×"),
    Target("import segq <= 60 ms (new interpreter, import and exit)",
           "startup_import segq", median("startup_import", S), "<=", 60.0, "ms"),
    Target("segq --help <= 150 ms", "startup_help segq", median("startup_help", S), "<=", 150.0, "ms"),
    Target("scan >= 300 MB/s (4 KiB records)",
           "best of verify/4KiB and scan/4KiB",
           best(median("verify/4KiB", S), median("scan/4KiB", S)), ">=", 300.0, "MB/s"),
)


def evaluate(results: ResultSet) -> list[dict[str, Any]]:
    """Return every target's value and verdict."""
    return [t.check(results) for t in TARGETS]
