"""The public contract (API.md) as a user copying its examples meets it: names, signatures, edge cases."""

from __future__ import annotations

import importlib
import inspect
import pathlib
import queue
import subprocess
import sys
from typing import Callable

import pytest

import segq

_ANY = object()  # a default the contract leaves open ("segment_size=...")

# Where API.md says each public name lives.
PUBLIC_NAMES = {
    "segq": [
        "Sender", "Receiver", "Message", "Batch", "Position", "WorkQueue", "Job", "JobBatch",
        "Enqueue", "Enqueued", "GroupStats", "run_worker", "arun_worker", "AsyncSender", "AsyncReceiver",
        "AsyncWorkQueue", "recovery", "SegqError", "Empty", "Full", "Locked", "RecordTooLarge",
        "CorruptionError", "UsageError", "Closed", "ClaimLost", "DuplicateJobId",
    ],
    "segq.recovery": [
        "unlock", "unlock_for_sending", "unlock_for_receiving", "unlock_queue", "guess_recv_metadata",
        "guess_recv_metadata_with_loss", "recover", "recover_with_loss",
    ],
    "segq.nats": ["forward", "pull"],
}  # fmt: skip

P = inspect.Parameter
POS, KW = P.POSITIONAL_OR_KEYWORD, P.KEYWORD_ONLY

# (callable, [(parameter, kind, default)]) as API.md writes them; more
# parameters with defaults are the implementers' call.
SIGNATURES: dict[str, list[tuple[str, inspect._ParameterKind, object]]] = {
    "Sender": [("path", POS, P.empty), ("segment_size", KW, _ANY), ("max_record_size", KW, _ANY),
               ("sync", KW, "never"), ("max_queue_bytes", KW, None)],
    "Sender.send": [("self", POS, P.empty), ("data", POS, P.empty), ("timeout", POS, None)],
    "Sender.send_batch": [("self", POS, P.empty), ("records", POS, P.empty)],
    "Sender.flush": [("self", POS, P.empty)],
    "Sender.sync": [("self", POS, P.empty)],
    "Sender.close": [("self", POS, P.empty)],
    "Sender.enqueue": [("self", POS, P.empty), ("data", POS, P.empty), ("run_at", KW, None), ("delay", KW, None),
                       ("priority", KW, 0), ("dedup_key", KW, None), ("job_id", KW, None), ("headers", KW, None)],
    "Receiver": [("path", POS, P.empty), ("name", POS, "default")],
    "Receiver.recv": [("self", POS, P.empty), ("timeout", POS, None)],
    "Receiver.try_recv": [("self", POS, P.empty)],
    "Receiver.recv_batch": [("self", POS, P.empty), ("max_count", POS, P.empty), ("timeout", POS, None)],
    "Receiver.remove": [("path", POS, P.empty), ("name", POS, P.empty)],
    "Receiver.close": [("self", POS, P.empty)],
    "Message.commit": [("self", POS, P.empty)],
    "Message.rollback": [("self", POS, P.empty)],
    "Batch.commit": [("self", POS, P.empty)],
    "WorkQueue": [("path", POS, P.empty), ("group", POS, "default"), ("lease", KW, 30.0), ("max_attempts", KW, 5),
                  ("dead_letter", KW, None)],
    "WorkQueue.claim": [("self", POS, P.empty), ("timeout", POS, None)],
    "WorkQueue.claim_batch": [("self", POS, P.empty), ("max_count", POS, P.empty), ("timeout", POS, None)],
    "WorkQueue.stats": [("self", POS, P.empty)],
    "Job.ack": [("self", POS, P.empty), ("enqueue", POS, _ANY)],
    "Job.nack": [("self", POS, P.empty), ("delay", POS, 0.0), ("reason", POS, None)],
    "Job.renew": [("self", POS, P.empty), ("lease", POS, None)],
    "Enqueue": [("data", POS, P.empty), ("queue", POS, None), ("run_at", POS, None), ("delay", POS, None),
                ("priority", POS, 0), ("dedup_key", POS, None), ("job_id", POS, None), ("headers", POS, None)],
    "run_worker": [("path", POS, P.empty), ("handler", POS, P.empty), ("group", KW, "default"),
                   ("concurrency", KW, 1), ("lease", KW, 30.0), ("max_attempts", KW, 5), ("stop", KW, None)],
    "arun_worker": [("path", POS, P.empty), ("handler", POS, P.empty), ("group", KW, "default"),
                    ("concurrency", KW, 1), ("lease", KW, 30.0), ("max_attempts", KW, 5), ("stop", KW, None)],
    "AsyncSender": [("path", POS, P.empty)],
    "AsyncReceiver": [("path", POS, P.empty), ("name", POS, "default")],
    "AsyncReceiver.recv": [("self", POS, P.empty), ("timeout", POS, None)],
    "recovery.unlock": [("lock_path", POS, P.empty)],
    "recovery.unlock_for_sending": [("path", POS, P.empty)],
    "recovery.unlock_for_receiving": [("path", POS, P.empty), ("name", POS, "default")],
    "recovery.unlock_queue": [("path", POS, P.empty)],
    "recovery.guess_recv_metadata": [("path", POS, P.empty), ("name", POS, "default")],
    "recovery.guess_recv_metadata_with_loss": [("path", POS, P.empty), ("name", POS, "default")],
    "recovery.recover": [("path", POS, P.empty), ("name", POS, "default")],
    "recovery.recover_with_loss": [("path", POS, P.empty), ("name", POS, "default")],
    "nats.forward": [("path", POS, P.empty), ("servers", POS, P.empty), ("stream", KW, P.empty),
                     ("subject", KW, P.empty), ("name", KW, "forward"), ("stop", KW, None)],
    "nats.pull": [("servers", POS, P.empty), ("path", POS, P.empty), ("stream", KW, P.empty), ("consumer", KW, _ANY),
                  ("stop", KW, None)],
}  # fmt: skip


def _resolve(dotted: str) -> object:
    value: object = segq
    for part in dotted.split("."):
        value = getattr(value, part)
    return value


@pytest.mark.parametrize(("module", "name"), [(m, n) for m, names in PUBLIC_NAMES.items() for n in names])
def test_every_name_the_contract_lists_imports_from_where_it_says(module: str, name: str) -> None:
    namespace: dict[str, object] = {}
    exec(f"from {module} import {name}", namespace)
    assert namespace[name] is getattr(importlib.import_module(module), name)


@pytest.mark.parametrize("dotted", sorted(SIGNATURES))
def test_every_signature_has_the_parameters_the_contract_writes(dotted: str) -> None:
    parameters = inspect.signature(_resolve(dotted)).parameters  # type: ignore[arg-type]
    expected = SIGNATURES[dotted]
    positional = [name for name, kind, _ in expected if kind is POS]
    assert [p.name for p in parameters.values() if p.kind is POS][: len(positional)] == positional
    for name, kind, default in expected:
        assert name in parameters, f"{dotted} has no parameter {name!r}"
        assert parameters[name].kind is kind, f"{dotted}({name}) is {parameters[name].kind.description}"
        got = parameters[name].default
        assert default is _ANY or got == default, f"{dotted}({name}=...) defaults to {got!r}, not {default!r}"
    for extra in (p for p in parameters.values() if p.name not in {name for name, _, _ in expected}):
        # Anything more must not break a call written from the contract.
        assert extra.default is not P.empty or extra.kind in (P.VAR_POSITIONAL, P.VAR_KEYWORD), extra


def test_every_error_is_a_segq_error_and_empty_and_full_are_the_queue_modules_too() -> None:
    for name in ("Empty", "Full", "Locked", "RecordTooLarge", "CorruptionError", "UsageError", "Closed", "ClaimLost"):
        assert issubclass(getattr(segq, name), segq.SegqError)
    assert issubclass(segq.Empty, queue.Empty) and issubclass(segq.Full, queue.Full)


def test_group_stats_has_the_fields_the_contract_names() -> None:
    fields = ["pending", "scheduled", "claimed", "retrying", "done", "dead", "oldest_pending_age"]
    assert list(inspect.signature(segq.GroupStats).parameters) == fields


# -- a consumer does not create a queue -------------------------------------


def _foreign(tmp_path: pathlib.Path) -> pathlib.Path:
    """Return a directory of someone else's files: what a typo'd queue path often names."""
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "holiday.jpg").write_bytes(b"not a queue")
    return photos


@pytest.mark.parametrize("kind", ["Receiver", "WorkQueue", "AsyncReceiver", "AsyncWorkQueue"])
def test_a_consumer_on_a_directory_of_other_files_raises_and_writes_nothing_there(
    kind: str, tmp_path: pathlib.Path
) -> None:
    photos = _foreign(tmp_path)
    with pytest.raises(segq.SegqError, match="is not a segq queue") as caught:
        getattr(segq, kind)(photos)
    assert str(photos) in str(caught.value) and "create=True" in str(caught.value)
    assert [entry.name for entry in photos.iterdir()] == ["holiday.jpg"]


def test_create_true_still_makes_a_queue_in_a_directory_of_other_files(tmp_path: pathlib.Path) -> None:
    photos = _foreign(tmp_path)
    segq.Receiver(photos, create=True).close()
    with segq.Sender(photos, segment_size=1 << 16) as tx:
        tx.send(b"record")
    with segq.Receiver(photos) as rx:
        assert rx.recv(timeout=0).data == b"record"


def test_a_consumer_opens_an_empty_directory_a_sender_is_about_to_fill(tmp_path: pathlib.Path) -> None:
    segq.Receiver(tmp_path).close()  # a Sender makes the directory first, then its files
    with segq.Sender(tmp_path, segment_size=1 << 16) as tx:
        tx.send(b"record")
    with segq.Receiver(tmp_path) as rx:
        assert rx.recv(timeout=0).data == b"record"


def test_segq_recv_on_a_directory_of_other_files_exits_1_with_one_line(tmp_path: pathlib.Path) -> None:
    photos = _foreign(tmp_path)
    root = pathlib.Path(segq.__file__).parent.parent
    result = subprocess.run(
        [sys.executable, "-m", "segq", "recv", str(photos)],
        capture_output=True, text=True, env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"}, timeout=60,
    )  # fmt: skip
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.startswith("Error: ") and "is not a segq queue" in result.stderr
    assert result.stderr.count("\n") == 1
    assert [entry.name for entry in photos.iterdir()] == ["holiday.jpg"]


# -- unregistering: Receiver.remove ------------------------------------------


def test_receiver_remove_of_a_name_never_registered_changes_nothing_even_before_any_receiver(
    queue_dir: pathlib.Path,
) -> None:
    segq.Sender(queue_dir, segment_size=1 << 16).close()  # a queue nobody has received from yet
    segq.Receiver.remove(queue_dir, "never")
    segq.WorkQueue.remove(queue_dir, "never")
    assert not (queue_dir / "cursors").exists() and not (queue_dir / "groups").exists()
    segq.Receiver(queue_dir, "reader").close()
    segq.Receiver.remove(queue_dir, "never")  # with receivers registered: the same no-op
    segq.Receiver.remove(queue_dir, "reader")
    assert not (queue_dir / "cursors" / "r.reader.pos").exists()


def test_receiver_remove_on_a_missing_queue_says_there_is_no_queue(tmp_path: pathlib.Path) -> None:
    with pytest.raises(segq.SegqError, match="no queue at"):
        segq.Receiver.remove(tmp_path / "missing", "reader")
    with pytest.raises(segq.SegqError, match="no queue at"):
        segq.WorkQueue.remove(tmp_path / "missing", "group")
    assert list(tmp_path.iterdir()) == []


# -- use after close raises Closed -------------------------------------------


def test_settling_a_job_after_its_work_queue_closed_raises_closed(queue_dir: pathlib.Path) -> None:
    with segq.Sender(queue_dir, segment_size=1 << 16) as tx:
        tx.send_batch([b"one", b"two", b"three"])
    wq = segq.WorkQueue(queue_dir)
    job, batch = wq.claim(timeout=0), wq.claim_batch(2, timeout=0)
    wq.close()  # gives both back: neither was nacked by the caller
    for settle in (job.ack, job.nack, job.renew, batch.ack, batch.nack, batch.renew):
        with pytest.raises(segq.Closed, match="closed"):
            settle()
    with segq.WorkQueue(queue_dir) as again:
        assert [j.data for j in again.claim_batch(3, timeout=0)] == [b"one", b"two", b"three"]


def test_committing_a_message_after_its_receiver_closed_raises_closed(queue_dir: pathlib.Path) -> None:
    with segq.Sender(queue_dir, segment_size=1 << 16) as tx:
        tx.send(b"one")
    rx = segq.Receiver(queue_dir)
    message = rx.recv(timeout=0)
    rx.close()
    for settle in (message.commit, message.rollback):
        with pytest.raises(segq.Closed):
            settle()


# -- paths: str, os.PathLike, and the bytes check_path accepts -----------------


def test_bytes_paths_work_everywhere_a_path_is_taken(tmp_path: pathlib.Path) -> None:
    path, dead, other = (bytes(tmp_path / name) for name in ("queue", "dead", "other"))
    with segq.Sender(path, segment_size=1 << 16) as tx:
        tx.send_batch([b"one", b"two"])
    with segq.WorkQueue(path, dead_letter=dead, max_attempts=1) as wq:
        wq.claim(timeout=0).ack(enqueue=[segq.Enqueue(b"next", queue=other)])
        wq.claim(timeout=0).nack(reason="no")
    for opened in (segq.Receiver(dead), segq.Receiver(other), segq.WorkQueue(path, "another")):
        opened.close()
    assert segq.recovery.unlock_for_sending(path) == []
    assert segq.recovery.unlock_for_receiving(path) == []
    assert segq.recovery.unlock_queue(path) == []
    with segq.Receiver(other) as rx:
        assert rx.recv(timeout=0).data == b"next"


def test_a_bad_follow_up_queue_path_is_refused_when_the_enqueue_is_described() -> None:
    for bad in ("", "a\0b"):
        with pytest.raises(segq.SegqError, match="queue"):
            segq.Enqueue(b"data", queue=bad)


# -- settling with bad arguments: a clear error, nothing changed ------------------


def test_ack_and_nack_with_arguments_of_the_wrong_type_raise_invalid_argument_and_keep_the_claim(
    queue_dir: pathlib.Path,
) -> None:
    with segq.Sender(queue_dir, segment_size=1 << 16) as tx:
        tx.send(b"job")
    with segq.WorkQueue(queue_dir, max_attempts=1) as wq:
        job = wq.claim(timeout=0)
        with pytest.raises(segq.InvalidArgument, match="takes a list of segq.Enqueue, not Enqueue"):
            job.ack(enqueue=segq.Enqueue(b"next"))  # type: ignore[arg-type]
        with pytest.raises(segq.InvalidArgument, match="reason must be a str"):
            job.nack(reason=5)  # type: ignore[arg-type]
        assert job.state.value == "held" and wq.stats().claimed == 1
        job.ack(enqueue=(segq.Enqueue(b"next %d" % n) for n in range(2)))  # type: ignore[arg-type]
        assert [j.data for j in wq.claim_batch(5, timeout=0)] == [b"next 0", b"next 1"]



def _send_with(headers: object) -> Callable[[pathlib.Path], None]:
    def call(queue: pathlib.Path) -> None:
        with segq.Sender(queue) as tx:
            tx.send(b"x", headers=headers)  # type: ignore[arg-type]

    return call


def _recv_batch_of_none(queue: pathlib.Path) -> None:
    with segq.Receiver(queue) as rx:
        rx.recv_batch(0)


def _claim_batch_of_none(queue: pathlib.Path) -> None:
    with segq.WorkQueue(queue) as wq:
        wq.claim_batch(0)


@pytest.mark.parametrize(
    "call",
    [
        lambda queue: segq.Receiver(queue, "../up"),
        _send_with({"": b"v"}),
        _send_with({"segq-mine": b"v"}),
        _send_with({"k": 5}),
        _recv_batch_of_none,
        lambda queue: segq.WorkQueue(queue, max_attempts=0),
        _claim_batch_of_none,
    ],
    ids=["receiver name", "empty header name", "reserved header name", "header value", "recv_batch(0)",
         "max_attempts=0", "claim_batch(0)"],
)
def test_a_bad_argument_value_raises_invalid_argument_which_is_a_value_error(
    queue_dir: pathlib.Path, call: Callable[[pathlib.Path], object]
) -> None:
    """UsageError is for calls the object's state refuses; a value out of range is InvalidArgument (issue 15)."""
    segq.Sender(queue_dir).close()
    with pytest.raises(segq.InvalidArgument) as raised:
        call(queue_dir)
    assert isinstance(raised.value, ValueError) and not isinstance(raised.value, segq.UsageError)
