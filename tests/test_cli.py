"""The segq command through click's CliRunner: every command and option, exit codes, one-line errors."""

from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys

import pytest

from _harness import drain

import segq
from segq._format import HEADER_SIZE, SEGMENT_HEADER_SIZE
from segq._segment import list_segments, segment_path
from segq.cli import cli

from _cli import fails, ok, run

ROOT = pathlib.Path(__file__).resolve().parent.parent
SMALL = "8K"


def killed_receiver(queue: pathlib.Path) -> int:
    code = f"import segq; r = segq.Receiver({str(queue)!r}); print('ready', flush=True); import time; time.sleep(60)"
    child = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, env=dict(os.environ, PYTHONPATH=str(ROOT))
    )
    assert child.stdout is not None and child.stdout.readline() == b"ready\n"
    child.send_signal(signal.SIGKILL)
    child.wait()
    child.stdout.close()
    return child.pid


# -- send ------------------------------------------------------------------------------


def test_send_makes_one_record_per_line_and_keeps_a_last_unterminated_line(queue_dir: pathlib.Path) -> None:
    ok("send", queue_dir, "--lines", "--segment-size", SMALL, input=b"one\n\ntwo\r\nthree")
    assert drain(queue_dir) == [b"one", b"", b"two\r", b"three"]
    assert ok("send", queue_dir, input=b"").stdout == ""  # no input, no record, no output
    assert drain(queue_dir) == []


def test_send_null_and_raw_framing(queue_dir: pathlib.Path) -> None:
    ok("send", queue_dir, "--null", "--segment-size", SMALL, input=b"a\nb\0c\0")
    ok("send", queue_dir, "--raw", input=b"whole\ninput\0here")
    ok("send", queue_dir, "--raw", input=b"")
    assert drain(queue_dir) == [b"a\nb", b"c", b"whole\ninput\0here", b""]


def test_send_many_lines_crosses_segments_in_order(queue_dir: pathlib.Path) -> None:
    lines = [b"%d" % number * (number % 30) for number in range(5000)]
    ok("send", queue_dir, "--segment-size", "4096", "--sync", "always", input=b"\n".join(lines) + b"\n")
    assert len(list_segments(queue_dir)) > 10
    assert drain(queue_dir) == lines


def test_send_sync_interval_and_size_units(queue_dir: pathlib.Path) -> None:
    ok("send", queue_dir, "--sync", "0.05", "--segment-size", "1MiB", input="x\n")
    assert os.path.getsize(segment_path(queue_dir, 0)) == 1 << 20
    other = queue_dir.parent / "small"
    ok("send", other, "--segment-size", "4K", input="x\n")
    ok("send", other, input=(b"y" * 100 + b"\n") * 100)  # new segments take the queue's size
    assert {os.path.getsize(segment_path(other, number)) for number in list_segments(other)} == {4096}
    assert len(list_segments(other)) > 2
    assert "Invalid value for '--sync'" in fails("send", queue_dir, "--sync", "sometimes", code=2)
    assert "Invalid value for '--sync'" in fails("send", queue_dir, "--sync", "0", code=2)
    assert "not a size" in fails("send", queue_dir, "--segment-size", "12 parsecs", code=2)


def test_a_record_too_large_is_one_error_line_and_earlier_records_stay(queue_dir: pathlib.Path) -> None:
    error = fails("send", queue_dir, "--segment-size", "4096", input=b"small\n" + b"x" * 5000 + b"\nnever\n")
    assert "max_record_size" in error
    assert drain(queue_dir) == [b"small"]


# -- recv ------------------------------------------------------------------------------


def test_recv_prints_and_commits_what_is_there_then_stops(queue_dir: pathlib.Path) -> None:
    ok("send", queue_dir, "--segment-size", SMALL, input=b"1\n2\n3\n4\n5\n")
    assert ok("recv", queue_dir, "-n", 2).stdout == "1\n2\n"
    assert ok("recv", queue_dir, "--count", 1, "--lines").stdout == "3\n"
    assert ok("recv", queue_dir).stdout == "4\n5\n"
    assert ok("recv", queue_dir).stdout == ""
    assert ok("recv", queue_dir, "--name", "audit", "--null").stdout == "1\x002\x003\x004\x005\x00"
    assert ok("recv", queue_dir, "--name", "other", "--raw", "-n", 2).stdout == "12"


def test_recv_follow_waits_until_count_or_timeout(queue_dir: pathlib.Path) -> None:
    ok("send", queue_dir, "--segment-size", SMALL, input=b"a\nb\n")
    assert ok("recv", queue_dir, "--follow", "-n", 2).stdout == "a\nb\n"
    assert ok("recv", queue_dir, "-f", "--timeout", "0.05").stdout == ""
    assert ok("recv", queue_dir, "--timeout", "0.05").stdout == ""


def test_recv_refuses_a_missing_queue_unless_told_to_create_it(tmp_path: pathlib.Path) -> None:
    assert "no queue at" in fails("recv", tmp_path / "missing")
    assert "--create" in fails("recv", tmp_path / "typo", "--follow", "--timeout", "0.01")
    assert not (tmp_path / "missing").exists() and not (tmp_path / "typo").exists()
    assert ok("recv", tmp_path / "later", "--follow", "--create", "--timeout", "0.01").stdout == ""
    segments = sorted((tmp_path / "later").glob("*.seg"))
    assert len(segments) == 1 and segments[0].stat().st_size <= 1 << 20  # no 64 MiB preallocated


def test_recv_names_the_live_holder_of_its_name(queue_dir: pathlib.Path) -> None:
    ok("send", queue_dir, input=b"x\n")
    with segq.Receiver(queue_dir):
        assert f"PID {os.getpid()}" in fails("recv", queue_dir)


# -- info and verify -------------------------------------------------------------------


def test_info_text_and_json(queue_dir: pathlib.Path) -> None:
    ok("send", queue_dir, "--segment-size", "4096", input=b"".join(b"%03d\n" % n for n in range(400)))
    ok("recv", queue_dir, "-n", 10)
    pid = killed_receiver(queue_dir)
    text = ok("info", queue_dir, "--scan").stdout
    assert "(format 2)" in text
    assert "receiver   default at segment 0" in text and "390 records" in text
    assert f"PID {pid} (dead" in text
    data = json.loads(ok("info", queue_dir, "--json", "--scan").stdout)
    assert data["format_version"] == 2 and data["records"] == 400
    assert data["consumers"][0]["backlog_records"] == 390
    assert data["locks"] == [
        {
            "path": str(queue_dir / "cursors" / "r.default.lock"),
            "what": "receiver 'default'",
            "pid": pid,
            "alive": False,
        }
    ]
    assert [segment["number"] for segment in data["segments"]] == list_segments(queue_dir)
    ok("unlock", queue_dir)  # inspection left the killed receiver's lock and semaphore: clean them up


def test_info_shows_an_unreadable_cursor_and_an_empty_queue(queue_dir: pathlib.Path) -> None:
    ok("send", queue_dir, input=b"")
    assert "none registered" in ok("info", queue_dir).stdout
    ok("recv", queue_dir)
    (queue_dir / "cursors" / "r.default.pos").write_bytes(bytes(1024))
    assert "metadata unreadable" in ok("info", queue_dir).stdout


def test_verify_is_quiet_in_a_pipe_and_fails_on_damage(queue_dir: pathlib.Path) -> None:
    ok("send", queue_dir, "--segment-size", "4096", input=b"".join(b"%03d\n" % n for n in range(400)))
    result = ok("verify", queue_dir)
    assert result.stdout.startswith(f"verified {queue_dir}: ") and "400 records" in result.stdout
    assert result.stderr == ""  # no progress bar outside a terminal
    damaged = segment_path(queue_dir, 1)
    with open(damaged, "r+b") as segment:
        segment.seek(SEGMENT_HEADER_SIZE + HEADER_SIZE + 1)
        segment.write(b"!")
    result = run("verify", queue_dir)
    assert result.exit_code == 1
    assert f"damaged  000000000001.seg offset {SEGMENT_HEADER_SIZE}: checksum mismatch" in result.stdout
    assert result.stderr.startswith("Error: 1 damaged span in ")
    result = run("verify", queue_dir, "--json")
    assert result.exit_code == 1
    report = json.loads(result.stdout)
    assert report["ok"] is False and report["damaged"][0]["path"] == damaged


def test_verify_lists_a_torn_tail_without_failing(queue_dir: pathlib.Path) -> None:
    ok("send", queue_dir, input=b"a\n")
    with open(segment_path(queue_dir, 0), "r+b") as segment:
        segment.seek(SEGMENT_HEADER_SIZE + HEADER_SIZE + 1 + HEADER_SIZE)
        segment.write(b"half")
    assert "an unfinished write" in ok("verify", queue_dir).stdout


# -- recover, unlock, clear ---------------------------------------------------------------


def test_recover_text_json_dry_run_and_loss(queue_dir: pathlib.Path) -> None:
    ok("send", queue_dir, "--segment-size", "4096", input=b"".join(b"%03d\n" % n for n in range(1000)))
    ok("recv", queue_dir, "-n", 3)
    pid = killed_receiver(queue_dir)
    first_segment = json.loads(ok("info", queue_dir, "--json", "--scan").stdout)["segments"][0]["records"]
    text = ok("recover", queue_dir, "--dry-run").stdout
    assert "dry run, nothing changed" in text and f"dead PID {pid}" in text
    assert (queue_dir / "cursors" / "r.default.lock").exists()
    text = ok("recover", queue_dir).stdout
    assert "unlocked   cursors/r.default.lock" in text
    assert f"receiver   'default' starts at segment 0 offset {SEGMENT_HEADER_SIZE + 3 * 11} (unchanged)" in text
    assert "nothing needed repair" in ok("recover", queue_dir).stdout
    with open(segment_path(queue_dir, 0), "r+b") as segment:
        segment.seek(SEGMENT_HEADER_SIZE + 3 * 11 + HEADER_SIZE)
        segment.write(b"!")
    report = json.loads(ok("recover", queue_dir, "--json").stdout)
    assert report["strategy"] == "replay" and report["changed"] is False
    assert "will stop at" in report["notes"][0]
    report = json.loads(ok("recover", queue_dir, "--loss", "--json").stdout)
    assert report["receivers"] == {"default": {"segment": 1, "offset": SEGMENT_HEADER_SIZE}}
    assert report["dropped_records"] == first_segment - 3
    assert report["deleted_segments"] == [0]
    text = ok("recover", queue_dir, "--loss", "--name", "default").stdout
    assert "dropped    0 records" in text


def test_recv_stops_right_at_damage_and_recover_loss_moves_it_past(queue_dir: pathlib.Path) -> None:
    ok("send", queue_dir, "--segment-size", "4K", input=b"".join(b"%d\n" % n for n in range(1000)))
    numbers_in = json.loads(ok("info", queue_dir, "--json", "--scan").stdout)["segments"][0]["records"]
    with open(segment_path(queue_dir, 1), "r+b") as segment:  # a payload byte of segment 1's 6th record
        segment.seek(SEGMENT_HEADER_SIZE + 5 * (HEADER_SIZE + 3) + HEADER_SIZE)
        segment.write(b"?")
    result = run("recv", queue_dir)
    assert result.exit_code == 1 and "record checksum mismatch" in result.stderr
    assert result.stdout.splitlines()[-1] == str(numbers_in + 4)  # every record before the damage came out
    assert run("recv", queue_dir).stdout == ""  # and was committed: the next run stops at once
    report = json.loads(ok("recover", queue_dir, "--loss", "--json").stdout)
    assert report["receivers"]["default"] == {"segment": 2, "offset": SEGMENT_HEADER_SIZE}
    rest = ok("recv", queue_dir).stdout.split()
    assert rest[-1] == "999" and int(rest[0]) == numbers_in + 5 + report["dropped_records"]


def test_recover_of_an_unknown_name_says_so(queue_dir: pathlib.Path) -> None:
    ok("send", queue_dir, input=b"a\n")
    ok("recv", queue_dir, "--name", "worker")
    assert (
        "no receiver named 'ghost' is registered (registered: worker)"
        in ok("recover", queue_dir, "--name", "ghost").stdout
    )
    assert "bad receiver name" in fails("recover", queue_dir, "--name", "../etc", code=2)


def test_unlock_removes_dead_locks_and_names_live_holders(queue_dir: pathlib.Path) -> None:
    ok("send", queue_dir, input=b"a\n")
    assert ok("unlock", queue_dir).stdout == f"no stale lock files in {queue_dir}\n"
    pid = killed_receiver(queue_dir)
    assert ok("unlock", queue_dir).stdout == f"removed cursors/r.default.lock (receiver 'default', dead PID {pid})\n"
    with segq.Sender(queue_dir):
        assert f"locked by live PID {os.getpid()} (sender)" in fails("unlock", queue_dir)


def test_clear_drops_everything_and_refuses_a_live_receiver(queue_dir: pathlib.Path) -> None:
    ok("send", queue_dir, "--segment-size", "4096", input=b"".join(b"%03d\n" % n for n in range(1000)))
    ok("recv", queue_dir, "-n", 1)
    with segq.Receiver(queue_dir):
        assert f"PID {os.getpid()}" in fails("clear", queue_dir)
    text = ok("clear", queue_dir, "--yes").stdout
    assert text.startswith(f"cleared {queue_dir}: dropped 999 records; 'default' now at segment ")
    assert "deleted segments 0, 1, 2" in text
    assert ok("recv", queue_dir).stdout == ""


# -- errors, help, demo ---------------------------------------------------------------------


@pytest.mark.parametrize("command", ["info", "verify", "recover", "unlock", "clear"])
def test_a_missing_queue_is_one_error_line(tmp_path: pathlib.Path, command: str) -> None:
    assert (
        fails(command, tmp_path / "nowhere")
        == f"Error: no queue at {tmp_path / 'nowhere'}: the directory does not exist"
    )


def test_a_damaged_queue_is_one_error_line_not_a_traceback(queue_dir: pathlib.Path) -> None:
    ok("send", queue_dir, input=b"a\n")
    (queue_dir / "cursors").mkdir()
    (queue_dir / "cursors" / "r.default.pos").write_bytes(b"garbage")
    assert "r.default.pos offset 0: cursor file is 7 bytes" in fails("recv", queue_dir)


def test_usage_errors_exit_2(queue_dir: pathlib.Path) -> None:
    fails("recv", code=2)
    fails("recv", queue_dir, "-n", "0", code=2)
    fails("recover", queue_dir, "--bogus", code=2)
    fails("no-such-command", code=2)


def test_every_command_has_help_for_every_option() -> None:
    assert ok("--version").stdout == f"segq {segq.__version__}\n"
    for name, command in cli.commands.items():
        text = ok(name, "--help").stdout
        assert command.help and text.startswith(f"Usage: cli {name}") or text.startswith(f"Usage: segq {name}")
        for option in command.params:
            if isinstance(option, segq.cli.click.Option):
                assert option.help, f"segq {name} {option.opts} has no help"


def test_demo_runs_and_accounts_for_every_record() -> None:
    result = ok("demo", "--records", 3000, "--keep")
    lines = result.stdout.splitlines()
    assert "SIGKILLed after" in result.stdout and "restarted" in result.stdout
    summary = next(line for line in lines if line.startswith("sent "))
    assert summary.startswith("sent 3,000  received 3,000  replayed ") and "lost 0" in summary
    kept = pathlib.Path(lines[-1].removeprefix("kept "))
    assert (kept / "queue").is_dir()
    import shutil

    shutil.rmtree(kept)


def test_requeue_dead_and_recover_cover_work_queue_groups(queue_dir: pathlib.Path) -> None:
    with segq.Sender(queue_dir, segment_size=8192) as tx:
        tx.send(b"poison")
    with segq.WorkQueue(queue_dir, "workers", max_attempts=1) as wq:
        wq.claim(timeout=5).nack(reason="bad input")  # the last attempt: dead-lettered
        with pytest.raises(segq.Empty):
            wq.claim(timeout=0)

    result = run("recover", queue_dir, "--json")
    assert result.exit_code == 0, result.output
    assert [group["group"] for group in json.loads(result.output)["groups"]] == ["workers"]

    result = run("requeue-dead", queue_dir, "--group", "workers", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.output) == {"group": "workers", "requeued": 1}
    with segq.WorkQueue(queue_dir, "workers", max_attempts=1) as wq:
        job = wq.claim(timeout=5)
        assert job.data == b"poison" and job.attempt == 1
        job.ack()
