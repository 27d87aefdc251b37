"""Sizes and time budgets for the two run modes (``--quick`` and full)."""

from __future__ import annotations

from dataclasses import dataclass

KIB = 1024
MIB = 1024 * 1024

#: Record sizes of the per-record workloads, in bytes.
RECORD_SIZES: tuple[int, ...] = (100, 4 * KIB)
#: Records per call in the batch workload.
BATCH = 100
#: Chunk size of the bulk-I/O limit ("os.write in 1 MiB chunks").
CHUNK = MIB
#: Producer processes in the fan-in and group-commit workloads.
PRODUCERS = 4
#: Durable producer processes measured for group commit (rate and fdatasync calls per record).
DURABLE_PRODUCERS: tuple[int, ...] = (1, 2, 4, 8)
#: Bytes put and got back, untimed, before a single/batch run's clock starts,
#: so both modes time the steady state: a new queue's first page faults and
#: file creation are reported in their own row ("create"), not spread over N.
WARMUP_BYTES = 512 * KIB
#: Cap on the bytes one in-process run writes, whatever the calibration says.
MAX_RUN_BYTES = 256 * MIB


@dataclass(frozen=True)
class Mode:
    """Hold every knob that differs between quick and full runs."""

    name: str
    repeats: int
    #: Aimed wall time of one timed run; N is calibrated to hit it.
    target_s: float
    #: The same for runs across processes, where start-up skew of a few ms
    #: would swamp a short run.
    stream_target_s: float
    #: Calibration run size, and the bounds on the calibrated N.
    probe_records: int
    min_records: int
    max_records: int
    #: Two-process latency: messages per repeat and send rate (msgs/s).
    latency_msgs: int
    latency_rate: float
    #: Growth workload: base backlog and its multipliers.
    growth_base: int
    growth_multipliers: tuple[int, ...]
    #: A peer's growth point whose estimated time (all repeats) exceeds this is skipped.
    growth_budget_s: float
    #: Payload bytes read per scan repeat.
    scan_bytes: int
    #: Queues (or processes) created per repeat of the create and start-up cases.
    create_samples: int
    #: A consumer process that receives nothing for this long fails the run.
    idle_timeout_s: float
    #: Watchdog for one in-process run, and for one group of child processes.
    run_timeout_s: float
    child_timeout_s: float


QUICK = Mode(
    name="quick",
    repeats=3,
    target_s=0.05,
    stream_target_s=0.15,
    probe_records=100,
    min_records=50,
    max_records=200_000,
    latency_msgs=200,
    latency_rate=1000.0,
    growth_base=10_000,
    growth_multipliers=(1, 10, 100),
    growth_budget_s=6.0,
    scan_bytes=4 * MIB,
    create_samples=5,
    idle_timeout_s=5.0,
    run_timeout_s=60.0,
    child_timeout_s=60.0,
)

FULL = Mode(
    name="full",
    repeats=5,
    target_s=0.5,
    stream_target_s=1.0,
    probe_records=2_000,
    min_records=500,
    max_records=2_000_000,
    latency_msgs=3_000,
    latency_rate=1000.0,
    growth_base=100_000,
    growth_multipliers=(1, 10, 100),
    growth_budget_s=45.0,
    scan_bytes=256 * MIB,
    create_samples=11,
    idle_timeout_s=15.0,
    run_timeout_s=300.0,
    child_timeout_s=300.0,
)


def size_label(size: int) -> str:
    """Return the compact size tag used in case ids, e.g. ``4KiB``."""
    return size_text(size).replace(" ", "")


def size_text(size: int) -> str:
    """Return a human label for a record size, e.g. ``4 KiB``."""
    return f"{size // KIB} KiB" if size % KIB == 0 else f"{size} B"
