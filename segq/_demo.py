"""``segq demo``: a producer and a consumer process through a queue; the consumer is SIGKILLed mid-stream.

The producer is ``segq send`` fed numbered lines through a pipe, the
consumer ``segq recv --follow`` read through another.  Part-way the consumer
is SIGKILLed; what it wrote before dying is still in its pipe.  The queue is
recovered, a new consumer finishes, and every number is accounted for: sent,
received, replayed (written but not yet committed when the kill came), lost
(always 0).  Output goes through the ``echo`` the CLI passes in.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from typing import Any

from . import recovery
from .errors import SegqError
from .receiver import Receiver
from .sender import Sender

__all__ = ["run_demo"]


def run_demo(records: int, *, keep: bool, echo: Callable[[str], object]) -> None:
    """Run the demo in a temporary directory (removed unless ``keep``); raise ``SegqError`` if a record was lost."""
    started = time.monotonic()
    workdir = tempfile.mkdtemp(prefix="segq-demo-")
    try:
        _Demo(os.path.join(workdir, "queue"), records, echo).run(started)
    finally:
        if keep:
            echo(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


class _Demo:
    """A producer and a consumer process through a queue; the consumer is SIGKILLed and replaced."""

    def __init__(self, queue: str, records: int, echo: Callable[[str], object]) -> None:
        self.queue = queue
        self.echo = echo
        self.records = records
        self.received: list[int] = []
        self.unique: set[int] = set()
        self.children: list[subprocess.Popen[bytes]] = []
        package_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        self.env = dict(
            os.environ, PYTHONPATH=os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))
        )
        self.deadline = time.monotonic() + 120

    def spawn(self, *args: str, **options: Any) -> subprocess.Popen[bytes]:
        child = subprocess.Popen([sys.executable, "-m", "segq", *args], env=self.env, **options)
        self.children.append(child)
        return child

    def read_until(self, consumer: subprocess.Popen[bytes], done: Callable[[], bool]) -> None:
        assert consumer.stdout is not None
        while not done():
            line = consumer.stdout.readline()
            if not line or time.monotonic() > self.deadline:
                raise SegqError(f"the demo's consumer (PID {consumer.pid}) stopped early: {self.stderr(consumer)}")
            self.received.append(int(line))
            self.unique.add(self.received[-1])

    def stderr(self, child: subprocess.Popen[bytes]) -> str:
        child.kill()
        child.wait()
        text = child.stderr.read().decode(errors="replace").strip() if child.stderr else ""
        return text.splitlines()[-1] if text else f"exit status {child.returncode}"

    def feed(self, producer: subprocess.Popen[bytes]) -> None:
        assert producer.stdin is not None
        try:
            for start in range(0, self.records, 500):
                lines = b"".join(b"%d\n" % number for number in range(start, min(start + 500, self.records)))
                producer.stdin.write(lines)
                producer.stdin.flush()
                time.sleep(0.02)  # a steady stream, so the kill lands while records still arrive
            producer.stdin.close()
        except (BrokenPipeError, ValueError):
            pass  # the producer died; run() reports it

    def run(self, started: float) -> None:
        with Sender(self.queue, segment_size=1 << 18):
            pass
        Receiver(self.queue).close()  # register the receiver first, so nothing is skipped
        pipes = {"stderr": subprocess.PIPE}
        try:
            producer = self.spawn("send", self.queue, stdin=subprocess.PIPE, **pipes)
            feeder = threading.Thread(target=self.feed, args=(producer,), daemon=True)
            feeder.start()
            consumer = self.spawn("recv", self.queue, "--follow", stdout=subprocess.PIPE, **pipes)
            self.echo(f"segq demo: {self.records:,} records from one process to another through {self.queue}")
            self.echo(f"  producer  PID {producer.pid:<7} segq send           reads numbered lines from a pipe")
            self.read_until(consumer, lambda: len(self.received) >= self.records * 2 // 5)
            os.kill(consumer.pid, signal.SIGKILL)
            consumer.wait()
            self._drain(consumer)
            first_run = len(self.received)
            self.echo(f"  consumer  PID {consumer.pid:<7} segq recv --follow  SIGKILLed after {first_run:,} records")
            report = recovery.recover(self.queue)
            unlocked = ", ".join(f"{holder.what} of dead PID {holder.pid}" for holder in report.unlocked)
            self.echo(
                f"  recover   {('unlocked ' + unlocked + '; ') if unlocked else ''}"
                f"receiver 'default' restarts at {report.receivers['default']}"
            )
            consumer = self.spawn("recv", self.queue, "--follow", stdout=subprocess.PIPE, **pipes)
            self.read_until(consumer, lambda: len(self.unique) >= self.records)
            consumer.send_signal(signal.SIGTERM)
            consumer.wait(timeout=30)
            self.echo(
                f"  consumer  PID {consumer.pid:<7} segq recv --follow  restarted: "
                f"{len(self.received) - first_run:,} records, then stopped with SIGTERM"
            )
            feeder.join(timeout=30)
            if producer.wait(timeout=30) != 0:
                raise SegqError(f"the demo's producer failed: {self.stderr(producer)}")
        finally:
            for child in self.children:
                if child.poll() is None:
                    child.kill()
                child.wait()
                for stream in (child.stdin, child.stdout, child.stderr):
                    if stream is not None:
                        stream.close()
        unique = len(self.unique)
        replayed = len(self.received) - unique
        lost = self.records - unique
        in_order = _in_order(self.received)
        self.echo(
            f"sent {self.records:,}  received {unique:,}  replayed {replayed:,}  lost {lost:,}  "
            f"in {time.monotonic() - started:.1f} s"
        )
        if lost or not in_order:
            raise SegqError(f"the demo lost {lost} records or got them out of order; please report this")

    def _drain(self, consumer: subprocess.Popen[bytes]) -> None:
        # What the killed consumer wrote before it died is still in the pipe.
        assert consumer.stdout is not None
        self.received.extend(int(line) for line in consumer.stdout.read().splitlines())
        self.unique.update(self.received)


def _in_order(received: list[int]) -> bool:
    """Each number comes after its predecessor, except where a restart replays a few."""
    highest = -1
    for number in received:
        if number > highest + 1:
            return False
        highest = max(highest, number)
    return True
