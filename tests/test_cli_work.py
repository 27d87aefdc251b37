"""``segq work``: a durable xargs, driven as a real process (signals, process groups, leases)."""

from __future__ import annotations

import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest

from _harness import group_drained

import segq
import segq.recovery
import segq.workqueue

ROOT = pathlib.Path(__file__).resolve().parent.parent
PATIENCE = 30.0
ENV = dict(os.environ, PYTHONPATH=str(ROOT))


def segq_command(*args: object, **options: object) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "segq", *map(str, args)],
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        **options,  # type: ignore[call-overload]
    )


def run_segq(*args: object, input: bytes | None = None, timeout: float = PATIENCE) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "segq", *map(str, args)], env=ENV, input=input, capture_output=True, timeout=timeout
    )


def fill(queue_dir: pathlib.Path, *records: bytes) -> None:
    with segq.Sender(queue_dir, segment_size=1 << 20) as tx:
        tx.send_batch(records)


def drain(queue_dir: pathlib.Path) -> list[bytes]:
    """Claim and ack whatever is claimable (the test is over); return the data."""
    left = []
    with segq.WorkQueue(queue_dir, lease=60) as wq:
        while (job := wq.try_claim()) is not None:
            left.append(job.data)
            job.ack()
    return left


def wait_for(condition: object, what: str) -> None:
    deadline = time.monotonic() + PATIENCE
    while not condition():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        time.sleep(0.01)


def test_exit_zero_acks_and_other_exits_nack_with_the_last_stderr_line(
    queue_dir: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    fill(queue_dir, b"good", b"bad")
    out = tmp_path / "out"
    script = (
        'read x; echo "$x $SEGQ_ATTEMPT $SEGQ_JOB_ID" >> ' + str(out) + '; '
        '[ "$x" = good ] || { echo "first line" >&2; echo "no luck with $x" >&2; exit 3; }'
    )
    worker = segq_command("work", queue_dir, "--max-attempts", 2, "--", "sh", "-c", script)
    wait_for(lambda: (queue_dir / "dead" / "default").exists() and _dead_letters(queue_dir), "the dead letter")
    worker.send_signal(signal.SIGTERM)
    _, stderr = worker.communicate(timeout=PATIENCE)
    assert worker.returncode == 128 + signal.SIGTERM
    assert stderr.count(b"no luck with bad") == 2  # the command's stderr is passed through
    lines = out.read_bytes().splitlines()
    assert lines[0] == b"good 1 0-32"
    assert [line.rsplit(b" ", 1)[0] for line in lines[1:]] == [b"bad 1", b"bad 2"]
    letter = _dead_letters(queue_dir)[0]
    assert (letter.data, letter.attempts, letter.reason) == (b"bad", 2, "no luck with bad (exit status 3)")
    assert drain(queue_dir) == []


def test_a_command_outliving_its_lease_is_killed_and_nacked(queue_dir: pathlib.Path, tmp_path: pathlib.Path) -> None:
    fill(queue_dir, b"slow")
    pid_file = tmp_path / "pid"
    started = time.monotonic()
    # The command's own child (sleep) must die too: the whole process group is killed.
    worker = segq_command(
        "work", queue_dir, "--lease", 1.5, "--max-attempts", 1, "--",
        "sh", "-c", f"sleep 60 & echo $! > {pid_file}; wait",
    )
    wait_for(lambda: (queue_dir / "dead" / "default").exists() and _dead_letters(queue_dir), "the dead letter")
    elapsed = time.monotonic() - started
    worker.send_signal(signal.SIGTERM)
    worker.communicate(timeout=PATIENCE)
    letter = _dead_letters(queue_dir)[0]
    assert letter.reason.startswith("killed: still running when its lease of 1.5 s was about to end")
    assert elapsed < PATIENCE
    sleeper = int(pid_file.read_text())
    wait_for(lambda: not _alive(sleeper), "the command's child to be gone")


def _dead_letters(queue_dir: pathlib.Path) -> list[segq.DeadLetter]:
    with segq.Receiver(queue_dir / "dead" / "default", "test-reader") as rx:
        try:
            batch = rx.recv_batch(1000, timeout=0)
        except segq.Empty:
            return []
        batch.rollback()  # only looking
        return [segq.DeadLetter.decode(message.data) for message in batch]


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(") ")[1][0] != "Z"
    except FileNotFoundError:
        return False


def test_minus_j_runs_that_many_commands_at_once(queue_dir: pathlib.Path, tmp_path: pathlib.Path) -> None:
    fill(queue_dir, *(b"%d" % number for number in range(3)))
    gate = tmp_path / "gate"
    gate.mkdir()
    # Each command waits until three are running: only passes with -j 3.
    script = f'read x; touch {gate}/$x; n=0; while [ $(ls {gate} | wc -l) -lt 3 ]; do sleep 0.01; done'
    worker = segq_command("work", queue_dir, "-j", 3, "--", "sh", "-c", script)
    wait_for(lambda: len(os.listdir(gate)) == 3, "three commands at once")
    wait_for(lambda: segq.workqueue.group_info(queue_dir)["claims"] == [], "the acks")
    worker.send_signal(signal.SIGTERM)
    _, stderr = worker.communicate(timeout=PATIENCE)
    assert stderr == b""  # quiet in a pipe: no progress line
    assert drain(queue_dir) == []


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_waits_for_running_commands_and_gives_back_the_rest(
    queue_dir: pathlib.Path, tmp_path: pathlib.Path, signum: int
) -> None:
    fill(queue_dir, *(b"%d" % number for number in range(6)))
    log = tmp_path / "log"
    log.touch()
    script = f'read x; echo "start $x" >> {log}; sleep 0.5; echo "end $x" >> {log}'
    # A new session: the signal reaches segq only, as it would from kill(1); Ctrl-C's
    # process-group SIGINT is kept from the commands by their own process group.
    worker = segq_command("work", queue_dir, "-j", 2, "--", "sh", "-c", script, start_new_session=True)
    wait_for(lambda: log.read_bytes().count(b"start") == 2, "two commands to start")
    os.killpg(worker.pid, signum)  # what a terminal's Ctrl-C does: the whole foreground group
    worker.communicate(timeout=PATIENCE)
    assert worker.returncode == 128 + signum
    lines = log.read_bytes().splitlines()
    started = sorted(line.split()[1] for line in lines if line.startswith(b"start"))
    ended = sorted(line.split()[1] for line in lines if line.startswith(b"end"))
    assert started == ended and len(started) == 2
    assert sorted(drain(queue_dir)) == sorted(set(b"%d" % n for n in range(6)) - set(ended))


def test_work_refuses_a_command_that_does_not_exist(queue_dir: pathlib.Path) -> None:
    fill(queue_dir, b"x")
    result = run_segq("work", queue_dir, "--", "no-such-command-anywhere")
    assert result.returncode == 2
    assert b"no-such-command-anywhere: command not found" in result.stderr
    assert b"Traceback" not in result.stderr
    assert drain(queue_dir) == [b"x"]


def test_a_failed_command_whose_nack_fails_is_never_acked(queue_dir: pathlib.Path) -> None:
    fill(queue_dir, b"x")
    (queue_dir / "dead").write_bytes(b"")  # a file where the dead-letter queues go: the last nack cannot write
    result = run_segq("work", queue_dir, "--max-attempts", 1, "--lease", 2, "--drain", "--", "false")
    assert result.returncode == 1, result.stderr
    assert b"could not nack the job" in result.stderr
    assert b"Traceback" not in result.stderr
    stats = segq.workqueue.group_info(queue_dir)["stats"]
    assert stats["done"] == 0  # it used to be acked: the failed job counted as done, gone
    (queue_dir / "dead").unlink()
    time.sleep(2.1)  # the claim's lease runs out; the job is claimable again
    assert drain(queue_dir) == [b"x"]


def test_work_without_a_command_is_a_usage_error(queue_dir: pathlib.Path) -> None:
    fill(queue_dir, b"x")
    result = run_segq("work", queue_dir)
    assert result.returncode == 2


def test_drain_exits_once_the_queue_is_empty(queue_dir: pathlib.Path, tmp_path: pathlib.Path) -> None:
    fill(queue_dir, *(b"%d" % number for number in range(20)))
    out = tmp_path / "out"
    out.mkdir()
    result = run_segq("work", queue_dir, "-j", 3, "--drain", "--", "sh", "-c", f'cat > {out}/"$SEGQ_JOB_ID"')
    assert result.returncode == 0, result.stderr
    assert sorted(path.read_bytes() for path in out.iterdir()) == sorted(b"%d" % number for number in range(20))
    assert drain(queue_dir) == []


def test_the_readme_two_stage_pipeline_survives_kill_9_of_either_stage(tmp_path: pathlib.Path) -> None:
    import random

    rng = random.Random(7)
    first, middle, done = tmp_path / "in", tmp_path / "mid", tmp_path / "done"
    done.mkdir()
    stage1 = tmp_path / "stage1"
    stage1.write_text('#!/bin/sh\nread x\necho "$x-a"\necho "$x-b"\n')
    stage2 = tmp_path / "stage2"
    stage2.write_text(f'#!/bin/sh\ncat > {done}/"$SEGQ_JOB_ID.$$"\n')
    for script in (stage1, stage2):
        script.chmod(0o755)
    lines = [b"photo-%03d" % number for number in range(150)]

    def start(stage: int) -> subprocess.Popen[bytes]:
        if stage == 1:
            return segq_command("work", first, "--create", "--then", middle, "-j", 2, "--", str(stage1))
        return segq_command("work", middle, "--create", "-j", 2, "--", str(stage2))

    stages = {1: start(1), 2: start(2)}  # both start before any queue exists, as in the README
    result = run_segq("enqueue", first, input=b"".join(line + b"\n" for line in lines))
    assert result.returncode == 0, result.stderr
    kills = 0
    try:
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            time.sleep(rng.uniform(0.05, 0.25))
            victim = rng.choice([1, 2])
            stages[victim].kill()  # kill -9
            stages[victim].communicate()
            kills += 1
            stages[victim] = start(victim)
        drained = True
        try:
            wait_for(lambda: group_drained(first) and group_drained(middle), "both stages to finish")
        except AssertionError:
            drained = False
    finally:
        for process in stages.values():
            process.send_signal(signal.SIGTERM)
        errors = [process.communicate(timeout=PATIENCE)[1] for process in stages.values()]
        for path in (first, middle):
            # A stage killed while the last one attached leaves the queue's append
            # semaphore until the queue is next opened; `segq unlock` removes it now.
            segq.recovery.remove_idle_semaphores(path)
    assert drained, f"the stages did not finish; their stderr ends: {[error[-1500:] for error in errors]}"
    assert kills >= 5
    # The middle queue holds each line of stage 1 exactly once, whatever the kills.
    with segq.Receiver(middle, "check") as rx:
        batch = rx.recv_batch(10_000, timeout=0)
        middle_lines = sorted(message.data for message in batch)
        batch.rollback()
    assert middle_lines == sorted(line + suffix for line in lines for suffix in (b"-a", b"-b"))
    # Stage 2 ran for every one of them (a command running when its stage was killed ran again).
    handled = {path.read_bytes() for path in done.iterdir()}
    assert set(middle_lines) <= handled
    # A stage killed while writing a job to its command's stdin leaves that
    # command a cut input (it ran, unacked, and the job ran again whole): only
    # a proper prefix of some line may show beside the whole ones.
    cut = handled - set(middle_lines)
    assert all(any(line.startswith(piece) and line != piece for line in middle_lines) for piece in cut), cut


def test_a_progress_line_shows_on_a_terminal(queue_dir: pathlib.Path) -> None:
    import pty

    fill(queue_dir, *(b"%d" % number for number in range(5)))
    controller, terminal = pty.openpty()
    try:
        worker = subprocess.Popen(
            [sys.executable, "-m", "segq", "work", str(queue_dir), "--drain", "--", "sh", "-c", "sleep 0.3"],
            env=ENV,
            stdout=subprocess.DEVNULL,
            stderr=terminal,
        )
        os.close(terminal)
        terminal = -1
        output = b""
        while True:
            try:
                chunk = os.read(controller, 4096)
            except OSError:  # the terminal's other side closed: the worker exited
                break
            if not chunk:
                break
            output += chunk
        assert worker.wait(PATIENCE) == 0
    finally:
        os.close(controller)
        if terminal >= 0:
            os.close(terminal)
    assert b"5 done, 0 failed" in output
    assert b"jobs/s" in output


def test_enqueue_makes_each_stdin_line_a_job_with_the_options(queue_dir: pathlib.Path) -> None:
    result = run_segq("enqueue", queue_dir, "--priority", 7, "--delay", 3600, input=b"resize a\nresize b\n")
    assert result.returncode == 0, result.stderr
    ids = result.stdout.decode().split()
    assert len(ids) == 2
    with segq.WorkQueue(queue_dir, lease=60) as wq:
        assert wq.try_claim() is None  # not due for an hour
        assert wq.stats().scheduled == 2
    result = run_segq("enqueue", queue_dir, "--priority", 9, "--id", "invoice-7", input=b"send invoice 7\n")
    assert result.stdout == b"invoice-7\n"
    with segq.WorkQueue(queue_dir, lease=60) as wq:
        job = wq.claim(timeout=5)
        assert (job.data, job.id, job.priority) == (b"send invoice 7", "invoice-7", 9)
        job.ack()


def test_enqueue_with_a_dedup_key_says_duplicate_and_writes_nothing(queue_dir: pathlib.Path) -> None:
    first = run_segq("enqueue", queue_dir, "--dedup-key", "order-12", input=b"charge order 12\n")
    again = run_segq("enqueue", queue_dir, "--dedup-key", "order-12", input=b"charge order 12\n")
    job_id = first.stdout.decode().strip()
    assert again.stdout.decode().strip() == f"{job_id} duplicate"
    assert drain(queue_dir) == [b"charge order 12"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--delay", "5", "--run-at", "2030-01-01T00:00:00"], b"--delay or --run-at, not both"),
        (["--run-at", "next tuesday"], b"is not a time"),
        (["--id", "x"], b"--id names one job, but stdin has 2 lines"),
    ],
)
def test_enqueue_refuses_bad_options_with_usage_errors(queue_dir: pathlib.Path, args: list[str], message: bytes) -> None:
    result = run_segq("enqueue", queue_dir, *args, input=b"a\nb\n")
    assert result.returncode == 2
    assert message in result.stderr and b"Traceback" not in result.stderr


def test_work_on_a_missing_queue_is_an_error_unless_told_to_create_it(tmp_path: pathlib.Path) -> None:
    missing = tmp_path / "nope"
    result = run_segq("work", missing, "--drain", "--", "true")
    assert result.returncode == 1
    assert b"no queue at" in result.stderr and b"Traceback" not in result.stderr
    assert not missing.exists()
    result = run_segq("work", missing, "--create", "--drain", "--", "true")
    assert result.returncode == 0, result.stderr
    assert missing.is_dir()
