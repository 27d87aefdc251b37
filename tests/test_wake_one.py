"""One wake-up per job: idle claimers of a group are woken one at a time, and pass the turn on.

The worker processes here switch the once-a-second safety re-check off, so
only a real wake-up can get a job claimed: a lost one hangs the test.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import time

import segq

ROOT = pathlib.Path(__file__).resolve().parent.parent
PATIENCE = 30.0

# argv: queue, group, directory for "ready"/job files, how many files make the barrier
WORKER = """
import os, sys, time, segq, segq._wake
segq._wake._SAFETY_SECONDS = 3600.0
path, group, directory, barrier = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
def handler(job):
    open(os.path.join(directory, job.data.decode() + "." + str(os.getpid())), "w").close()
    deadline = time.monotonic() + 60
    while len(os.listdir(directory)) < barrier and time.monotonic() < deadline:
        time.sleep(0.005)
segq.run_worker(path, handler, group=group, lease=120)
"""


def start_workers(queue_dir: pathlib.Path, group: str, directory: pathlib.Path, count: int, barrier: int) -> list[subprocess.Popen[bytes]]:
    directory.mkdir(exist_ok=True)
    environment = dict(os.environ, PYTHONPATH=str(ROOT))
    return [
        subprocess.Popen([sys.executable, "-c", WORKER, str(queue_dir), group, str(directory), str(barrier)], env=environment)
        for _ in range(count)
    ]


def stop(workers: list[subprocess.Popen[bytes]]) -> None:
    for worker in workers:
        worker.terminate()
    for worker in workers:
        worker.wait(PATIENCE)


def waiting_claimers(queue_dir: pathlib.Path) -> int:
    from segq._control import CLAIM_WAITERS, SLOT_COUNT

    with open(queue_dir / "segq.ctl", "rb") as control:
        control.seek(CLAIM_WAITERS)
        return sum(control.read(SLOT_COUNT))


def wait_for(condition: object, what: str) -> None:
    deadline = time.monotonic() + PATIENCE
    while not condition():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        time.sleep(0.005)


def voluntary_switches(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/status") as status:
                for line in status:
                    if line.startswith("voluntary_ctxt_switches"):
                        total += int(line.split()[1])
    return total


def test_a_backlog_wakes_every_idle_worker_through_passed_on_wake_ups(
    queue_dir: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    with segq.Sender(queue_dir, segment_size=1 << 20) as tx:
        workers = start_workers(queue_dir, "default", tmp_path / "seen", 4, barrier=4)
        try:
            wait_for(lambda: waiting_claimers(queue_dir) == 4, "four idle workers")
            # One batch: the send wakes one worker; each claim passes a wake-up
            # on while jobs are left, and the handlers only finish when all
            # four run at once.
            tx.send_batch([b"a", b"b", b"c", b"d"])
            wait_for(lambda: len(os.listdir(tmp_path / "seen")) == 4, "four jobs running at once")
            owners = {name.split(".")[1] for name in os.listdir(tmp_path / "seen")}
            assert len(owners) == 4
        finally:
            stop(workers)


def test_a_job_wakes_one_worker_in_each_group(queue_dir: pathlib.Path, tmp_path: pathlib.Path) -> None:
    with segq.Sender(queue_dir, segment_size=1 << 20) as tx:
        workers = start_workers(queue_dir, "resize", tmp_path / "resize", 3, barrier=1)
        workers += start_workers(queue_dir, "audit", tmp_path / "audit", 3, barrier=1)
        try:
            wait_for(lambda: waiting_claimers(queue_dir) == 6, "six idle workers")
            tx.send(b"photo")
            wait_for(lambda: os.listdir(tmp_path / "resize") and os.listdir(tmp_path / "audit"), "both groups")
            wait_for(lambda: waiting_claimers(queue_dir) == 6, "the workers to wait again")
        finally:
            stop(workers)


def test_one_job_into_idle_workers_wakes_one_of_them(queue_dir: pathlib.Path, tmp_path: pathlib.Path) -> None:
    count = 6
    jobs = 20
    with segq.Sender(queue_dir, segment_size=1 << 20) as tx:
        workers = start_workers(queue_dir, "default", tmp_path / "seen", count, barrier=0)
        try:
            wait_for(lambda: waiting_claimers(queue_dir) == count, "idle workers")
            pids = [worker.pid for worker in workers]
            before = voluntary_switches(pids)
            for number in range(jobs):
                tx.send(b"job%d" % number)
                wait_for(lambda: len(os.listdir(tmp_path / "seen")) == number + 1, "the job")
                wait_for(lambda: waiting_claimers(queue_dir) == count, "every worker idle again")
            woken = voluntary_switches(pids) - before
        finally:
            stop(workers)
    # Each job costs its one worker about one switch (it sleeps again after
    # the job); waking every idle worker would cost `count` per job.
    assert woken <= 2 * jobs, f"{woken} voluntary context switches for {jobs} jobs into {count} idle workers"
