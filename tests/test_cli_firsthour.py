"""The CLI as a new user meets it: what recv commits when, consumer admin, exit codes, small queues."""

from __future__ import annotations

import json
import os
import pathlib
import shlex
import signal
import subprocess
import sys
import time

import pytest
from click.testing import CliRunner, Result

import segq
from segq._format import SEGMENT_HEADER_SIZE
from segq._state import cursor_path, read_position
from segq.cli import cli

ROOT = pathlib.Path(__file__).resolve().parent.parent
ENV = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
SEGQ = f"{shlex.quote(sys.executable)} -m segq"


def run(*args: object, input: bytes | str | None = None) -> Result:
    result = CliRunner().invoke(cli, [str(arg) for arg in args], input=input)
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output
    return result


def ok(*args: object, input: bytes | str | None = None) -> Result:
    result = run(*args, input=input)
    assert result.exit_code == 0, result.output
    return result


def fails(*args: object, input: bytes | str | None = None, code: int = 1) -> str:
    """Run a command that must fail with ``code``; return its last stderr line."""
    result = run(*args, input=input)
    assert result.exit_code == code, result.output
    lines = result.stderr.strip().splitlines()
    if code == 1:
        assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    return lines[-1]


def shell(command: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(["sh", "-c", command], env=ENV, capture_output=True, timeout=60)


def send_numbers(queue: pathlib.Path, count: int) -> None:
    with segq.Sender(queue, segment_size=1 << 16) as sender:
        sender.send_batch([b"%d" % number for number in range(1, count + 1)])


def committed(queue: pathlib.Path, name: str = "default") -> segq.Position | None:
    """Read a receiver's saved position without opening it (its recv may be running)."""
    path = cursor_path(queue, "r", name)
    return read_position(path) if os.path.exists(path) else None


# -- recv: what is committed when ------------------------------------------------------------


def test_recv_into_head_takes_one_record_per_run(queue_dir: pathlib.Path) -> None:
    send_numbers(queue_dir, 5000)
    printed = [shell(f"{SEGQ} recv {shlex.quote(str(queue_dir))} | head -1").stdout for _ in range(4)]
    assert printed == [b"1\n", b"2\n", b"3\n", b"4\n"]
    assert ok("recv", queue_dir, "-n", 1).stdout == "5\n"


def test_recv_batch_lets_a_reader_that_reads_ahead_take_the_whole_batch(queue_dir: pathlib.Path) -> None:
    send_numbers(queue_dir, 100)
    assert shell(f"{SEGQ} recv {shlex.quote(str(queue_dir))} --batch 10 | head -1").stdout == b"1\n"
    assert ok("recv", queue_dir, "-n", 1).stdout == "11\n"


def test_recv_into_a_file_commits_what_it_wrote(queue_dir: pathlib.Path, tmp_path: pathlib.Path) -> None:
    send_numbers(queue_dir, 2500)
    output = tmp_path / "out"
    assert shell(f"{SEGQ} recv {shlex.quote(str(queue_dir))} > {shlex.quote(str(output))}").returncode == 0
    assert output.read_bytes() == b"".join(b"%d\n" % number for number in range(1, 2501))
    assert ok("recv", queue_dir).stdout == ""


def test_recv_stopped_while_its_reader_sleeps_commits_nothing_unread(queue_dir: pathlib.Path) -> None:
    send_numbers(queue_dir, 3)
    reading, writing = os.pipe()
    child = subprocess.Popen([sys.executable, "-m", "segq", "recv", str(queue_dir)], stdout=writing, env=ENV)
    os.close(writing)
    try:
        assert os.read(reading, 2) == b"1\n"  # read the first record: it may be committed
        deadline = time.monotonic() + 30
        while committed(queue_dir) in (None, segq.Position(0, SEGMENT_HEADER_SIZE)) and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.2)  # recv has written record 2 and waits for it to be read
        child.send_signal(signal.SIGTERM)
        assert child.wait(timeout=30) == 128 + signal.SIGTERM
    finally:
        os.close(reading)
        if child.poll() is None:
            child.kill()
            child.wait()
    assert ok("recv", queue_dir).stdout == "2\n3\n"


def _acknowledging_run(queue: pathlib.Path, acknowledge: int, *options: str) -> tuple[list[bytes], int]:
    """Run recv with --ack-fd, read its records, acknowledge the first ``acknowledge``, then close the acks."""
    acks_read, acks_write = os.pipe()
    child = subprocess.Popen(
        [sys.executable, "-m", "segq", "recv", str(queue), "--follow", "--ack-fd", str(acks_read), *options],
        stdout=subprocess.PIPE,
        pass_fds=(acks_read,),
        env=ENV,
    )
    os.close(acks_read)
    assert child.stdout is not None
    seen = []
    try:
        for _ in range(acknowledge):
            seen.append(child.stdout.readline())
            os.write(acks_write, b"\n")
    finally:
        os.close(acks_write)
        code = child.wait(timeout=30)
        child.stdout.close()
    return seen, code


def test_recv_ack_fd_commits_exactly_the_acknowledged_records(queue_dir: pathlib.Path) -> None:
    send_numbers(queue_dir, 10)
    seen, code = _acknowledging_run(queue_dir, 2)
    assert seen == [b"1\n", b"2\n"] and code == 0
    assert ok("recv", queue_dir, "-n", 1).stdout == "3\n"
    seen, code = _acknowledging_run(queue_dir, 3, "--batch", "5")
    assert seen == [b"4\n", b"5\n", b"6\n"] and code == 0
    assert ok("recv", queue_dir, "-n", 1).stdout == "7\n"


def test_recv_ack_fd_must_be_open(queue_dir: pathlib.Path) -> None:
    send_numbers(queue_dir, 1)
    assert "--ack-fd" in fails("recv", queue_dir, "--ack-fd", 987, code=2)
