"""Hold measurements: raw repeats, medians, and lookups for ratios."""

from __future__ import annotations

import statistics
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

#: Row kinds: the library under test, a peer library, a raw-file baseline.
SEGQ, PEER, LIMIT = "segq", "peer", "limit"
#: Row statuses. "n/a" means the library has no way to do this; "skipped" that
#: the harness chose not to (time budget); "error" that the run failed.
OK, NA, SKIPPED, ERROR = "ok", "n/a", "skipped", "error"


@dataclass
class Measurement:
    """Record one metric of one library in one case, with every repeat."""

    workload: str
    case: str  # stable id, unique across workloads, e.g. "put/100B"
    title: str  # human label, e.g. "put, 100 B, one per call"
    library: str
    kind: str
    unit: str
    higher_is_better: bool = True
    repeats: list[float] = field(default_factory=list)
    n: int | None = None  # records per repeat, where that means something
    status: str = OK
    note: str = ""
    #: Other values the body returned per repeat (diagnostics, not compared).
    extra: dict[str, list[float]] = field(default_factory=dict)

    @property
    def median(self) -> float | None:
        """Return the median of the repeats, or None when there are none."""
        return statistics.median(self.repeats) if self.repeats and self.status == OK else None

    def to_json(self) -> dict[str, Any]:
        """Return a JSON-ready dict with the median alongside the raw repeats."""
        return {**asdict(self), "median": self.median}


class ResultSet:
    """Collect measurements in the order they were made."""

    def __init__(self) -> None:
        """Start empty."""
        self._items: list[Measurement] = []

    def add(self, m: Measurement) -> Measurement:
        """Store ``m``, replacing an earlier row for the same case and library."""
        self._items = [x for x in self._items if (x.case, x.library) != (m.case, m.library)]
        self._items.append(m)
        return m

    def get(self, case: str, library: str) -> Measurement | None:
        """Return the row for ``case`` and ``library``, if any."""
        for m in self._items:
            if m.case == case and m.library == library:
                return m
        return None

    def median(self, case: str, library: str) -> float | None:
        """Return the median of a row, or None when it is missing or not ok."""
        m = self.get(case, library)
        return None if m is None else m.median

    def __iter__(self) -> Iterator[Measurement]:
        return iter(self._items)

    def workloads(self) -> list[str]:
        """Return workload names in first-seen order."""
        return list(dict.fromkeys(m.workload for m in self._items))

    def cases(self, workload: str) -> list[str]:
        """Return the case ids of ``workload`` in first-seen order."""
        return list(dict.fromkeys(m.case for m in self._items if m.workload == workload))

    def rows(self, case: str, libraries: list[str] | None = None) -> list[Measurement]:
        """Return every row of ``case``: segq first, then peers, then limits.

        Within a kind, rows follow ``libraries`` when given, else the order
        they were recorded in.
        """
        kinds = {SEGQ: 0, PEER: 1, LIMIT: 2}
        place = {name: i for i, name in enumerate(libraries or [])}
        return sorted((m for m in self._items if m.case == case),
                      key=lambda m: (kinds[m.kind], place.get(m.library, len(place))))

    def ratio(self, case: str, library: str) -> float | None:
        """Return segq's median over ``library``'s median in ``case``, if both exist."""
        ours, theirs = self.median(case, "segq"), self.median(case, library)
        if ours is None or theirs is None or theirs == 0:
            return None
        return ours / theirs
