"""Draw throughput and latency charts as PNG (matplotlib is optional)."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

from .procs import deadline
from .report import LIBRARY_ORDER
from .results import LIMIT, OK, SEGQ, ResultSet

COLORS = {SEGQ: "#d62728", "peer": "#1f77b4", LIMIT: "#7f7f7f"}
RATE_UNITS = ("records/s", "MB/s")


def write(out: Path, results: ResultSet, log: Callable[[str], None] = print) -> list[Path]:
    """Write throughput.png and latency.png under ``out``; skip with a message if no matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display here, and none needed
        import matplotlib.pyplot as plt
    except ImportError as exc:
        log(f"plots skipped: matplotlib unavailable ({exc})")
        return []
    written = []
    with deadline(120, "plotting"):
        for name, draw in (("throughput.png", _throughput), ("latency.png", _latency)):
            fig = draw(plt, results)
            if fig is None:
                log(f"{name} skipped: nothing to plot")
                continue
            path = out / name
            fig.savefig(path, dpi=90)
            plt.close(fig)
            written.append(path)
    return written


def _short(name: str) -> str:
    return name.replace("persist-queue ", "pq ").replace(" FifoDiskQueue", "").replace(
        "multiprocessing.", "mp.")


def _throughput(plt, results: ResultSet):  # type: ignore[no-untyped-def]
    """Draw one horizontal log-scale bar panel per rate case."""
    from matplotlib.ticker import NullFormatter

    cases = [c for w in results.workloads() for c in results.cases(w)
             if any(m.unit in RATE_UNITS and m.status == OK for m in results.rows(c))]
    if not cases:
        return None
    cols = 3
    nrows = math.ceil(len(cases) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(6.2 * cols, 2.5 * nrows), squeeze=False)
    for ax, case in zip(axes.flat, cases, strict=False):  # the grid may have spare cells
        rows = [(m, m.median) for m in results.rows(case, LIBRARY_ORDER) if m.median is not None]
        values = [v for _, v in rows]
        ax.barh([_short(m.library) for m, _ in rows], values, color=[COLORS[m.kind] for m, _ in rows])
        ax.set_xscale("log")
        ax.invert_yaxis()
        ax.set_title(f"{rows[0][0].title} [{rows[0][0].unit}]", fontsize=9)
        ax.tick_params(labelsize=8)
        for i, v in enumerate(values):
            ax.text(v, i, f" {v:,.0f}", va="center", fontsize=7)
        # Bars on a log axis start at the left limit: put it well below the
        # smallest value so every bar shows, and leave room for the labels.
        ax.set_xlim(min(values) / 4, max(values) * 8)
        ax.xaxis.set_minor_formatter(NullFormatter())
    for ax in list(axes.flat)[len(cases):]:
        ax.axis("off")
    fig.suptitle("Throughput, median (log scale; red = segq, blue = peers, grey = raw-file limits)")
    # Keep the top strip for the suptitle, which tight_layout ignores.
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.5 / fig.get_figheight()))
    return fig


def _short_us(v: float) -> str:
    return f"{v / 1000:.3g} ms" if v >= 1000 else f"{v:.3g}"


def _latency(plt, results: ResultSet):  # type: ignore[no-untyped-def]
    """Draw grouped bars of p50/p90/p99/max one-way latency per library."""
    from matplotlib.ticker import NullFormatter

    pcts = ("p50", "p90", "p99", "max")
    libs = [m.library for m in results.rows("latency_p50", LIBRARY_ORDER) if m.status == OK]
    if not libs:
        return None
    fig, ax = plt.subplots(figsize=(max(7, 1.9 * len(libs)), 4.8))
    width = 0.8 / len(pcts)
    for j, p in enumerate(pcts):
        values = [results.median(f"latency_{p}", lib) or 0 for lib in libs]
        xs = [i + (j - 1) * width for i in range(len(libs))]
        bars = ax.bar(xs, values, width, label=p)
        ax.bar_label(bars, labels=[_short_us(v) for v in values], fontsize=7)
    ax.set_xticks(range(len(libs)), [_short(lib) for lib in libs], fontsize=8)
    ax.set_yscale("log")
    ax.yaxis.set_minor_formatter(NullFormatter())
    ax.set_ylabel("one-way latency, µs (log)")
    ax.set_title("Two-process one-way latency at ~1,000 msgs/s (100 B), median of repeats")
    ax.axhline(100, color="grey", linestyle=":", linewidth=1)
    ax.legend()
    fig.tight_layout()
    return fig
