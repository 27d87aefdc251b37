"""Run the segq benchmark suite: ``python -m benchmarks [--quick] [--out DIR] [--only W...]``."""

from __future__ import annotations

import argparse
import importlib.util
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

from . import plots, procs, report, sysinfo, targets
from .config import FULL, QUICK
from .context import Context
from .peers import ADAPTERS
from .workloads import WORKLOADS

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = Path(__file__).resolve().parent / "results"


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Parse the command line."""
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    p.add_argument("--quick", action="store_true",
                   help="3 repeats and small N: finishes in about a minute")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT,
                   help="directory for results.md, results.json and the PNGs "
                        "(default: %(default)s)")
    p.add_argument("--only", nargs="+", choices=list(WORKLOADS), metavar="WORKLOAD",
                   help=f"run only these workloads: {', '.join(WORKLOADS)}")
    p.add_argument("--libs", nargs="+", metavar="NAME",
                   help="run only adapters whose name contains one of these words "
                        "(the raw-file limits always run)")
    p.add_argument("--tmp", type=Path, default=Path(tempfile.gettempdir()),
                   help="where the per-run queue directories go (default: %(default)s)")
    p.add_argument("--note", default="",
                   help="a line for the report header, e.g. which segq snapshot was measured")
    return p.parse_args(argv)


def _module_path(name: str) -> str:
    """Return where ``name`` would be imported from, or "not found"."""
    spec = importlib.util.find_spec(name)
    return str(Path(spec.origin).parent) if spec and spec.origin else "not found"


def main(argv: list[str] | None = None) -> int:
    """Run the selected workloads, then write the report, JSON and plots."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    mode = QUICK if args.quick else FULL
    args.tmp.mkdir(parents=True, exist_ok=True)

    adapters, unavailable = [], {}
    for cls in ADAPTERS:
        if args.libs and not any(w.lower() in cls.name.lower() for w in args.libs):
            continue
        reason = cls.import_error()
        if reason:
            unavailable[cls.name] = reason
            print(f"skipping {cls.name}: {reason}")
        else:
            adapters.append(cls)

    procs.preload(sorted({cls.module for cls in adapters}))
    ctx = Context(mode=mode, tmp_root=args.tmp.resolve(), adapters=adapters)
    # The machine may be shared: record how busy it was, since every number
    # here is only as good as the quiet it was measured in.
    load_start = os.getloadavg()
    started = time.monotonic()
    for name in args.only or WORKLOADS:
        doc = (WORKLOADS[name].__doc__ or "").strip().splitlines()[0]
        print(f"\n[{name}] {doc}  (t+{time.monotonic() - started:.0f}s)", flush=True)
        WORKLOADS[name](ctx)

    meta = sysinfo.collect(ctx.tmp_root, REPO, mode.name, unavailable)
    meta["repeats"] = mode.repeats
    meta["command"] = shlex.join(["python", "-m", "benchmarks", *(sys.argv[1:] if argv is None else argv)])
    meta["note"] = args.note
    meta["segq_path"] = _module_path("segq")
    meta["elapsed_s"] = round(time.monotonic() - started, 1)
    meta["loadavg_start"], meta["loadavg_end"] = load_start, os.getloadavg()
    checked = targets.evaluate(ctx.results)
    titles = {k: (f.__doc__ or "").strip().splitlines()[0] for k, f in WORKLOADS.items()}
    md = report.write(args.out, meta, ctx.results, checked, titles)
    print("\n" + md)
    for path in plots.write(args.out, ctx.results):
        print(f"wrote {path}")
    print(f"wrote {args.out / 'results.md'} and {args.out / 'results.json'} "
          f"in {meta['elapsed_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
