"""Recovery: inspect, verify and repair a queue that crashed processes left behind.

Theory of operation
-------------------
Some repairs need no decision and happen when a Sender or Receiver opens the
queue (``_control``): a dead owner's lock is taken over, a torn tail is cut.
The rest needs a decision and lives here.  Everything here works on the files
directly (``_segment``, ``_state``, ``_lock``), never through Sender or
Receiver, so it works on a queue those refuse to open.

One scan serves ``verify``, ``info`` and ``recover``: ``_scan.scan_segment``
checks every record and, past a bad one, finds where intact records resume,
so damage in the middle of a segment is a span with a file and an offset.
``info``, ``verify`` and ``lock_holders`` (in ``_inspect``, read-only) are
re-exported here; this module adds what writes: unlocking, recovering,
clearing.  ``docs/recovery.md`` is the user's guide.

Two strategies, as in yaque.  *Replay* (:func:`recover`) keeps every record
that can be read: the receiver restarts at its saved position, or at the
oldest segment when that position is unreadable; some records may come
twice, none is lost, and a damaged record stays where it is, so the receiver
stops at it.  *Loss* (:func:`recover_with_loss`) gives up what cannot be
read: a receiver whose segment is damaged ahead of it (or whose position is
unreadable) moves to the bottom of the next segment.  Both are idempotent.

``recover`` writes in this order; each step can be redone, so a crash during
recovery leaves a queue that recovery handles again:

1. lock files of dead owners are removed (a live receiver of the name raises
   ``Locked``); then the receiver's lock is taken, so it cannot open meanwhile;
2. if no process is attached (the exclusive ``flock`` on ``segq.ctl`` that
   Control takes to know it is alone, held through this step so an opener
   waits), segments are repaired: the last segment's header, if a power loss
   kept it from the disk (zeros), is rewritten from the file name; a torn tail is zeroed, a segment without
   its end marker is sealed, a damaged last segment is sealed and followed by
   a new one (created before the marker is written, as a sender does).  Then
   the control file is invalidated (magic zeroed, semaphore unlinked) and the
   next opener rebuilds it from the segments;
3. the receiver's cursor is rewritten with the crash-atomic slot write; one
   whose both slots are damaged is replaced whole (``os.replace``);
4. with the loss strategy, segments every consumer is past are deleted.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any

import portalocker

from ._control import CONTROL_NAME, published_tail, remove_semaphores, reset_header
from ._fs import open_file, open_to_read, replace_into_place
from ._format import END_MARKER, HEADER_SIZE, SEGMENT_HEADER_SIZE
from ._inspect import (
    ConsumerInfo,
    LockHolder,
    QueueInfo,
    VerifyReport,
    existing_queue,
    info,
    lock_holders,
    queue_bytes,
    saved_position,
    verify,
)
from .workqueue._admin import GroupRecovery, list_groups, recover_group, recover_groups
from ._lock import LockFile, unlock
from ._scan import Damage, Progress, QueueScans, Repair, SegmentScan, missing_segments, position_json, scan_segment
from ._segment import (
    StrPath,
    create_segment,
    list_segments,
    next_segment_size,
    os_error,
    queue_segment_size,
    restore_unwritten_header,
    segment_path,
)
from ._retention import delete_consumed_segments, delete_segments_below
from ._state import ConsumerKind, CursorFile, Position, check_name, cursor_path, list_cursors, receiver_lock_path
from .errors import CorruptionError, Locked, SegqError

__all__ = [
    "unlock",
    "unlock_for_sending",
    "unlock_for_receiving",
    "unlock_queue",
    "remove_idle_semaphores",
    "lock_holders",
    "guess_recv_metadata",
    "guess_recv_metadata_with_loss",
    "recover",
    "recover_with_loss",
    "recover_group",
    "GroupRecovery",
    "list_groups",
    "verify",
    "info",
    "clear",
    "queue_bytes",
    "scan_segment",
    "Damage",
    "LockHolder",
    "Repair",
    "SegmentScan",
    "RecoveryReport",
    "VerifyReport",
    "ConsumerInfo",
    "QueueInfo",
    "ClearReport",
]

log = logging.getLogger(__name__)


def _unlock_all(holders: list[LockHolder]) -> list[LockHolder]:
    removed = [holder for holder in holders if not holder.alive and _unlock_quietly(holder.path)]
    live = [holder for holder in holders if holder.alive]
    if live:
        more = f" (and {len(live) - 1} more)" if len(live) > 1 else ""
        raise Locked(
            f"{live[0].path} is held by live PID {live[0].pid} ({live[0].what}){more}; stop it first",
            path=live[0].path,
            pid=live[0].pid,
        )
    return removed


def _unlock_quietly(path: str) -> bool:
    try:
        return unlock(path)
    except Locked:
        return False  # taken over by a new process since we looked: it is live, leave it


def unlock_for_sending(path: StrPath) -> list[LockHolder]:
    """Remove the sender lock files of dead processes; return those removed.

    Raises ``Locked`` naming a live sender's PID (after removing the dead ones).
    """
    path = existing_queue(path)
    removed = _unlock_all([holder for holder in lock_holders(path) if holder.what == "sender"])
    remove_idle_semaphores(path)
    return removed


def unlock_for_receiving(path: StrPath, name: str = "default") -> list[LockHolder]:
    """Remove receiver ``name``'s lock file if its process is dead; return it if removed.

    Raises ``Locked`` naming the PID if that receiver is alive.
    """
    path = existing_queue(path)
    lock_path = receiver_lock_path(path, check_name(name))
    removed = _unlock_all([holder for holder in lock_holders(path) if holder.path == lock_path])
    remove_idle_semaphores(path)
    return removed


def unlock_queue(path: StrPath) -> list[LockHolder]:
    """Remove every lock file of a dead process (senders, all receivers, groups); return those removed.

    Raises ``Locked`` naming a live holder's PID (after removing the dead ones).
    """
    path = existing_queue(path)
    removed = _unlock_all(lock_holders(path))
    remove_idle_semaphores(path)
    return removed


def remove_idle_semaphores(path: StrPath) -> list[str]:
    """Remove the queue's append semaphores from ``/dev/shm`` if no process is attached; return their names.

    A process killed while attached leaves its queue's semaphore behind
    until the queue is opened again; this removes it now (the next opener
    makes a new one).  Nothing is removed while any process is attached.
    """
    queue_dir = os.fspath(path)
    hold = _ControlHold(queue_dir, create=False)
    try:
        if not hold.alone or not os.path.isdir(queue_dir):
            return []
        removed = remove_semaphores(queue_dir)
    finally:
        hold.release()
    for name in removed:
        log.warning("%s: removed the append semaphore %s left by a process that died", queue_dir, name)
    return removed


# -- the control file ----------------------------------------------------------


class _ControlHold:
    """An exclusive ``flock`` on ``segq.ctl``: while held, no process is attached or can attach."""

    def __init__(self, queue_dir: str, *, create: bool) -> None:
        self.path = os.path.join(queue_dir, CONTROL_NAME)
        self.fd = -1
        self.alone = False
        try:
            if create:
                self.fd = open_file(self.path, os.O_RDWR, private=True)
            else:
                self.fd = open_to_read(self.path)
        except FileNotFoundError:
            self.alone = True  # no control file: nobody attached (a dry run does not create one)
            return
        except OSError as error:
            raise os_error(error, "open", self.path) from None
        try:
            portalocker.lock(self.fd, portalocker.LockFlags.EXCLUSIVE | portalocker.LockFlags.NON_BLOCKING)
            self.alone = True
        except portalocker.LockException:
            pass  # attached processes hold it shared; the file stays open for published_tail()

    def published_tail(self) -> Position | None:
        """Return the tail the attached processes last published, if the file is intact."""
        return published_tail(self.fd) if self.fd >= 0 else None

    def invalidate(self) -> None:
        """Make the next opener rebuild the control file from the segments (only when alone)."""
        if self.fd < 0 or not self.alone:
            return
        remove_semaphores(os.path.dirname(self.path))
        reset_header(self.fd)
        log.warning("%s: reset; the next process to open the queue rebuilds it", self.path)

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


# -- guessing a receiver's position ------------------------------------------


def _replay_position(scans: QueueScans, saved: Position | None) -> Position:
    segments = scans.segments
    if not segments:
        return Position.bottom(0)
    if saved is None or saved.segment < segments[0] or saved.segment > segments[-1]:
        # Unknown, or pointing at deleted segments or past the tail: start at the oldest record.
        return Position.bottom(segments[0])
    if saved.segment not in segments:
        return Position.bottom(next(number for number in segments if number > saved.segment))
    scan = scans.get(saved.segment)
    boundary, _ = scans.place(saved)
    if boundary == scan.data_end and scan.sealed and saved.segment + 1 not in segments:
        # Read to its end, and the next segment is gone: nothing readable lies between.
        return Position.bottom(_following_segment(segments, saved.segment))
    return Position(saved.segment, boundary)


def _following_segment(segments: list[int], number: int) -> int:
    return next((later for later in segments if later > number), number + 1)


def guess_recv_metadata(path: StrPath, name: str = "default") -> Position:
    """Return where receiver ``name`` should restart so that nothing is lost (replay strategy).

    The greater of the bottom of the smallest segment present and the
    position in the receiver's metadata file: a lower bound, so some records
    may come again, none is skipped.  An unreadable position counts as the
    bottom of the smallest segment; one inside a record moves back to its
    start.  Reads only.
    """
    queue_dir = existing_queue(path)
    _, saved, _ = saved_position(queue_dir, ConsumerKind.RECEIVER, check_name(name))
    return _replay_position(QueueScans(queue_dir), saved)


def guess_recv_metadata_with_loss(path: StrPath, name: str = "default") -> Position:
    """Return the bottom of the segment after the one receiver ``name`` reads (loss strategy).

    For a lone receiver that is the segment after the smallest one: the
    rest of the smallest segment is given up.  Reads only.
    """
    queue_dir = existing_queue(path)
    segments = list_segments(queue_dir)
    replay = guess_recv_metadata(queue_dir, name)
    return Position.bottom(_following_segment(segments, replay.segment))


# -- recover ------------------------------------------------------------------


@dataclass
class RecoveryReport:
    """What :func:`recover` or :func:`recover_with_loss` found and did (with ``dry_run``: would do).

    ``receivers`` maps each recovered receiver to where it now starts and
    ``previous`` to where its metadata said it was (None: unreadable).
    ``cut`` lists torn tails zeroed, ``headers`` segment headers rewritten
    (the last segment's, which a power loss kept from the disk), ``sealed`` end markers written,
    ``created`` segments created so the queue can open or a receiver move on.
    ``dropped_records``/``dropped_bytes`` count what the loss strategy gave
    up (a damaged span counts as one record).  ``in_use`` lists live processes attached to the queue, because of
    whom segment repairs were skipped.  ``notes`` say what to do next.
    """

    path: str
    strategy: str
    dry_run: bool = False
    unlocked: list[LockHolder] = field(default_factory=list)
    cut: list[Repair] = field(default_factory=list)
    headers: list[Repair] = field(default_factory=list)
    sealed: list[Repair] = field(default_factory=list)
    created: list[str] = field(default_factory=list)
    damaged: list[Damage] = field(default_factory=list)
    receivers: dict[str, Position] = field(default_factory=dict)
    previous: dict[str, Position | None] = field(default_factory=dict)
    dropped_records: int = 0
    dropped_bytes: int = 0
    deleted_segments: list[int] = field(default_factory=list)
    in_use: list[LockHolder] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    groups: list[GroupRecovery] = field(default_factory=list)  # every work-queue group, replay strategy

    @property
    def changed(self) -> bool:
        """True if anything was (or, in a dry run, would be) written."""
        moved = any(self.previous.get(name) != position for name, position in self.receivers.items())
        repaired_groups = any(group.repairs for group in self.groups)
        return bool(
            self.unlocked or self.cut or self.headers or self.sealed or self.created or self.deleted_segments or moved or repaired_groups
        )

    def to_json(self) -> dict[str, Any]:
        """Return the report as a JSON-ready dict (the stable ``segq recover --json`` output)."""
        return {
            "path": self.path,
            "strategy": self.strategy,
            "dry_run": self.dry_run,
            "changed": self.changed,
            "unlocked": [holder.to_json() for holder in self.unlocked],
            "cut": [cut.to_json() for cut in self.cut],
            "headers": [header.to_json() for header in self.headers],
            "sealed": [seal.to_json() for seal in self.sealed],
            "created": self.created,
            "damaged": [damage.to_json() for damage in self.damaged],
            "receivers": {name: position_json(position) for name, position in self.receivers.items()},
            "previous": {name: position_json(position) for name, position in self.previous.items()},
            "dropped_records": self.dropped_records,
            "dropped_bytes": self.dropped_bytes,
            "deleted_segments": self.deleted_segments,
            "in_use": [holder.to_json() for holder in self.in_use],
            "notes": self.notes,
            "groups": [group.to_dict() for group in self.groups],
        }


def recover(
    path: StrPath, name: str = "default", *, dry_run: bool = False, progress: Progress | None = None
) -> RecoveryReport:
    """Repair the queue and restart receiver ``name`` where nothing is lost (replay strategy).

    Removes dead owners' lock files, cuts torn tails, seals segments left
    without an end marker and writes :func:`guess_recv_metadata` into the
    receiver's metadata.  Damage in the middle of a segment is reported and
    left in place: the receiver stops at it (``recover_with_loss`` skips it).
    Segments are repaired only if no process has the queue open; otherwise
    the report lists those processes in ``in_use``.  Idempotent.  Raises
    ``Locked`` if receiver ``name`` is open in a live process.

    >>> import segq, tempfile
    >>> from segq import recovery
    >>> path = tempfile.mkdtemp()
    >>> with segq.Sender(path, segment_size=1 << 16) as tx:
    ...     tx.send(b"job")
    >>> segq.Receiver(path).close()
    >>> report = recovery.recover(path)
    >>> report.receivers, report.changed
    ({'default': Position(segment=0, offset=32)}, False)
    """
    return _recover(path, name, loss=False, dry_run=dry_run, progress=progress)


def recover_with_loss(
    path: StrPath, name: str = "default", *, dry_run: bool = False, progress: Progress | None = None
) -> RecoveryReport:
    """Repair the queue and move receiver ``name`` past what it cannot read (loss strategy).

    Does what :func:`recover` does; then, if the receiver's position is
    unreadable or its segment is damaged ahead of it, moves it to
    :func:`guess_recv_metadata_with_loss`, the bottom of the next segment,
    and deletes the segment it left once no consumer needs it.  The report
    counts the records and bytes given up.  A receiver with nothing
    unreadable ahead in its segment is left where it is, which makes this
    idempotent.  Raises ``Locked`` as ``recover`` does, and if the receiver
    must move past the last segment while another process has the queue open.
    """
    return _recover(path, name, loss=True, dry_run=dry_run, progress=progress)


def _recover(path: StrPath, name: str, *, loss: bool, dry_run: bool, progress: Progress | None) -> RecoveryReport:
    queue_dir = existing_queue(path)
    check_name(name)
    report = RecoveryReport(queue_dir, "loss" if loss else "replay", dry_run)
    lock_path = receiver_lock_path(queue_dir, name)
    holders = lock_holders(queue_dir)
    for holder in holders:
        if holder.path == lock_path and holder.alive:
            raise Locked(
                f"receiver {name!r} is open in live PID {holder.pid} ({holder.path}); stop it before recovering",
                path=holder.path,
                pid=holder.pid,
            )
    dead = [holder for holder in holders if not holder.alive]
    report.unlocked = dead if dry_run else [holder for holder in dead if _unlock_quietly(holder.path)]
    receiver_lock = None
    if not dry_run and os.path.exists(cursor_path(queue_dir, ConsumerKind.RECEIVER, name)):
        receiver_lock = LockFile(lock_path, what=f"receiver {name!r}")
        receiver_lock.acquire()  # a Receiver of this name cannot open until we are done
    try:
        control = _ControlHold(queue_dir, create=not dry_run)
        try:
            if not control.alone:
                report.in_use = [
                    holder for holder in lock_holders(queue_dir) if holder.alive and holder.path != lock_path
                ]
            scans = QueueScans(queue_dir, progress)
            registered, saved, problem = saved_position(queue_dir, ConsumerKind.RECEIVER, name)
            if saved is not None and saved.segment in scans.segments:
                scans.marks.setdefault(saved.segment, set()).add(saved.offset)
            reset_control = _repair_segments(scans, control, report)
            if registered:
                _recover_receiver(scans, control, report, name, saved, problem, loss)
            else:
                others = [other for kind, other, _ in list_cursors(queue_dir) if kind is ConsumerKind.RECEIVER]
                report.notes.append(
                    f"no receiver named {name!r} is registered"
                    + (f" (registered: {', '.join(others)})" if others else "")
                    + "; its position was left alone"
                )
            if not dry_run and control.alone and (reset_control or report.cut or report.headers or report.sealed or report.created):
                control.invalidate()
            elif not dry_run and control.alone:
                remove_semaphores(queue_dir)  # left by a process killed while attached
        finally:
            control.release()
        if loss and not dry_run and report.changed:
            report.deleted_segments = delete_consumed_segments(queue_dir)
    finally:
        if receiver_lock is not None:
            receiver_lock.release()
    # Work-queue groups are consumers too: give back dead workers' claims and
    # repair their journals (replay strategy, whichever the receiver's: nothing acked is lost).
    report.groups = recover_groups(queue_dir, dry_run=dry_run)
    return report


def _repair_segments(scans: QueueScans, control: _ControlHold, report: RecoveryReport) -> bool:
    """Find what keeps the queue from opening or readers from moving on; fix it when alone.

    Returns whether the control file must be rebuilt even if no segment changed.
    """
    segments = list(scans.segments)
    if not segments:
        return False
    report.damaged.extend(missing_segments(scans.queue_dir, segments))
    skipped = False
    for number in segments:
        try:
            scan = scans.get(number)
        except FileNotFoundError:
            continue  # consumed and deleted by a live receiver meanwhile
        report.damaged.extend(scan.damage)
        if scan.header_unwritten:
            skipped |= not _rewrite_header(scans, scan, report, control.alone)
        if number != scans.last:
            if not scan.sealed and not scan.unreadable and not _seal(scans, scan, report, control.alone):
                skipped = True
                report.damaged.append(
                    Damage(scan.path, scan.data_end, scan.torn_end or scan.data_end, "no end-of-segment marker")
                )
        elif scan.unreadable:
            skipped |= not _create_following(scans, scan, report, control.alone)
        elif scan.damage or scan.sealed:
            # Intact records after damage keep the queue from opening: seal the
            # segment after them and start a new one.
            skipped |= not _seal(scans, scan, report, control.alone)
        elif scan.torn_end:
            if control.alone:
                _cut(scan, report)
            else:
                skipped = True
    if skipped:
        report.notes.append(
            "segment repairs were skipped: the queue is open in "
            + (", ".join(f"PID {holder.pid} ({holder.what})" for holder in report.in_use) or "another process")
            + "; stop it and run recover again"
        )
    last = scans.get(scans.last)
    tail = Position.bottom(last.number + 1) if last.sealed or last.unreadable else Position(last.number, last.data_end)
    published = control.published_tail() if control.alone else None
    if published is not None and published > tail:
        # Records were published up to there and are gone: opening would refuse the queue until the control file goes.
        report.damaged.append(Damage(last.path, last.data_end, published.offset, f"records up to {published} are gone"))
        return True
    return False


def _rewrite_header(scans: QueueScans, scan: SegmentScan, report: RecoveryReport, alone: bool) -> bool:
    """Rewrite the last segment's header that never reached the disk; return False if not alone."""
    if not alone:
        return False
    report.headers.append(Repair(scan.path, 0, SEGMENT_HEADER_SIZE, "header never reached the disk: rewritten"))
    if not report.dry_run and not restore_unwritten_header(scans.queue_dir, scan.number):
        raise CorruptionError(scan.path, 0, "segment header changed while recovering; run recover again")
    scan.header_unwritten = False
    return True


def _cut(scan: SegmentScan, report: RecoveryReport) -> None:
    report.cut.append(Repair(scan.path, scan.data_end, scan.torn_end, "torn write"))
    if not report.dry_run:
        _write_zeros(scan.path, scan.data_end, scan.torn_end)
        log.warning("%s: cut a torn tail, bytes %d..%d", scan.path, scan.data_end, scan.torn_end)
    scan.torn_end = 0


def _write_zeros(path: str, start: int, end: int) -> None:
    try:
        fd = open_file(path, os.O_WRONLY, create=False)
    except OSError as error:
        raise os_error(error, "repair", path) from None
    try:
        for offset in range(start, end, 1 << 20):
            os.pwrite(fd, bytes(min(1 << 20, end - offset)), offset)
        os.fsync(fd)
    finally:
        os.close(fd)


def _create_following(scans: QueueScans, scan: SegmentScan, report: RecoveryReport, alone: bool) -> bool:
    """Create the segment after ``scan`` (as a sender does at rollover); return False if not alone."""
    following = scan.number + 1
    if following in scans.segments:
        return True
    if not alone:
        return False
    path = segment_path(scans.queue_dir, following)
    if not report.dry_run:
        # Sized as a sender rolling over would size it.
        size = next_segment_size(scan.size, queue_segment_size(scans.queue_dir))
        create_segment(scans.queue_dir, following, size, durable=True)
        log.warning("%s: created so the queue can go on past %s", path, scan.path)
    report.created.append(path)
    scans.segments.append(following)
    return True


def _seal(scans: QueueScans, scan: SegmentScan, report: RecoveryReport, alone: bool) -> bool:
    """Write the end marker after the segment's records (the next segment first); False if not alone."""
    if not alone:
        return False
    if scan.torn_end:
        _cut(scan, report)
    _create_following(scans, scan, report, alone)
    if scan.sealed:
        return True
    report.sealed.append(Repair(scan.path, scan.data_end, scan.data_end + HEADER_SIZE, "end marker written"))
    scan.sealed = True
    if report.dry_run:
        return True
    try:
        fd = open_file(scan.path, os.O_WRONLY, create=False)
    except OSError as error:
        raise os_error(error, "seal", scan.path) from None
    try:
        os.pwrite(fd, END_MARKER, scan.data_end)
        os.fsync(fd)
    finally:
        os.close(fd)
    log.warning("%s: sealed with an end marker at offset %d", scan.path, scan.data_end)
    return True


def _recover_receiver(
    scans: QueueScans,
    control: _ControlHold,
    report: RecoveryReport,
    name: str,
    saved: Position | None,
    problem: str | None,
    loss: bool,
) -> None:
    segments = scans.segments
    position = _replay_position(scans, saved)
    report.previous[name] = saved
    if problem is not None:
        report.notes.append(f"receiver {name!r}'s metadata was unreadable ({problem})")
    if loss and segments and position.segment in segments:
        reading, scan = position, scans.get(position.segment)
        following = _following_segment(segments, position.segment)
        if scan.sealed and position.offset >= scan.data_end and following in segments:
            # At the end marker: the receiver's next record is at the bottom of the next segment.
            reading, scan = Position.bottom(following), scans.get(following)
        if saved is None or scan.damage_from(reading.offset) is not None:
            target = Position.bottom(_following_segment(segments, reading.segment))
            if target.segment not in segments and not _seal(scans, scan, report, control.alone):
                holder = report.in_use[0] if report.in_use else None
                raise Locked(
                    f"receiver {name!r} must move past the last segment, which the queue's other "
                    f"processes still write: stop {holder.describe() if holder else 'them'} first",
                    path=holder.path if holder else control.path,
                    pid=holder.pid if holder else None,
                )
            _, records_after = scans.place(reading)
            skipped_damage = [damage for damage in scan.damage if damage.end > reading.offset]
            data_end = max([scan.data_end, *(damage.end for damage in skipped_damage)])
            report.dropped_records += records_after + len(skipped_damage)  # a damaged span counts as one
            report.dropped_bytes += max(0, data_end - reading.offset)
            position = target
    report.receivers[name] = position
    if position != saved and not report.dry_run:
        _write_cursor(cursor_path(scans.queue_dir, ConsumerKind.RECEIVER, name), position)
        log.warning("receiver %r of %s: restarts at %s (was %s)", name, scans.queue_dir, position, saved)
    ahead = _first_damage_from(scans, position)
    if ahead is not None:
        report.notes.append(
            f"receiver {name!r} will stop at {ahead}; then recover_with_loss (`segq recover --loss`) "
            "skips the rest of that segment"
        )


def _first_damage_from(scans: QueueScans, position: Position) -> Damage | None:
    for number in scans.segments:
        if position.segment <= number <= scans.last:
            damage = scans.get(number).damage_from(position.offset if number == position.segment else 0)
            if damage is not None:
                return damage
    return None


def _write_cursor(path: str, position: Position) -> None:
    """Save ``position`` crash-atomically; replace a cursor whose both slots are damaged."""
    try:
        cursor = CursorFile(path)
    except CorruptionError:
        replacement = path + ".recover"
        try:
            os.unlink(replacement)
        except FileNotFoundError:
            pass
        cursor = CursorFile(replacement, initial=position)
        cursor.close()
        replace_into_place(replacement, path, durable=True)
        return
    try:
        cursor.write(position)
        cursor.sync()
    finally:
        cursor.close()


# -- clear ----------------------------------------------------------------------


@dataclass
class ClearReport:
    """What :func:`clear` did: where every receiver now stands, records dropped, segments deleted."""

    path: str
    receivers: dict[str, Position] = field(default_factory=dict)
    dropped_records: int = 0
    deleted_segments: list[int] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "receivers": {name: position_json(position) for name, position in self.receivers.items()},
            "dropped_records": self.dropped_records,
            "deleted_segments": self.deleted_segments,
        }


def clear(path: StrPath, *, progress: Progress | None = None) -> ClearReport:
    """Drop every record in the queue: every receiver moves to the tail, consumed segments are deleted.

    If no process has the queue open, the last segment is sealed and a new
    one started, so nothing at all is left to read (also for receivers
    registered later).  If senders are live, receivers move to the tail
    they published; records sent after that are kept.  Raises ``Locked`` if a
    live Receiver holds the queue; refuses a queue with work-queue groups
    (remove them first with ``segq.WorkQueue.remove`` or ``segq remove-group``).
    Counting the records dropped reads them: ``progress(n)`` is called as
    ``n`` bytes are read.
    """
    queue_dir = existing_queue(path)
    cursors = list_cursors(queue_dir)
    groups = [name for kind, name, _ in cursors if kind is ConsumerKind.GROUP]
    if groups:
        raise SegqError(
            f"{queue_dir} has work-queue groups ({', '.join(groups)}); clear handles receivers only: "
            f"remove the groups first (`segq remove-group {queue_dir} GROUP`, or segq.WorkQueue.remove)"
        )
    receiver_names = [name for kind, name, _ in cursors if kind is ConsumerKind.RECEIVER]
    locks = []
    try:
        for name in receiver_names:
            lock = LockFile(receiver_lock_path(queue_dir, name), what=f"receiver {name!r}")
            lock.acquire()
            locks.append(lock)
        return _clear_locked(queue_dir, receiver_names, progress)
    finally:
        for lock in locks:
            lock.release()


def _clear_locked(queue_dir: str, receiver_names: list[str], progress: Progress | None) -> ClearReport:
    report = ClearReport(queue_dir)
    before = info(queue_dir, scan=True, progress=progress)
    report.dropped_records = max(
        (consumer.backlog_records or 0 for consumer in before.consumers), default=before.records or 0
    )
    control = _ControlHold(queue_dir, create=True)
    try:
        scans = QueueScans(queue_dir)
        if not scans.segments:
            return report
        if control.alone:
            last = scans.get(scans.last)
            if last.records or last.torn_end or last.damage or last.sealed or last.unreadable:
                recovery = RecoveryReport(queue_dir, "clear")
                if last.unreadable:
                    _create_following(scans, last, recovery, True)
                else:
                    _seal(scans, last, recovery, True)
                control.invalidate()
            target = Position.bottom(scans.segments[-1])
        else:
            target = control.published_tail() or before.tail
    finally:
        control.release()
    for name in receiver_names:
        _write_cursor(cursor_path(queue_dir, ConsumerKind.RECEIVER, name), target)
        report.receivers[name] = target
        log.warning("receiver %r of %s: cleared, now at %s", name, queue_dir, target)
    if receiver_names:
        report.deleted_segments = delete_consumed_segments(queue_dir)
    else:
        report.deleted_segments = delete_segments_below(queue_dir, target.segment)
    return report
