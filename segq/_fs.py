"""Opening and creating files inside a queue directory without following planted links.

Theory of operation
-------------------
A queue directory may be writable by users other than the one running segq
(a group-shared queue), and segq is often run by an operator or root
(``segq recover``).  Anyone who can write the directory can put a symbolic
link, or a hard link to a file they do not own, where segq expects one of
its files.  So every file segq opens for writing in a queue goes through
:func:`open_file`:

| check                     | how                                            | on failure                   |
|---------------------------|------------------------------------------------|------------------------------|
| not a symbolic link       | ``O_NOFOLLOW`` on the last component           | ``SegqError`` naming the path |
| created, never truncated  | ``O_CREAT | O_EXCL`` to create, else plain open | (never ``O_TRUNC``)          |
| the expected kind         | ``fstat`` after open: a regular file (or FIFO) | ``SegqError``                |
| the expected owner        | us, the directory's owner, or the directory's   | ``SegqError``                |
|                           | group when the directory is group-writable     |                              |
| no second name            | ``st_nlink == 1`` (brief grace for our own     | ``SegqError``                |
|                           | link-into-place creations)                     |                              |

A file that must never be seen half-written (a segment, a cursor, a
journal) is written in full under a temporary name and synced
(:func:`write_temporary`), then given its name, and the directory synced:
linked when it is new (:func:`link_into_place`, both steps together in
:func:`create_whole`), renamed over the old one when it replaces it
(:func:`replace_into_place`).  A crash leaves the old file or the whole new
one, plus at most a ``*.tmp`` leftover that no reader looks at.

Directories segq makes inside a queue (``cursors/``, ``senders/``,
``wake/``, ``groups/<g>/``) go through :func:`make_dir`, which refuses a link
or a file in the way instead of following or tripping on it.

Permissions follow the directory (see ``docs/security.md``): a file segq
creates gets the directory's read and write bits (group-writable queue,
group-writable files), whatever the umask; *private* files (lock files, the
control file, FIFOs: everything that can be locked or written to wake
someone) get only the write bits, so a user who may read the queue but not
write it cannot open them, and so cannot ``flock`` them to stall writers.
"""

from __future__ import annotations

import errno
import os
import stat
import time
from typing import Callable

from .errors import SegqError

__all__ = [
    "open_file",
    "open_to_read",
    "make_dir",
    "file_mode",
    "check_opened",
    "give_to_directory_owner",
    "fsync_directory",
    "write_temporary",
    "link_into_place",
    "replace_into_place",
    "create_whole",
    "LINK_ADVICE",
]

LINK_ADVICE = "segq never follows links inside a queue directory; remove it (and find out who put it there)"

_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_LINK_GRACE_SECONDS = 0.2  # a creator links its temporary file into place, then unlinks the temporary


def file_mode(directory_mode: int, *, private: bool) -> int:
    """Return the mode for a file segq creates in a directory of mode ``directory_mode``."""
    mode = 0o600
    if directory_mode & stat.S_IWGRP:
        mode |= 0o060
    if directory_mode & stat.S_IWOTH:
        mode |= 0o006
    if not private:
        mode |= 0o040 if directory_mode & stat.S_IRGRP else 0
        mode |= 0o004 if directory_mode & stat.S_IROTH else 0
    return mode


def give_to_directory_owner(fd: int, directory: os.stat_result) -> None:
    """As root, hand a file just created in someone's queue to the directory's owner.

    ``sudo segq recover`` must not leave root-owned files behind that the
    queue's own users cannot open.
    """
    if os.geteuid() == 0 and directory.st_uid != 0:
        os.fchown(fd, directory.st_uid, -1)


def _parent_stat(path: str) -> os.stat_result:
    parent = os.path.dirname(path) or "."
    try:
        return os.stat(parent)
    except OSError as error:
        raise SegqError(f"cannot open {path}: its directory: {error.strerror}") from None


def check_opened(fd: int, path: str, *, fifo: bool = False, parent: os.stat_result | None = None) -> os.stat_result:
    """Check that ``fd`` (just opened at ``path``) is one of ours; return its stat, raise ``SegqError`` if not."""
    info = os.fstat(fd)
    if fifo:
        if not stat.S_ISFIFO(info.st_mode):
            raise SegqError(f"{path} is not a FIFO; {LINK_ADVICE}")
    elif not stat.S_ISREG(info.st_mode):
        raise SegqError(f"{path} is not a regular file; {LINK_ADVICE}")
    parent = parent if parent is not None else _parent_stat(path)
    euid = os.geteuid()
    owner_ok = (
        info.st_uid in (euid, parent.st_uid, 0)
        or (parent.st_mode & stat.S_IWGRP and info.st_gid == parent.st_gid)
        or (parent.st_mode & stat.S_IWOTH)
    )
    if not owner_ok:
        raise SegqError(
            f"{path} is owned by uid {info.st_uid}, who may not write this queue; "
            "remove the file (and find out who put it there)"
        )
    deadline = None
    if info.st_nlink > 1:
        info = _drop_leftover_temporaries(fd, path, info)
    while info.st_nlink > 1:
        # Our own creations link a finished temporary file into place and
        # then unlink the temporary: a second name lasts only that long.
        now = time.monotonic()
        deadline = deadline or now + _LINK_GRACE_SECONDS
        if now > deadline:
            raise SegqError(f"{path} has {info.st_nlink} names (a hard link); {LINK_ADVICE}")
        time.sleep(0.005)
        info = os.fstat(fd)
    return info


def _drop_leftover_temporaries(fd: int, path: str, info: os.stat_result) -> os.stat_result:
    """Unlink ``path.<hex>.tmp`` names of the same file: a creator killed between link and unlink left them.

    A creator still running finds its temporary gone and goes on (it
    tolerates that); the file itself keeps its real name.
    """
    directory, name = os.path.split(path)
    try:
        siblings = os.listdir(directory or ".")
    except OSError:
        return info
    for sibling in siblings:
        if sibling.startswith(name + ".") and sibling.endswith(".tmp"):
            candidate = os.path.join(directory, sibling)
            try:
                if os.lstat(candidate).st_ino == info.st_ino:
                    os.unlink(candidate)
            except OSError:
                continue
    return os.fstat(fd)


def open_file(path: str, flags: int, *, private: bool = False, create: bool = True, fifo: bool = False) -> int:
    """Open ``path`` in a queue directory with ``flags`` (no ``O_CREAT``/``O_TRUNC``); return the fd.

    With ``create`` a missing file is made exclusively (``O_EXCL``) with the
    mode :func:`file_mode` gives; an existing one is opened as it is.  A link,
    a non-regular file or a stranger's file raises ``SegqError`` naming it;
    a missing file with ``create=False`` raises ``FileNotFoundError``;
    other OS errors propagate.
    """
    flags |= _NOFOLLOW | _CLOEXEC
    parent = _parent_stat(path)
    created = False
    started = time.monotonic()
    try:
        while True:
            if create:
                try:
                    fd = os.open(path, flags | os.O_CREAT | os.O_EXCL, file_mode(parent.st_mode, private=private))
                    created = True
                    break
                except FileExistsError:
                    pass
            try:
                fd = os.open(path, flags)
                break
            except FileNotFoundError:
                if not create:
                    raise
                # Removed between our two opens: create it after all.
            except PermissionError:
                if not _being_created(path, file_mode(parent.st_mode, private=private), started):
                    raise
                time.sleep(0.001)
    except OSError as error:
        if error.errno in (errno.ELOOP, errno.EMLINK) or (error.errno == errno.ENXIO and os.path.islink(path)):
            raise SegqError(f"{path} is a symbolic link; {LINK_ADVICE}") from None
        raise
    try:
        expected = file_mode(parent.st_mode, private=private)
        if created:
            # The umask must not narrow a shared queue's files.
            os.fchmod(fd, expected)
            give_to_directory_owner(fd, parent)
        info = check_opened(fd, path, fifo=fifo, parent=parent)
        if private and not created and stat.S_IMODE(info.st_mode) & ~expected and info.st_uid == os.geteuid():
            # Made by an older segq (0644): a reader could open it, and so lock it.
            os.fchmod(fd, stat.S_IMODE(info.st_mode) & expected)
    except BaseException:
        os.close(fd)
        raise
    return fd


# How long an opener waits for another user's new file or directory to get its mode.
_CREATION_WAIT_SECONDS = 1.0


def _being_created(path: str, wanted: int, started: float) -> bool:
    """Tell whether ``path`` is another user's new file or directory that has not got its ``wanted`` mode bits yet.

    segq creates with a narrow mode (the umask's, or 0700 for a directory)
    and widens it with ``fchmod`` a moment later; a user coming in between is
    refused.  Such a caller waits (up to a second) instead of failing; a path
    whose mode is all there refuses it for good.
    """
    try:
        info = os.lstat(path)
    except OSError:
        return False
    return (
        info.st_uid != os.geteuid()
        and stat.S_IMODE(info.st_mode) & wanted != wanted
        and time.monotonic() - started < _CREATION_WAIT_SECONDS
    )


def open_to_read(path: str) -> int:
    """Open ``path`` read-only, never through a link (``SegqError``); a missing file raises ``FileNotFoundError``."""
    try:
        return os.open(path, os.O_RDONLY | _NOFOLLOW | _CLOEXEC)
    except OSError as error:
        if error.errno == errno.ELOOP:
            raise SegqError(f"{path} is a symbolic link; {LINK_ADVICE}") from None
        raise


def make_dir(queue_dir: str, *parts: str) -> str:
    """Create ``queue_dir/parts...`` one level at a time unless present; never through a link; return it.

    ``queue_dir`` itself is the caller's to name (it may be a link); each of
    ``parts`` must be a real directory.  A new one gets its parent's
    permission bits, whatever the umask.
    """
    path = queue_dir
    for part in parts:
        parent_info = os.stat(path)
        parent_mode = parent_info.st_mode
        path = os.path.join(path, part)
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            info = os.lstat(path)
            if stat.S_ISLNK(info.st_mode):
                raise SegqError(f"{path} is a symbolic link, not a directory; {LINK_ADVICE}") from None
            if not stat.S_ISDIR(info.st_mode):
                raise SegqError(f"{path} is a file, not a directory; remove it or move it out of the queue") from None
            if info.st_mode & 0o777 == 0o700 and parent_mode & 0o077:  # as another user's mkdir left it
                started = time.monotonic()
                while _being_created(path, stat.S_IMODE(parent_mode) & 0o777, started):
                    time.sleep(0.001)  # its make_dir is about to give it the parent's mode
        except OSError as error:
            raise SegqError(f"cannot create directory {path}: {error.strerror}") from None
        else:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | _NOFOLLOW | _CLOEXEC)
            try:
                give_to_directory_owner(fd, parent_info)
                os.fchmod(fd, stat.S_IMODE(parent_mode))
            finally:
                os.close(fd)
    return path


def fsync_directory(path: str | os.PathLike[str]) -> None:
    """Make the directory entries of ``path`` durable (creations, renames, deletions)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_temporary(path: str, fill: Callable[[int], None], *, durable: bool) -> str:
    """Create a new file beside ``path`` and have ``fill(fd)`` write it whole; sync it if ``durable``; return its name.

    The name is ``<path>.<8 hex digits>.tmp``: one a killed creator leaves
    behind is no file any reader opens.  On any error it is removed and the
    error propagates.
    """
    # os.urandom, not secrets: that module loads OpenSSL (3 MiB resident, issue 14).
    temporary = f"{path}.{os.urandom(4).hex()}.tmp"
    fd = open_file(temporary, os.O_RDWR)
    try:
        try:
            fill(fd)
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
    except BaseException:
        _unlink_quietly(temporary)
        raise
    return temporary


def link_into_place(temporary: str, path: str, *, durable: bool, new_directories: int = 0) -> bool:
    """Give the finished file ``temporary`` the name ``path`` unless it is taken; return whether it was.

    A link, unlike a rename, never replaces: of two processes creating the
    same file, the first wins and the other finds it (False).  The temporary
    name goes either way.  ``durable`` syncs the directory so the new name
    survives power loss, and as many directories above it as
    ``new_directories`` says were just created (their entries are new too).
    """
    try:
        try:
            os.link(temporary, path)
        except FileExistsError:
            return False
        if durable:
            directory = os.path.dirname(path) or "."
            for _ in range(1 + new_directories):
                fsync_directory(directory)
                directory = os.path.dirname(directory) or "."
        return True
    finally:
        _unlink_quietly(temporary)


def replace_into_place(temporary: str, path: str, *, durable: bool) -> None:
    """Give the finished file ``temporary`` the name ``path``, replacing the file that has it (one atomic rename).

    ``durable`` syncs the directory so the new name survives power loss.  On
    an error the temporary file is removed and the error propagates.
    """
    try:
        os.rename(temporary, path)
        if durable:
            fsync_directory(os.path.dirname(path) or ".")
    except BaseException:
        _unlink_quietly(temporary)
        raise


def create_whole(path: str, fill: Callable[[int], None], *, durable: bool, new_directories: int = 0) -> bool:
    """Create ``path`` whole or not at all: :func:`write_temporary`, then :func:`link_into_place`.

    Returns False, creating nothing, if ``path`` exists.  A full disk fails
    here (while ``fill`` writes or preallocates), never later.
    """
    temporary = write_temporary(path, fill, durable=durable)
    return link_into_place(temporary, path, durable=durable, new_directories=new_directories)


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
