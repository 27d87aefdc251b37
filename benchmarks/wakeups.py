"""Wake-ups per job: how many idle workers one enqueued job wakes.

Run from the repository root::

    python -m benchmarks.wakeups                 # 8 worker processes, 200 jobs
    python -m benchmarks.wakeups --workers 4 --jobs 500

Method
------
``--workers`` processes each run ``segq.run_worker`` (one thread each) on one
group and wait, idle.  The benchmark then sends ``--jobs`` jobs one at a
time, waiting after each until it is acked (so every job finds every worker
idle), and reads the voluntary context switches of every worker thread
(``/proc/<pid>/task/*/status``) before and after.  A process that sleeps
and is woken counts one voluntary switch when it goes back to sleep, so
the difference, per job, is how many workers each job woke (plus what a
handled job costs its one worker).  The same span is also measured with no
job sent, to subtract the once-a-second safety re-check every idle waiter
does; the report gives the raw and the corrected figure.  Linux only.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

WORKER = """
import os, sys, segq
done = int(sys.argv[2])
segq.run_worker(sys.argv[1], lambda job: os.write(done, b"x") and None, lease=60)
"""


def _switches(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        task_dir = f"/proc/{pid}/task"
        for task in os.listdir(task_dir):
            with open(f"{task_dir}/{task}/status") as status:
                for line in status:
                    if line.startswith("voluntary_ctxt_switches"):
                        total += int(line.split()[1])
    return total


def measure(workers: int, jobs: int, gap: float) -> dict[str, float]:
    import segq

    root = tempfile.mkdtemp(prefix="segq-wakeups-")
    path = os.path.join(root, "q")
    processes: list[subprocess.Popen[bytes]] = []
    try:
        with segq.Sender(path, segment_size=1 << 20) as tx:
            tx.send(b"warm-up")
            environment = dict(os.environ, PYTHONPATH=os.getcwd())
            done, done_by_workers = os.pipe()
            processes = [
                subprocess.Popen(
                    [sys.executable, "-c", WORKER, path, str(done_by_workers)],
                    env=environment,
                    pass_fds=[done_by_workers],
                )
                for _ in range(workers)
            ]
            os.close(done_by_workers)
            pids = [process.pid for process in processes]
            _wait_acked(done)
            time.sleep(1.5)  # every worker has started and is waiting

            started = time.monotonic()
            before = _switches(pids)
            for number in range(jobs):
                tx.send(b"job %d" % number)
                _wait_acked(done)
                time.sleep(gap)
            span = time.monotonic() - started
            during = _switches(pids) - before

            before = _switches(pids)
            time.sleep(span)
            idle = _switches(pids) - before
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            process.wait()
        shutil.rmtree(root, ignore_errors=True)
    return {
        "workers": workers,
        "jobs": jobs,
        "seconds": span,
        "switches_with_jobs": during,
        "switches_idle_same_span": idle,
        "per_job_raw": during / jobs,
        "per_job": (during - idle) / jobs,
    }


def _wait_acked(done: int) -> None:
    # Each worker writes a byte to the pipe after handling a job (the ack
    # follows at once; the next send does not need it to have happened).
    if not os.read(done, 1):
        raise RuntimeError("the workers are gone")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--jobs", type=int, default=200)
    parser.add_argument("--gap", type=float, default=0.005, help="seconds between an ack and the next send")
    options = parser.parse_args()
    result = measure(options.workers, options.jobs, options.gap)
    for key, value in result.items():
        print(f"{key:26} {value:,.2f}" if isinstance(value, float) else f"{key:26} {value}")


if __name__ == "__main__":
    main()
