"""Give workloads fresh directories, repeats, N calibration and result recording."""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from .config import Mode
from .peers import Adapter
from .procs import deadline
from .results import ERROR, OK, Measurement, ResultSet

#: A timed body: run once in a fresh directory with N records, return named values.
Body = Callable[[Path, int], dict[str, float]]

RATE = "records/s"


@dataclass(frozen=True)
class Case:
    """Describe one reported metric: stable id, human title, unit, direction.

    ``key`` names the value in the dict a body returns; it defaults to ``id``.
    """

    id: str
    title: str
    unit: str = RATE
    higher_is_better: bool = True
    key: str = ""

    @property
    def value_key(self) -> str:
        """Return the body's name for this value."""
        return self.key or self.id


@dataclass
class Plan:
    """Say how to measure one library in one workload, and how to report it.

    ``n`` fixes the records per run; otherwise N is calibrated so a run lasts
    about ``target_s`` (default ``mode.target_s``), at most ``max_n``.
    """

    library: str
    kind: str
    cases: list[Case]
    body: Body
    n: int | None = None
    max_n: int | None = None
    target_s: float | None = None
    note: str = ""


@dataclass
class _Run:
    """Track one plan while its repeats are interleaved with other plans'."""

    plan: Plan
    workload: str
    n: int = 0
    values: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    spent: float = 0.0
    error: str = ""

    def attempt(self, step: Callable[[], None]) -> None:
        """Run ``step`` unless an earlier one failed; keep the failure's reason."""
        if self.error:
            return
        began = time.monotonic()
        try:
            step()
        except Exception as exc:
            self.error = " | ".join(f"{type(exc).__name__}: {exc}".strip().splitlines()[-3:])
        self.spent += time.monotonic() - began

    def calibrate(self, ctx: Context) -> None:
        p = self.plan
        self.n = p.n or ctx.calibrate(self.workload, p.library, p.body, p.cases, p.max_n,
                                      p.target_s or ctx.mode.target_s)

    def repeat(self, ctx: Context) -> None:
        label = f"{self.workload}:{self.plan.library}"
        for key, value in ctx.once(label, self.plan.body, self.n).items():
            self.values[key].append(value)


@dataclass
class Context:
    """Carry the run's settings, the usable adapters and the results."""

    mode: Mode
    tmp_root: Path
    adapters: list[type[Adapter]]
    results: ResultSet = field(default_factory=ResultSet)
    log: Callable[[str], None] = print
    _per_record: dict[tuple[str, ...], float] = field(default_factory=dict)
    _warm: set[str] = field(default_factory=set)  # libraries already used in this process

    def pick(self, *, on_disk: bool | None = None, cross_process: bool | None = None,
             batch: bool | None = None) -> list[type[Adapter]]:
        """Return the usable adapters whose capability flags match the given ones."""
        wanted = {"on_disk": on_disk, "cross_process": cross_process, "batch": batch}
        return [a for a in self.adapters
                if all(v is None or getattr(a, k) == v for k, v in wanted.items())]

    def has(self, name: str) -> bool:
        """Return whether the adapter ``name`` is usable in this run."""
        return any(a.name == name for a in self.adapters)

    @contextmanager
    def fresh_dir(self, label: str) -> Iterator[Path]:
        """Yield a new empty directory under the temp root; delete it afterwards."""
        # Flush the previous run's dirty pages now, so their write-back does
        # not land inside this run's timing.
        os.sync()
        slug = re.sub(r"[^A-Za-z0-9]+", "-", label).strip("-")
        path = Path(tempfile.mkdtemp(prefix=f"segqbench-{slug}-", dir=self.tmp_root))
        try:
            yield path
        finally:
            shutil.rmtree(path, ignore_errors=True)

    def once(self, label: str, body: Body, n: int) -> dict[str, float]:
        """Run ``body`` once with ``n`` records in a fresh directory, under the watchdog."""
        with self.fresh_dir(label) as d, deadline(self.mode.run_timeout_s, label):
            return body(d, n)

    def per_record_s(self, workload: str, library: str, body: Body, cases: list[Case],
                     min_s: float = 0.0) -> float:
        """Return the seconds one record costs in ``body``, from probe runs (memoized).

        A probe of ``mode.probe_records`` records reports the records/s of each
        phase; one record then costs sum(1/rate) seconds (bodies reporting no
        rate are timed from outside). The first probe of a library in this
        process is a warm-up and is discarded; a probe whose timed part is
        shorter than ``min_s`` is mostly start-up noise, so it is rerun larger
        (10× to 1000×).
        """
        label = f"{workload}:{library}"
        key = (label, *(c.id for c in cases))
        if key in self._per_record:
            return self._per_record[key]
        n = self.mode.probe_records
        warm = library in self._warm
        while True:
            start = time.perf_counter()
            values = self.once(f"{label}-probe", body, n)
            rates = [values[c.value_key] for c in cases
                     if c.unit == RATE and values.get(c.value_key)]
            per_record = (sum(1 / r for r in rates) if rates else
                          (time.perf_counter() - start) / n)
            timed = per_record * n
            # The first probe also pays one-off costs (lazy imports, first
            # use of the library in this process), so it is never trusted.
            if warm and (timed >= min_s or n >= self.mode.max_records):
                break
            warm = True
            self._warm.add(library)
            if timed >= min_s:
                continue
            # Aim at twice the minimum; start-up inflates a short probe's
            # per-record cost, so this undershoots rather than overshoots.
            n = min(int(n * min(1000.0, max(10.0, 2 * min_s / max(timed, 1e-9)))),
                    self.mode.max_records)
        self._per_record[key] = per_record
        return per_record

    def calibrate(self, workload: str, library: str, body: Body, cases: list[Case],
                  max_n: int | None, target_s: float) -> int:
        """Return N so one run of ``body`` lasts about ``target_s``."""
        m = self.mode
        n = int(target_s / self.per_record_s(workload, library, body, cases, min_s=target_s / 5))
        return max(m.min_records, min(n, max_n or m.max_records, m.max_records))

    def measure(self, workload: str, library: str, kind: str, cases: list[Case], body: Body,
                **options: Any) -> dict[str, Measurement]:
        """Measure one library: ``measure_all`` with a single plan."""
        return self.measure_all(workload, [Plan(library, kind, cases, body, **options)])[0]

    def measure_all(self, workload: str, plans: list[Plan]) -> list[dict[str, Measurement]]:
        """Run each plan ``mode.repeats`` times, each run in a fresh directory, and record it.

        Every plan is calibrated first (unless its N is given); then the
        repeats go round-robin over the plans, so a change in machine load
        during the run hits every library alike instead of whichever ran then.
        A failing plan is recorded as an "error" row for each of its cases and
        leaves the others running.
        """
        runs = [_Run(p, workload) for p in plans]
        for run in runs:
            run.attempt(partial(run.calibrate, self))
        for _ in range(self.mode.repeats):
            for run in runs:
                run.attempt(partial(run.repeat, self))
        return [self._record(workload, run) for run in runs]

    def _record(self, workload: str, run: _Run) -> dict[str, Measurement]:
        p = run.plan
        if run.error:
            self.log(f"  ! {p.library}: {run.error}")
            return {c.id: self.mark(workload, p.library, p.kind, c, ERROR, run.error.splitlines()[-1][:200])
                    for c in p.cases}
        used = {c.value_key for c in p.cases}
        extra = {k: v for k, v in run.values.items() if k not in used}
        out = {}
        for c in p.cases:
            m = self.results.add(Measurement(
                workload=workload, case=c.id, title=c.title, library=p.library, kind=p.kind,
                unit=c.unit, higher_is_better=c.higher_is_better, repeats=run.values[c.value_key],
                n=run.n, status=OK, note=p.note, extra=extra))
            self.log(f"  {c.id:<22} {p.library:<30} {_fmt(m.median)} {c.unit} "
                     f"(n={run.n}, {run.spent:.1f} s)")
            out[c.id] = m
        return out

    def mark(self, workload: str, library: str, kind: str, case: Case, status: str,
             note: str) -> Measurement:
        """Record a row with no numbers: n/a, skipped or error, and why."""
        return self.results.add(Measurement(
            workload=workload, case=case.id, title=case.title, library=library, kind=kind,
            unit=case.unit, higher_is_better=case.higher_is_better, status=status, note=note))


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:>14,.1f}"
