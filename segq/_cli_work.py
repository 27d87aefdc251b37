"""``segq work`` and ``segq enqueue``: a durable xargs over a work-queue group, and jobs from the shell.

``segq work PATH -- CMD`` runs CMD once per job (through ``segq.worker``):
the job's data on its stdin, ``SEGQ_JOB_ID`` and ``SEGQ_ATTEMPT`` in its
environment.  Exit status 0 acks the job (with ``--then QUEUE``, each line
CMD printed becomes a job in QUEUE, atomically with the ack); any other exit
nacks it with the last line of CMD's stderr as the reason.  A command still
running as its lease is about to end is killed (its whole process group)
and nacked, so the nack still counts.  Commands run in their own process
group: a Ctrl-C at the terminal reaches ``segq work``, which stops claiming
and waits for them, not the commands themselves.
"""

from __future__ import annotations

import datetime
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from typing import TYPE_CHECKING, Callable, ContextManager, Sequence

import click

from .errors import SegqError

if TYPE_CHECKING:
    from ._followups import Enqueue
    from .workqueue._jobs import Job

# The work queue, asyncio and the worker are imported when `work` runs, not when
# `segq` starts (issue 14: the CLI loads only what its command uses).

__all__ = ["register"]

#: How long before its lease ends a command is killed (at most), so that its nack still counts.
KILL_MARGIN = 0.5


def _job_id(job: Job) -> str:
    job_id = getattr(job, "id", None)
    if isinstance(job_id, str):
        return job_id
    position = job.position
    return f"{position.segment}-{position.offset}"


def _last_line(stderr: bytes) -> str:
    for line in reversed(stderr.splitlines()):
        text = line.decode("utf-8", "replace").strip()
        if text:
            return text
    return ""


class _Tally:
    """Counts jobs done and failed; draws the progress line on a terminal."""

    def __init__(self, show: bool) -> None:
        self.done = 0
        self.failed = 0
        self._lock = threading.Lock()
        self._started = time.monotonic()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if show:
            self._thread = threading.Thread(target=self._draw_loop, name="segq-work-progress", daemon=True)
            self._thread.start()

    def count(self, ok: bool) -> None:
        with self._lock:
            if ok:
                self.done += 1
            else:
                self.failed += 1

    def line(self) -> str:
        elapsed = max(time.monotonic() - self._started, 1e-9)
        return f"{self.done:,} done, {self.failed:,} failed, {self.done / elapsed:,.1f} jobs/s"

    def _draw_loop(self) -> None:
        while not self._stop.wait(0.5):
            click.echo(f"\r\x1b[K{self.line()}", err=True, nl=False)

    def close(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            click.echo(f"\r\x1b[K{self.line()}", err=True)


class _RunCommand:
    """The handler: run the command on one job and settle it by its exit status."""

    def __init__(self, command: Sequence[str], then: str | None, lease: float, tally: _Tally) -> None:
        self._command = list(command)
        self._then = then
        self._lease = lease
        self._tally = tally
        self._stderr_lock = threading.Lock()

    def __call__(self, job: Job) -> list[Enqueue] | None:
        environment = dict(os.environ, SEGQ_JOB_ID=_job_id(job), SEGQ_ATTEMPT=str(job.attempt))
        try:
            process = subprocess.Popen(
                self._command,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE if self._then is not None else None,
                stderr=subprocess.PIPE,
                env=environment,
                process_group=0,
            )
        except OSError as error:
            self._fail(job, f"cannot run {self._command[0]}: {error.strerror or error}")
            return None
        time_left = job.lease_expires_at - time.time() - min(KILL_MARGIN, self._lease / 4)
        try:
            stdout, stderr = process.communicate(job.data, timeout=max(0.0, time_left))
        except subprocess.TimeoutExpired:
            _kill_group(process)
            stdout, stderr = process.communicate()
            self._forward(stderr)
            self._fail(job, f"killed: still running when its lease of {self._lease:g} s was about to end")
            return None
        self._forward(stderr)
        if process.returncode != 0:
            status = (
                f"killed by signal {-process.returncode}"
                if process.returncode < 0
                else f"exit status {process.returncode}"
            )
            last = _last_line(stderr)
            self._fail(job, f"{last} ({status})" if last else status)
            return None
        self._tally.count(True)
        if self._then is None:
            return None
        from ._followups import Enqueue

        return [Enqueue(line, queue=self._then) for line in (stdout or b"").splitlines()]

    def _forward(self, stderr: bytes | None) -> None:
        if stderr:
            with self._stderr_lock:
                sys.stderr.buffer.write(stderr)
                sys.stderr.buffer.flush()

    def _fail(self, job: Job, reason: str) -> None:
        self._tally.count(False)
        try:
            job.nack(reason=reason)
        except SegqError as error:
            from .worker import log_failed_settlement
            from .workqueue import JobState

            log_failed_settlement(job, "nack", error)
            if job.state is JobState.HELD:
                raise  # returning would ack a job whose command failed; the worker tries the nack again


def _kill_group(process: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _check_command(command: Sequence[str]) -> None:
    if not command:
        raise click.UsageError("give the command to run after --, e.g. segq work jobs -- ./handle.sh")
    program = command[0]
    if os.sep in program:
        if not os.access(program, os.X_OK):
            raise click.BadParameter(f"{program} is not an executable file", param_hint="CMD")
    elif shutil.which(program) is None:
        raise click.BadParameter(f"{program}: command not found", param_hint="CMD")


def _parse_time(text: str) -> datetime.datetime | float:
    """Read --run-at: seconds since the epoch, or an ISO 8601 time (UTC unless it names a zone)."""
    try:
        return float(text)
    except ValueError:
        pass
    try:
        when = datetime.datetime.fromisoformat(text)
    except ValueError:
        raise click.BadParameter(
            f"{text!r} is not a time: give seconds since the epoch or ISO 8601 (2026-11-29T03:00:00Z)",
            param_hint="--run-at",
        ) from None
    return when if when.tzinfo is not None else when.replace(tzinfo=datetime.timezone.utc)


def register(cli: click.Group, library_warnings: Callable[[], ContextManager[None]]) -> None:
    """Add ``work`` and ``enqueue`` to the ``segq`` command group."""

    @cli.command()
    @click.argument("path", type=click.Path(path_type=str))
    @click.option("--delay", type=click.FloatRange(min=0), help="Seconds before the jobs may be claimed.")
    @click.option("--run-at", "run_at", help="When the jobs may be claimed: epoch seconds or ISO 8601 (UTC).")
    @click.option("--priority", type=click.IntRange(0, 9), default=0, show_default=True,
                  help="0..9, higher first.")
    @click.option("--dedup-key", "dedup_key",
                  help="Enqueue nothing while a job with this key is pending, claimed or recently done.")
    @click.option("--id", "job_id", help="The job's id (one input line only).")
    def enqueue(
        path: str, delay: float | None, run_at: str | None, priority: int, dedup_key: str | None, job_id: str | None
    ) -> None:
        """Enqueue each line of stdin as a job in the queue at PATH, with the options given.

        Prints each job's id, one per line ("ID duplicate" when --dedup-key
        matched a job and nothing was written).  The queue is created if
        missing.
        """
        if delay is not None and run_at is not None:
            raise click.UsageError("give --delay or --run-at, not both")
        when = _parse_time(run_at) if run_at is not None else None
        lines = sys.stdin.buffer.read().splitlines()
        if job_id is not None and len(lines) > 1:
            raise click.UsageError(f"--id names one job, but stdin has {len(lines)} lines")
        from .sender import Sender

        with library_warnings(), Sender(path) as sender:
            for line in lines:
                result = sender.enqueue(
                    line, run_at=when, delay=delay, priority=priority, dedup_key=dedup_key, job_id=job_id
                )
                click.echo(f"{result.id} duplicate" if result.duplicate else result.id)


    @cli.command(context_settings={"ignore_unknown_options": True})
    @click.argument("path", type=click.Path(path_type=str))
    @click.option("--group", default="default", show_default=True, help="Work-queue group: workers sharing the jobs.")
    @click.option("-j", "--jobs", "concurrency", type=click.IntRange(min=1), default=1, show_default=True,
                  help="Run up to N commands at once.")
    @click.option("--lease", type=click.FloatRange(min=0, min_open=True), default=30.0, show_default=True,
                  help="Seconds a command may run before it is killed and its job nacked.")
    @click.option("--max-attempts", type=click.IntRange(min=1), default=5, show_default=True,
                  help="After this many failed attempts a job goes to the dead-letter queue.")
    @click.option("--drain", is_flag=True, help="Exit (status 0) once nothing is claimable and no command runs.")
    @click.option("--create", is_flag=True, help="Create the queue if it is missing (a worker that starts first).")
    @click.option("--then", "then", type=click.Path(path_type=str),
                  help="Each line CMD prints becomes a job in this queue, atomically with the ack.")
    @click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
    def work(
        path: str, group: str, concurrency: int, lease: float, max_attempts: int, drain: bool, create: bool,
        then: str | None, command: tuple[str, ...],
    ) -> None:
        """Run CMD once per job of the queue at PATH: a durable xargs.

        The job's data goes to CMD's stdin; SEGQ_JOB_ID and SEGQ_ATTEMPT are
        in its environment.  Exit status 0 acks the job; any other nacks it
        with the last line of CMD's stderr as the reason (after
        --max-attempts it goes to the dead-letter queue); a command still
        running when its lease is about to end is killed and nacked.  With
        --then QUEUE each line CMD prints becomes a job in QUEUE, atomically
        with the ack.  SIGTERM or Ctrl-C stops claiming, waits for the
        running commands and gives back the rest (exit 128+N on signal N).
        With --drain it exits once the queue has nothing to claim.  A
        progress line shows on a terminal.

        Example: segq work photos -j 4 --then uploads -- ./resize.sh
        """
        from .worker import serve

        if command and command[0] == "--":
            command = command[1:]
        _check_command(command)
        tally = _Tally(show=sys.stderr.isatty())
        handler = _RunCommand(command, then, lease, tally)
        try:
            with library_warnings():
                signum = serve(
                    path,
                    handler,
                    group=group,
                    concurrency=concurrency,
                    lease=lease,
                    max_attempts=max_attempts,
                    stop=None,
                    dead_letter=None,
                    sync="never",
                    drain=drain,
                    create=create,
                )
        finally:
            tally.close()
        if signum is not None:
            raise SystemExit(128 + signum)

