"""Real pipelines: `segq send` and `segq recv` in separate processes, killed and restarted, losing nothing."""

from __future__ import annotations

import os
import pathlib
import queue
import signal
import subprocess
import sys
import threading
import time
from typing import IO

import segq

ROOT = pathlib.Path(__file__).resolve().parent.parent
ENV = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
PATIENCE = 60.0  # seconds: generous, for a loaded machine; no test waits this long when things work


def segq_process(*args: object, **options: object) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "segq", *map(str, args)], env=ENV, **options)  # type: ignore[call-overload]


class Lines:
    """Read a child's stdout on a thread, so the test can wait for lines with a timeout."""

    def __init__(self, stream: IO[bytes]) -> None:
        self._lines: queue.Queue[bytes] = queue.Queue()
        self._thread = threading.Thread(target=self._pump, args=(stream,), daemon=True)
        self._thread.start()

    def _pump(self, stream: IO[bytes]) -> None:
        for line in stream:
            self._lines.put(line)
        self._lines.put(b"")  # end of stream

    def next(self) -> bytes:
        return self._lines.get(timeout=PATIENCE)

    def rest(self) -> list[bytes]:
        """Every line until the stream ends (the process exited)."""
        got = []
        while line := self.next():
            got.append(line)
        return got


def numbers(lines: list[bytes]) -> list[int]:
    return [int(line) for line in lines]


def assert_in_order_with_replays_only(received: list[int], total: int) -> None:
    """Every number arrived; a number may repeat (a restart replays), but none is skipped."""
    assert set(received) == set(range(total))
    highest = -1
    for number in received:
        assert number <= highest + 1, f"{number} came before {highest + 1}"
        highest = max(highest, number)


def stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.kill()
    process.wait()
    for stream in (process.stdin, process.stdout, process.stderr):
        if stream is not None:
            stream.close()


def test_python_dash_m_segq_is_the_cli_and_the_demo_runs(tmp_path: pathlib.Path) -> None:
    version = subprocess.run([sys.executable, "-m", "segq", "--version"], env=ENV, capture_output=True, check=True)
    assert version.stdout == f"segq {segq.__version__}\n".encode()
    demo = subprocess.run(
        [sys.executable, "-m", "segq", "demo", "--records", "2000"],
        env=ENV,
        capture_output=True,
        timeout=PATIENCE,
        check=False,
    )
    assert demo.returncode == 0, demo.stderr
    assert b"received 2,000" in demo.stdout and b"lost 0" in demo.stdout and demo.stderr == b""


def test_a_follower_killed_mid_stream_and_restarted_loses_nothing(queue_dir: pathlib.Path) -> None:
    total, held_back = 6000, 100
    segq.Sender(queue_dir, segment_size=16384).close()
    segq.Receiver(queue_dir).close()
    producer = segq_process("send", queue_dir, stdin=subprocess.PIPE)
    consumers = [segq_process("recv", queue_dir, "--follow", stdout=subprocess.PIPE)]
    last_consumer_started = threading.Event()

    def feed() -> None:
        assert producer.stdin is not None
        for start in range(0, total - held_back, 50):
            producer.stdin.write(b"".join(b"%d\n" % n for n in range(start, min(total - held_back, start + 50))))
            producer.stdin.flush()
            time.sleep(0.01)
        # The last records wait for the last consumer, so it is surely running when it gets SIGTERM.
        last_consumer_started.wait(timeout=PATIENCE)
        producer.stdin.write(b"".join(b"%d\n" % n for n in range(total - held_back, total)))
        producer.stdin.close()

    feeder = threading.Thread(target=feed)
    feeder.start()
    try:
        received: list[int] = []
        for kill_after in (total // 6, total // 3):
            lines = Lines(consumers[-1].stdout)  # type: ignore[arg-type]
            while len(received) < kill_after:
                received.append(int(lines.next()))
            consumers[-1].send_signal(signal.SIGKILL)
            received += numbers(lines.rest())  # what it wrote before it died is still in the pipe
            consumers.append(segq_process("recv", queue_dir, "--follow", stdout=subprocess.PIPE))
        lines = Lines(consumers[-1].stdout)  # type: ignore[arg-type]
        while len(set(received)) < total - held_back:
            received.append(int(lines.next()))
        last_consumer_started.set()
        while len(set(received)) < total:
            received.append(int(lines.next()))
        consumers[-1].send_signal(signal.SIGTERM)
        assert consumers[-1].wait(timeout=PATIENCE) == 128 + signal.SIGTERM
        assert lines.rest() == []
        feeder.join(timeout=PATIENCE)
        assert producer.wait(timeout=PATIENCE) == 0
    finally:
        last_consumer_started.set()
        for process in [producer, *consumers]:
            stop(process)
    assert_in_order_with_replays_only(received, total)
    assert recovery_backlog(queue_dir) == 0


def recovery_backlog(queue_dir: pathlib.Path) -> int:
    from segq import recovery

    return recovery.info(queue_dir, scan=True).consumers[0].backlog_records


def test_a_sender_killed_mid_stream_leaves_an_intact_prefix_and_a_restart_completes_it(
    queue_dir: pathlib.Path,
) -> None:
    total = 20000
    lines_in = b"".join(b"%d\n" % n for n in range(total))
    segq.Sender(queue_dir, segment_size=16384).close()
    segq.Receiver(queue_dir).close()
    follower = segq_process("recv", queue_dir, "--follow", stdout=subprocess.PIPE)
    lines = Lines(follower.stdout)  # type: ignore[arg-type]
    producer = segq_process("send", queue_dir, "--segment-size", "16K", stdin=subprocess.PIPE)
    try:
        assert producer.stdin is not None
        producer.stdin.write(lines_in[: len(lines_in) // 2])
        producer.stdin.flush()
        received = [int(lines.next()) for _ in range(100)]  # it is sending: kill it mid-stream
        producer.send_signal(signal.SIGKILL)
        producer.wait()
        # The queue now holds an intact, in-order prefix; resume after what it holds.
        while True:
            try:
                line = lines._lines.get(timeout=1.0)
            except queue.Empty:
                break
            received.append(int(line))
        assert received == list(range(len(received)))
        resumed = subprocess.run(
            [sys.executable, "-m", "segq", "send", str(queue_dir)],
            input=b"".join(b"%d\n" % n for n in range(len(received), total)),
            env=ENV,
            timeout=PATIENCE,
            check=True,
        )
        assert resumed.returncode == 0
        while len(received) < total:
            received.append(int(lines.next()))
        follower.send_signal(signal.SIGTERM)
        assert follower.wait(timeout=PATIENCE) == 128 + signal.SIGTERM
    finally:
        stop(producer)
        stop(follower)
    assert received == list(range(total))


def test_sigterm_while_waiting_leaves_the_position_after_the_last_written_record(queue_dir: pathlib.Path) -> None:
    with segq.Sender(queue_dir) as sender:
        for number in range(3):
            sender.send(b"%d" % number)
    follower = segq_process("recv", queue_dir, "--follow", stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        lines = Lines(follower.stdout)  # type: ignore[arg-type]
        assert [lines.next() for _ in range(3)] == [b"0\n", b"1\n", b"2\n"]
        follower.send_signal(signal.SIGTERM)  # it is blocked in recv, waiting for more
        assert follower.wait(timeout=PATIENCE) == 128 + signal.SIGTERM
        assert lines.rest() == [] and follower.stderr is not None and follower.stderr.read() == b""
    finally:
        stop(follower)
    with segq.Sender(queue_dir) as sender:
        sender.send(b"3")
    with segq.Receiver(queue_dir) as receiver:
        assert receiver.recv(timeout=5).data == b"3"  # everything it wrote was committed, nothing more


def test_sigterm_stops_send_between_records(queue_dir: pathlib.Path) -> None:
    segq.Receiver(queue_dir, create=True).close()
    producer = segq_process("send", queue_dir, stdin=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert producer.stdin is not None
        producer.stdin.write(b"whole\nhalf a li")
        producer.stdin.flush()
        with segq.Receiver(queue_dir) as receiver:
            assert receiver.recv(timeout=PATIENCE).data == b"whole"
            receiver.rollback()
        producer.send_signal(signal.SIGTERM)  # it is blocked reading the rest of the line
        assert producer.wait(timeout=PATIENCE) == 128 + signal.SIGTERM
        assert producer.stderr is not None and producer.stderr.read() == b""
    finally:
        stop(producer)
    with segq.Receiver(queue_dir) as receiver:
        assert receiver.recv(timeout=1).data == b"whole"
        receiver.commit()
        assert receiver.try_recv() is None  # the unfinished line was not sent
    assert not list((queue_dir / "senders").iterdir())  # it closed its Sender: no stale lock left


def test_a_closed_stdout_stops_recv_quietly_and_the_unwritten_record_comes_again(queue_dir: pathlib.Path) -> None:
    with segq.Sender(queue_dir) as sender:
        sender.send(b"read")
    follower = segq_process("recv", queue_dir, "--follow", stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert follower.stdout is not None
        assert follower.stdout.readline() == b"read\n"
        follower.stdout.close()  # the reader goes away, like `head -n 1`
        with segq.Sender(queue_dir) as sender:
            sender.send(b"never written")
        assert follower.wait(timeout=PATIENCE) == 0
        assert follower.stderr is not None and follower.stderr.read() == b""
    finally:
        stop(follower)
    again = subprocess.run(
        [sys.executable, "-m", "segq", "recv", str(queue_dir)], env=ENV, capture_output=True, check=True
    )
    assert again.stdout == b"never written\n"
