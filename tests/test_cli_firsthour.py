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
from collections.abc import Iterator

import pytest
from click.testing import CliRunner

import segq
from segq._format import SEGMENT_HEADER_SIZE
from segq._state import cursor_path, read_position
from segq._segment import list_segments
from segq.cli import cli

from _cli import fails, ok

ROOT = pathlib.Path(__file__).resolve().parent.parent
ENV = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
SEGQ = f"{shlex.quote(sys.executable)} -m segq"


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


# -- consumers: list and remove ---------------------------------------------------------------


def test_receivers_lists_lag_and_remove_receiver_frees_the_segments_a_typo_pinned(queue_dir: pathlib.Path) -> None:
    with segq.Sender(queue_dir, segment_size=4096) as sender:
        sender.send_batch([b"%03d" % number for number in range(100)])
        sender.send_batch([b"%03d" % number for number in range(100, 400)])
    ok("recv", queue_dir, "--name", "wroker", "-n", 1)  # a typo: it pins every segment
    ok("recv", queue_dir, "--name", "worker")
    rows = json.loads(ok("receivers", queue_dir, "--json").stdout)
    assert [(row["name"], row["holder"]) for row in rows] == [("worker", None), ("wroker", None)]
    assert rows[0]["lag_bytes"] == 0 and rows[1]["lag_bytes"] == 399 * (8 + 3)
    text = ok("receivers", queue_dir).stdout
    assert "wroker: at segment 0 offset" in text and "not open" in text
    assert len(segq._segment.list_segments(queue_dir)) > 1

    assert "has no receiver 'nobody' (its receivers: worker, wroker)" in fails("remove-receiver", queue_dir, "nobody")
    with segq.Receiver(queue_dir, "wroker"):
        assert f"PID {os.getpid()}" in fails("remove-receiver", queue_dir, "wroker")
    text = ok("remove-receiver", queue_dir, "wroker").stdout
    assert text.startswith(f"removed receiver 'wroker' from {queue_dir}\ndeleted segments 0")
    assert [row["name"] for row in json.loads(ok("receivers", queue_dir, "--json").stdout)] == ["worker"]
    assert segq._segment.list_segments(queue_dir) == [segq._segment.list_segments(queue_dir)[-1]]
    assert "bad receiver name" in fails("remove-receiver", queue_dir, "../x", code=2)


def test_groups_lists_work_queue_groups_and_remove_group_unregisters_one(queue_dir: pathlib.Path) -> None:
    with segq.Sender(queue_dir, segment_size=4096) as sender:
        sender.send_batch([b"job-%d" % number for number in range(3)])
    with segq.WorkQueue(queue_dir, "resize", max_attempts=1) as work:
        work.claim(timeout=5).nack(reason="bad input")  # dead-lettered
        work.claim(timeout=5).ack()
    assert ok("groups", queue_dir).stdout.startswith(
        "resize: 0 claims in flight, 0 waiting to retry, 1 dead letter pending, "
    )
    rows = json.loads(ok("groups", queue_dir, "--json").stdout)
    assert [(row["group"], row["dead_letters_pending"], row["open"]) for row in rows] == [("resize", 1, False)]
    assert rows[0]["lag_bytes"] > 0  # the third job is not claimed yet
    assert "has no work-queue group 'thumbs' (its groups: resize)" in fails("remove-group", queue_dir, "thumbs")
    with segq.WorkQueue(queue_dir, "resize"):
        assert "open in a live process" in fails("remove-group", queue_dir, "resize")
    assert ok("remove-group", queue_dir, "resize").stdout.startswith(f"removed group 'resize' from {queue_dir}")
    assert ok("groups", queue_dir).stdout == f"no work-queue groups in {queue_dir}\n"
    assert ok("clear", queue_dir, "--yes").stdout.startswith(f"cleared {queue_dir}")  # clear no longer refuses


def test_clear_names_the_cli_command_that_removes_a_group(queue_dir: pathlib.Path) -> None:
    with segq.Sender(queue_dir, segment_size=4096), segq.WorkQueue(queue_dir, "resize"):
        pass
    assert f"segq remove-group {queue_dir} GROUP" in fails("clear", queue_dir, "--yes")


# -- exit codes and wording ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "arguments",
    [
        ["send", "{q}", "--segment-size", "10"],
        ["send", "{q}", "--segment-size", "5G"],
        ["send", "{q}", "--sync", "0"],
        ["send", "{q}", "--sync", "nan"],
        ["send", "{q}", "--sync", "inf"],
        ["recv", "{q}", "--name", "a/b"],
        ["recv", "{q}", "-n", "0"],
        ["recv", "{q}", "--batch", "0"],
        ["recover", "{q}", "--name", ".hidden"],
        ["requeue-dead", "{q}", "--group", ""],
        ["remove-receiver", "{q}"],
    ],
)
def test_bad_usage_exits_2_everywhere(queue_dir: pathlib.Path, arguments: list[str]) -> None:
    ok("send", queue_dir, input=b"x\n")
    fails(*[argument.format(q=queue_dir) for argument in arguments], input=b"y\n", code=2)
    assert ok("recv", queue_dir).stdout == "x\n"  # nothing was done


def test_a_very_long_bad_name_is_shown_once_and_truncated(queue_dir: pathlib.Path) -> None:
    ok("send", queue_dir, input=b"x\n")
    line = fails("recv", queue_dir, "--name", "x" * 10_000, code=2)
    assert "(10,000 characters)" in line and len(line) < 300 and line.count("xxxxxxxxxx") == 4


def test_requeue_dead_on_a_missing_queue_or_unknown_group_is_an_error(queue_dir: pathlib.Path) -> None:
    assert "no queue at" in fails("requeue-dead", queue_dir)
    ok("send", queue_dir, input=b"x\n")
    assert f"{queue_dir} has no work-queue group 'default' (it has none)" in fails("requeue-dead", queue_dir)
    assert "no dead-letter queue at" in fails("requeue-dead", queue_dir, "--dead-letter", queue_dir / "nope")


def test_send_refuses_a_directory_that_holds_other_things(tmp_path: pathlib.Path) -> None:
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "segq.ctl").write_bytes(b"not ours")
    assert "is not a segq queue and not empty (1 file, e.g. 'segq.ctl')" in fails("send", foreign, input=b"x\n")
    assert (foreign / "segq.ctl").read_bytes() == b"not ours" and os.listdir(foreign) == ["segq.ctl"]
    empty = tmp_path / "empty"
    empty.mkdir()
    ok("send", empty, input=b"x\n")
    ok("send", empty, input=b"y\n")  # a queue now: sending again is fine
    assert ok("recv", empty).stdout == "x\ny\n"


def test_counts_are_pluralised(queue_dir: pathlib.Path) -> None:
    ok("send", queue_dir, input=b"x\n")
    assert "1 segment, " in ok("info", queue_dir).stdout
    assert "1 record (" in ok("info", queue_dir, "--scan").stdout
    assert ": 1 segment, 1 record, " in ok("verify", queue_dir).stdout
    assert ok("clear", queue_dir, "--yes").stdout.startswith(f"cleared {queue_dir}: dropped 1 record\n")


def test_info_reads_no_record_unless_asked_to_scan(queue_dir: pathlib.Path) -> None:
    with segq.Sender(queue_dir, segment_size=4096) as sender:
        sender.send_batch([b"%03d" % number for number in range(300)])
    ok("recv", queue_dir, "-n", 10)
    summary = json.loads(ok("info", queue_dir, "--json").stdout)
    scanned = json.loads(ok("info", queue_dir, "--json", "--scan").stdout)
    assert summary["scanned"] is False and scanned["scanned"] is True
    assert summary["records"] is None and scanned["records"] == 300
    assert [segment["bytes"] for segment in summary["segments"]] == [segment["bytes"] for segment in scanned["segments"]]
    assert summary["consumers"][0]["backlog_bytes"] == scanned["consumers"][0]["backlog_bytes"] == 290 * 11
    assert summary["consumers"][0]["backlog_records"] is None and scanned["consumers"][0]["backlog_records"] == 290
    # A damaged record is not even looked at by the summary (it reads none); --scan finds it.
    with open(segq._segment.segment_path(queue_dir, 0), "r+b") as segment:
        segment.seek(SEGMENT_HEADER_SIZE + 20 * 11 + 8)
        segment.write(b"?")
    assert json.loads(ok("info", queue_dir, "--json").stdout)["segments"] == summary["segments"]


# -- small queues, a small disk, a read-only user ------------------------------------------------


def test_a_tiny_queue_and_its_dead_letters_take_one_small_segment_each(queue_dir: pathlib.Path) -> None:
    with segq.Sender(queue_dir) as sender:  # the default segment_size: 64 MiB
        sender.send_batch([b"a", b"b", b"c"])
    with segq.WorkQueue(queue_dir, max_attempts=1) as work:
        for _ in range(3):
            work.claim(timeout=5).nack(reason="poison")
    dead = queue_dir / "dead" / "default"
    sizes = [os.path.getsize(segq._segment.segment_path(path, 0)) for path in (queue_dir, dead)]
    assert sizes == [segq._segment.FIRST_SEGMENT_SIZE] * 2
    with segq.Receiver(dead) as receiver:
        assert [segq.DeadLetter.decode(message.data).data for message in receiver.recv_batch(3, timeout=5)] == [
            b"a",
            b"b",
            b"c",
        ]


def test_segments_double_up_to_segment_size_and_backpressure_counts_their_real_sizes(
    queue_dir: pathlib.Path,
) -> None:
    first = segq._segment.FIRST_SEGMENT_SIZE
    record = b"x" * (64 << 10)
    with segq.Sender(queue_dir, segment_size=4 * first, max_queue_bytes=5 * first) as sender:
        for _ in range(70):  # about 4.4 MiB: more than 1 + 2 MiB, under max_queue_bytes
            sender.send(record, timeout=0)
    sizes = [os.path.getsize(segq._segment.segment_path(queue_dir, number)) for number in list_segments(queue_dir)]
    assert sizes == [first, 2 * first, 4 * first]
    assert segq._segment.next_segment_size(4 * first, 4 * first) == 4 * first  # the cap holds
    assert segq._segment.next_segment_size(None, 4096) == 4096  # a small segment_size is used as is
    assert segq._segment.next_segment_size(None, first, needed=3 * first) > 3 * first  # a batch always fits


@pytest.fixture
def small_filesystem(tmp_path: pathlib.Path) -> Iterator[pathlib.Path]:
    """Mount a 512 KiB tmpfs (root only)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small filesystem needs root")
    mount_point = tmp_path / "small"
    mount_point.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(mount_point)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", str(mount_point)], check=True)


def test_a_full_disk_says_which_segment_size_would_fit(small_filesystem: pathlib.Path) -> None:
    queue = small_filesystem / "q"
    line = fails("send", queue, input=b"x\n")
    assert "the disk is full: a 1 MiB segment does not fit in the " in line
    suggested = line.split("`segq send --segment-size ")[1].split("`")[0]
    ok("send", queue, "--segment-size", suggested, input=b"x\n")
    assert ok("recv", queue).stdout == "x\n"


@pytest.fixture
def reader_only_user() -> Iterator[tuple[int, int]]:
    """Create a Unix user for the test (root only); yield its (uid, gid); delete it after."""
    if os.geteuid() != 0:
        pytest.skip("root ignores permissions, and only root can create a second user to test them")
    name = f"segqro{os.getpid() % 100000}"
    created = subprocess.run(["useradd", "--no-create-home", "--shell", "/bin/false", name], capture_output=True)
    if created.returncode != 0:
        pytest.skip(f"cannot create a user here: {created.stderr.decode().strip()}")
    try:
        import pwd

        entry = pwd.getpwnam(name)
        yield entry.pw_uid, entry.pw_gid
    finally:
        subprocess.run(["userdel", name], check=True)


def _run_as(uid: int, gid: int, commands: list[list[str]]) -> list[tuple[int, str]]:
    """Run CLI commands in a forked child that has become ``uid`` (the interpreter is already loaded)."""
    for command in commands:  # warm every import: the child may not be able to read the interpreter's files
        CliRunner().invoke(cli, command)
    reading, writing = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - runs in the child
        try:
            os.close(reading)
            os.setgroups([])
            os.setgid(gid)
            os.setuid(uid)
            results: list[tuple[int, str]] = []
            for command in commands:
                result = CliRunner().invoke(cli, command)
                results.append((result.exit_code, result.output))
            os.write(writing, json.dumps(results).encode())
        finally:
            os._exit(0)
    os.close(writing)
    with os.fdopen(reading, "rb") as pipe:
        data = pipe.read()
    os.waitpid(child, 0)
    return [tuple(result) for result in json.loads(data)]  # type: ignore[misc]


def test_a_user_who_may_only_read_the_queue_can_inspect_it(reader_only_user: tuple[int, int]) -> None:
    import shutil
    import tempfile

    parent = tempfile.mkdtemp(prefix="segq-read-only-")
    try:
        os.chmod(parent, 0o755)
        queue = os.path.join(parent, "q")
        send_numbers(pathlib.Path(queue), 100)
        ok("recv", queue, "-n", 3)
        for root, directories, files in os.walk(queue):
            for entry in directories:
                os.chmod(os.path.join(root, entry), 0o755)
            for entry in files:
                os.chmod(os.path.join(root, entry), 0o644)
        results = _run_as(*reader_only_user, [["info", queue], ["info", queue, "--scan"], ["verify", queue], ["receivers", queue]])
        assert [code for code, _ in results] == [0, 0, 0, 0], results
        assert "receiver   default at segment 0" in results[0][1]
        assert "97 records" in results[1][1]
        assert ", 100 records, " in results[2][1]
        assert "default: at segment 0" in results[3][1]
        # Nothing was written: the reader could not have, and did not try.
        assert ok("recv", queue, "-n", 1).stdout == "4\n"
    finally:
        shutil.rmtree(parent)


def test_a_taken_over_dead_receivers_lock_is_logged_at_warning(
    queue_dir: pathlib.Path, caplog: pytest.LogCaptureFixture
) -> None:
    send_numbers(queue_dir, 1)
    code = f"import segq, os; r = segq.Receiver({str(queue_dir)!r}); print(flush=True); os.kill(os.getpid(), 9)"
    subprocess.run([sys.executable, "-c", code], env=ENV, capture_output=True, timeout=60)
    dead = int((queue_dir / "cursors" / "r.default.lock").read_text().split()[0])
    with caplog.at_level("WARNING", logger="segq"):
        with segq.Receiver(queue_dir):
            pass
    assert f"receiver 'default' was held by PID {dead}, which is dead; taken over" in caplog.text
    assert [record.levelname for record in caplog.records if "taken over" in record.message] == ["WARNING"]
    # The CLI shows it too, as one "segq: ..." line on stderr.
    subprocess.run([sys.executable, "-c", code], env=ENV, capture_output=True, timeout=60)
    shown = subprocess.run([sys.executable, "-m", "segq", "recv", str(queue_dir)], env=ENV, capture_output=True)
    assert shown.returncode == 0 and b"which is dead; taken over" in shown.stderr and shown.stdout == b"1\n"


def _stderr_of(command: list[str], *, terminal: bool) -> bytes:
    """Run segq with stderr on a pseudo-terminal or a pipe; return what it wrote there."""
    import pty

    if not terminal:
        return subprocess.run(command, env=ENV, capture_output=True, timeout=60, check=True).stderr
    controller, terminal_end = pty.openpty()
    child = subprocess.Popen(command, env=ENV, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=terminal_end)
    os.close(terminal_end)
    shown = b""
    while True:
        try:
            chunk = os.read(controller, 1 << 16)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        shown += chunk
    os.close(controller)
    assert child.wait(timeout=60) == 0
    assert child.stdout is not None
    child.stdout.close()
    return shown


def test_clear_shows_progress_on_a_terminal_and_is_quiet_in_a_pipe(queue_dir: pathlib.Path) -> None:
    for terminal in (True, False):
        with segq.Sender(queue_dir, segment_size=1 << 16) as sender:
            for _ in range(30):
                sender.send_batch([b"r" * 100] * 100)
        ok("recv", queue_dir, "-n", 1)
        shown = _stderr_of([sys.executable, "-m", "segq", "clear", "--yes", str(queue_dir)], terminal=terminal)
        assert (b"clearing" in shown and b"100%" in shown) if terminal else shown == b""
