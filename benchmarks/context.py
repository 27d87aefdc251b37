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
from pathlib import Path

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
class Context:
    """Carry the run's settings, the usable adapters and the results."""

    mode: Mode
    tmp_root: Path
    adapters: list[type[Adapter]]
    results: ResultSet = field(default_factory=ResultSet)
    log: Callable[[str], None] = print
    _per_record: dict[tuple[str, ...], float] = field(default_factory=dict)

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

    def _once(self, label: str, body: Body, n: int) -> dict[str, float]:
        with self.fresh_dir(label) as d, deadline(self.mode.run_timeout_s, label):
            return body(d, n)

    def per_record_s(self, label: str, body: Body, cases: list[Case]) -> float:
        """Return the seconds one record costs in ``body``, from one probe run (memoized).

        The probe runs ``mode.probe_records`` records; with the records/s of
        each phase it returns, one record costs sum(1/rate) seconds. Bodies
        that report no rate are timed from outside instead.
        """
        key = (label, *(c.id for c in cases))
        if key not in self._per_record:
            start = time.perf_counter()
            values = self._once(f"{label}-probe", body, self.mode.probe_records)
            rates = [values[c.value_key] for c in cases
                     if c.unit == RATE and values.get(c.value_key)]
            self._per_record[key] = (sum(1 / r for r in rates) if rates else
                                     (time.perf_counter() - start) / self.mode.probe_records)
        return self._per_record[key]

    def calibrate(self, label: str, body: Body, cases: list[Case], max_n: int | None) -> int:
        """Return N so one run of ``body`` lasts about ``mode.target_s``."""
        m = self.mode
        n = int(m.target_s / self.per_record_s(label, body, cases))
        return max(m.min_records, min(n, max_n or m.max_records, m.max_records))

    def measure(self, workload: str, library: str, kind: str, cases: list[Case],
                body: Body, *, n: int | None = None, max_n: int | None = None,
                note: str = "") -> dict[str, Measurement]:
        """Run ``body`` ``mode.repeats`` times (each in a fresh directory) and record it.

        N is calibrated unless given. A failure is recorded as an "error" row
        for every case rather than stopping the whole benchmark.
        """
        label = f"{workload}:{library}"
        values: dict[str, list[float]] = defaultdict(list)
        try:
            if n is None:
                n = self.calibrate(label, body, cases, max_n)
            for _ in range(self.mode.repeats):
                for key, value in self._once(label, body, n).items():
                    values[key].append(value)
        except Exception as exc:
            reason = f"{type(exc).__name__}: {exc}".strip().splitlines()
            self.log(f"  ! {library}: {' | '.join(reason[-3:])}")
            return {c.id: self.mark(workload, library, kind, c, ERROR, reason[-1][:200])
                    for c in cases}
        out = {}
        for c in cases:
            m = self.results.add(Measurement(
                workload=workload, case=c.id, title=c.title, library=library, kind=kind,
                unit=c.unit, higher_is_better=c.higher_is_better, repeats=values[c.value_key],
                n=n, status=OK, note=note))
            self.log(f"  {c.id:<22} {library:<30} {_fmt(m.median)} {c.unit} (n={n})")
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
