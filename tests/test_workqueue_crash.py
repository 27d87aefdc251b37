"""WorkQueue across real processes: random SIGKILLs, poison records, ClaimLost races.

Workers are separate Python processes running ``WORKER`` below.  Each logs
what it did to its own file with ``os.write`` (so a line written survives the
SIGKILL that follows it): ``C id attempt`` after a claim, ``A id`` just before
an ack, ``K id`` after the ack returned, ``L id`` after a ClaimLost.  The
checks hold whatever instant the kills land on:

- no record is acked twice (at most one ``K`` per record);
- every record is acked or dead-lettered in the end, and the group is drained;
- dead letters carry their attempts; poison records all end there.
"""

from __future__ import annotations

import collections
import os
import pathlib
import random
import signal
import subprocess
import sys
import time

import pytest

import segq
from segq.workqueue import DeadLetter, WorkQueue, group_info

REPO = str(pathlib.Path(segq.__file__).resolve().parent.parent)

WORKER = r"""
import os, random, sys, time
import segq
from segq.workqueue import _journal
_journal.DEFAULT_CAPACITY = 4096  # compact often, so kills land mid-compaction too
path, log_path, lease, max_attempts, hold, batch = sys.argv[1:7]
log = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
def note(text):
    os.write(log, (text + "\n").encode())
queue = segq.WorkQueue(path, lease=float(lease), max_attempts=int(max_attempts))
rng = random.Random(os.getpid())
while True:
    try:
        if int(batch) > 1 and rng.random() < 0.3:
            jobs = list(queue.claim_batch(int(batch), timeout=0.5))
        else:
            jobs = [queue.claim(timeout=0.5)]
    except segq.Empty:
        break
    for job in jobs:
        name = job.data.decode()
        note("C %s %d" % (name, job.attempt))
        if name.startswith("poison"):
            os.kill(os.getpid(), 9)
        if float(hold):
            time.sleep(rng.random() * float(hold))
        note("A %s" % name)
        try:
            if rng.random() < 0.1 and job.attempt < int(max_attempts) - 1:
                job.nack(reason="flaky")
                note("N %s" % name)
                continue
            job.ack()
        except segq.ClaimLost:
            note("L %s" % name)
            continue
        note("K %s" % name)
queue.close()
"""


def start_worker(path: pathlib.Path, log: pathlib.Path, *, lease: float, max_attempts: int, hold: float, batch: int) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")]))}
    arguments = [str(path), str(log), str(lease), str(max_attempts), str(hold), str(batch)]
    return subprocess.Popen([sys.executable, "-c", WORKER, *arguments], env=env)


def read_logs(directory: pathlib.Path) -> dict[str, collections.Counter[str]]:
    events: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    for log in directory.glob("*.log"):
        for line in log.read_text().splitlines():
            kind, name = line.split()[:2]
            events[name][kind] += 1
    return events


def read_dead_letters(path: pathlib.Path) -> list[DeadLetter]:
    directory = path / "dead" / "default"
    if not directory.exists():
        return []
    letters = []
    with segq.Receiver(directory) as receiver:
        while (message := receiver.try_recv()) is not None:
            letters.append(DeadLetter.decode(message.data))
            message.commit()
    return letters


def run_pool(
    tmp_path: pathlib.Path,
    names: list[str],
    *,
    workers: int,
    kill_for: float,
    lease: float = 30.0,
    max_attempts: int = 5,
    hold: float = 0.002,
    batch: int = 4,
    seed: int = 0,
) -> tuple[dict[str, collections.Counter[str]], list[DeadLetter], int]:
    path = tmp_path / "queue"
    logs = tmp_path / "logs"
    logs.mkdir()
    with segq.Sender(path, segment_size=16384) as sender:
        for index in range(0, len(names), 50):
            sender.send_batch([name.encode() for name in names[index : index + 50]])
    rng = random.Random(seed)
    serial = 0

    def spawn() -> subprocess.Popen[bytes]:
        nonlocal serial
        serial += 1
        return start_worker(path, logs / f"{serial}.log", lease=lease, max_attempts=max_attempts, hold=hold, batch=batch)

    pool = [spawn() for _ in range(workers)]
    kills = 0
    deadline = time.monotonic() + kill_for
    while time.monotonic() < deadline:
        time.sleep(rng.uniform(0.05, 0.25))
        victim = rng.randrange(len(pool))
        if pool[victim].poll() is None:
            pool[victim].send_signal(signal.SIGKILL)
            kills += 1
        pool[victim].wait()
        pool[victim] = spawn()
    # No more kills: let the pool drain the queue (poison records still kill their worker).
    finish = time.monotonic() + 120
    while time.monotonic() < finish:
        for index, process in enumerate(pool):
            if process.poll() is not None and process.returncode != 0:
                pool[index] = spawn()  # killed by a poison record: replace it
        if all(process.poll() == 0 for process in pool):
            break
        time.sleep(0.05)
    else:
        for process in pool:
            process.kill()
        pytest.fail("the pool did not drain the queue in 120 s")
    return read_logs(logs), read_dead_letters(path), kills


def check_drained(path: pathlib.Path) -> None:
    info = group_info(path)
    assert info["claims"] == [] and info["waiting"] == []
    assert info["low_water_mark"] == info["claim_head"]
    with WorkQueue(path) as queue:
        assert queue.try_claim() is None


def test_every_record_is_acked_once_despite_random_sigkills(tmp_path: pathlib.Path) -> None:
    names = [f"job-{index}" for index in range(3000)]
    events, letters, kills = run_pool(tmp_path, names, workers=3, kill_for=3.0, seed=1)
    assert kills > 5
    dead = {letter.data.decode() for letter in letters}
    for letter in letters:
        assert letter.attempts == 5  # only a record claimed by 5 killed workers in a row gets here
    for name in names:
        counts = events[name]
        assert counts["K"] <= 1, f"{name} was acked {counts['K']} times"
        assert counts["K"] == 1 or name in dead or counts["A"] > counts["K"] + counts["L"] + counts["N"], name
    check_drained(tmp_path / "queue")


def test_poison_records_go_to_the_dead_letter_queue_after_max_attempts(tmp_path: pathlib.Path) -> None:
    names = [f"job-{index}" for index in range(300)]
    for index in (17, 299):
        names[index] = f"poison-{index}"
    # Single claims: a record claimed in one batch with a poison record would
    # (rightly) share its fate, an attempt per death of the worker holding both.
    events, letters, _ = run_pool(tmp_path, names, workers=2, kill_for=0.0, max_attempts=3, batch=1, seed=2)
    assert sorted(letter.data.decode() for letter in letters) == sorted(name for name in names if "poison" in name)
    for letter in letters:
        assert letter.attempts == 3 and "died" in letter.reason
        assert events[letter.data.decode()]["C"] == 3
    for name in names:
        if "poison" not in name:
            assert events[name]["K"] == 1
    check_drained(tmp_path / "queue")


def test_claim_lost_races_with_short_leases(tmp_path: pathlib.Path) -> None:
    # Holding a job up to 0.1 s under a 0.05 s lease: claims run out while their
    # workers still work on them, other workers take the records over, and the
    # late acks must all fail with ClaimLost.
    names = [f"job-{index}" for index in range(60)]
    events, letters, _ = run_pool(
        tmp_path, names, workers=3, kill_for=0.0, lease=0.05, max_attempts=1000, hold=0.1, batch=1, seed=3
    )
    assert not letters
    lost = sum(counts["L"] for counts in events.values())
    assert lost > 0
    for name in names:
        assert events[name]["K"] == 1, name
    check_drained(tmp_path / "queue")


def test_a_late_worker_gets_claim_lost_and_the_new_holder_keeps_the_record(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "queue"
    with segq.Sender(path, segment_size=4096) as sender:
        sender.send(b"only")
    script = (
        "import segq, sys, time\n"
        "q = segq.WorkQueue(sys.argv[1], lease=0.2)\n"
        "job = q.claim(timeout=5)\n"
        "print('claimed', flush=True)\n"
        "time.sleep(1.0)\n"
        "for call in (job.renew, job.nack, job.ack):\n"
        "    try:\n"
        "        call()\n"
        "    except segq.ClaimLost:\n"
        "        print('lost', flush=True)\n"
        "q.close()\n"
    )
    env = {**os.environ, "PYTHONPATH": REPO}
    late = subprocess.Popen([sys.executable, "-c", script, str(path)], env=env, stdout=subprocess.PIPE, text=True)
    assert late.stdout is not None
    assert late.stdout.readline().strip() == "claimed"
    with WorkQueue(path, lease=30) as queue:
        job = queue.claim(timeout=10)  # waits until the lease runs out, no polling
        assert (job.data, job.attempt) == (b"only", 2)
        output, _ = late.communicate(timeout=30)
        assert output.split() == ["lost", "lost", "lost"]
        job.ack()  # the late worker's nack changed nothing
    check_drained(path)
