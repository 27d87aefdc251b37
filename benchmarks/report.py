"""Render results as Markdown and JSON."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .peers import ADAPTERS
from .results import LIMIT, OK, PEER, SEGQ, Measurement, ResultSet

#: Bump when a key of results.json changes meaning.
SCHEMA = 1
#: Rows of one kind are listed in registry order, whatever order they ran in.
LIBRARY_ORDER = [cls.name for cls in ADAPTERS]


def fmt_value(v: float | None) -> str:
    """Format a number compactly: thousands separators for big, 3 digits for small."""
    if v is None:
        return "—"
    return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.3g}"


def fmt_ratio(v: float | None) -> str:
    """Format a ratio as e.g. ``1.52×``, or a dash."""
    return "—" if v is None else f"{v:.3g}×"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return lines


def _row(results: ResultSet, m: Measurement) -> list[str]:
    ratio = results.ratio(m.case, m.library) if m.kind != SEGQ else None
    arrow = "" if m.higher_is_better else " (lower is better)"
    shown = fmt_value(m.median) if m.status == OK else m.status
    repeats = f"{len(m.repeats)} × {m.n:,}" if m.status == OK and m.n else str(len(m.repeats))
    # Diagnostics the body reported besides the value (range over the
    # repeats), when they say something.
    extras = [f"{k}: {fmt_value(min(vs))}" + ("" if min(vs) == max(vs) else f"–{fmt_value(max(vs))}")
              for k, vs in m.extra.items() if any(vs)]
    return [m.title, m.library, shown, m.unit + arrow,
            fmt_ratio(ratio) if m.kind == PEER else "",
            fmt_ratio(ratio) if m.kind == LIMIT else "",
            repeats if m.status == OK else "", "; ".join(filter(None, [m.note, *extras]))]


def _load(avg: list[float]) -> str:
    return " / ".join(f"{x:.2f}" for x in avg)


def header_lines(meta: dict[str, Any]) -> list[str]:
    """Return the Markdown header: when, where, and with which versions."""
    versions = ", ".join(f"{k} {v}" for k, v in meta["versions"].items())
    return [
        "# segq benchmark results",
        "",
        f"- Date: {meta['date']}; mode: {meta['mode']} ({meta['repeats']} repeats, median shown)",
        f"- Machine: {meta['cpu']}, {meta['cores']} cores, {meta['kernel']}",
        f"- Temp dir: {meta['tmp_dir']} on {meta['tmp_filesystem']}",
        f"- Python: {meta['python']}; repo HEAD: {meta['repo_head']}; segq imported from {meta['segq_path']}",
        f"- Load average (1/5/15 min) at start {_load(meta['loadavg_start'])}, "
        f"at end {_load(meta['loadavg_end'])}; run took {meta['elapsed_s']:.0f} s",
        f"- Versions: {versions}",
        f"- Command: `{meta['command']}`",
    ] + ([f"- Note: {meta['note']}"] if meta.get("note") else [])


def _with_unit(v: float | None, unit: str) -> str:
    if unit == "×":
        return fmt_ratio(v)
    return "—" if v is None else f"{fmt_value(v)} {unit}"


def targets_lines(targets: list[dict[str, Any]]) -> list[str]:
    """Return the PASS/FAIL table of the targets."""
    rows = [[t["goal"], t["measured"], _with_unit(t["value"], t["unit"]),
             f"{t['op']} {_with_unit(t['threshold'], t['unit'])}", t["verdict"]] for t in targets]
    return _table(["Target", "Measured as", "Value", "Needs", "Result"], rows)


def markdown(meta: dict[str, Any], results: ResultSet, targets: list[dict[str, Any]],
             titles: dict[str, str]) -> str:
    """Return the full Markdown report."""
    lines = header_lines(meta)
    lines += ["", "## Targets", ""] + targets_lines(targets)
    lines += ["", "Ratios are segq's median ÷ that row's median in the same case. For rates "
              "above 1 means segq is faster; for latency and RSS (lower is better) above 1 "
              "means segq is worse."]
    header = ["Case", "Library", "Median", "Unit", "segq/peer", "segq/limit", "Repeats × N", "Note"]
    for workload in results.workloads():
        lines += ["", f"## {workload}: {titles.get(workload, '')}", ""]
        rows = [_row(results, m) for case in results.cases(workload)
                for m in results.rows(case, LIBRARY_ORDER)]
        lines += _table(header, rows)
    return "\n".join(lines) + "\n"


def to_json(meta: dict[str, Any], results: ResultSet, targets: list[dict[str, Any]]) -> str:
    """Return results.json: header facts, every measurement with its raw repeats, targets."""
    return json.dumps({"schema": SCHEMA, "meta": meta,
                       "measurements": [m.to_json() for m in results],
                       "targets": targets}, indent=2, ensure_ascii=False) + "\n"


def write(out: Path, meta: dict[str, Any], results: ResultSet, targets: list[dict[str, Any]],
          titles: dict[str, str]) -> str:
    """Write results.md and results.json under ``out``; return the Markdown."""
    out.mkdir(parents=True, exist_ok=True)
    md = markdown(meta, results, targets, titles)
    (out / "results.md").write_text(md)
    (out / "results.json").write_text(to_json(meta, results, targets))
    return md

