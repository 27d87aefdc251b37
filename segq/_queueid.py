"""A queue's identity: a random id made once, kept in ``QUEUE/segq.id``.

Theory of operation
-------------------
Something outside the queue directory sometimes has to tell this queue's
records from every other queue's: ``segq forward`` names each record it
publishes by (queue id, record position), and finds out from the stream what
already landed by looking for its queue id.  Positions alone are not enough
(every queue has a record at segment 0, offset 32); the path is not either (a
queue deleted and made again at the same path is another queue).

The id is 16 random bytes written as 32 lowercase hex digits and a newline.
It is made on first use, never changed: written whole to a temporary file
opened with ``O_CREAT | O_EXCL | O_NOFOLLOW`` (a planted file or symlink is
refused, not followed), synced, then hard-linked to ``segq.id``.  ``link``
fails if the name exists, so two processes making the id at once agree on
the first one linked, and a crash at any instant leaves either no
``segq.id`` or a complete one (plus, at worst, a stray ``.tmp`` file, which
the queue ignores).  It gets the permissions and owner of the queue's other
readable files (``_fs``), and is read back through ``_fs``'s checks (no
link, a regular file of an owner who may write the queue).  Deleting the
queue directory deletes the id with it.
"""

from __future__ import annotations

import os
import secrets

from ._fs import check_opened, create_whole, open_to_read
from ._segment import StrPath
from .errors import SegqError

__all__ = ["QUEUE_ID_NAME", "queue_id"]

QUEUE_ID_NAME = "segq.id"
_ID_HEX_DIGITS = 32
_HEX = frozenset("0123456789abcdef")


def queue_id(path: StrPath) -> str:
    """Return the queue's id (32 hex digits), making ``segq.id`` if the queue has none yet.

    Raises ``SegqError`` naming the file if it exists but is not a valid id
    (or is a symlink).
    """
    queue_dir = os.fspath(path)
    id_path = os.path.join(queue_dir, QUEUE_ID_NAME)
    existing = _read(id_path)
    if existing is not None:
        return existing
    made = secrets.token_hex(_ID_HEX_DIGITS // 2)

    def fill(fd: int) -> None:
        os.write(fd, f"{made}\n".encode())

    # Readable by whoever may read the queue, like its segments (docs/security.md):
    # _fs gives it the directory's owner and mode.  Another process may make it
    # first: theirs is the id.
    create_whole(id_path, fill, durable=True)
    found = _read(id_path)
    if found is None:
        raise SegqError(f"{id_path}: vanished right after it was made; is something cleaning {queue_dir}?")
    return found


def _read(id_path: str) -> str | None:
    """Return the id stored at ``id_path``, None if there is no such file."""
    try:
        fd = open_to_read(id_path)
    except FileNotFoundError:
        return None
    except OSError as error:
        raise SegqError(f"{id_path}: cannot open the queue id ({error.strerror})") from None
    try:
        check_opened(fd, id_path)
        content = os.read(fd, 64)
    finally:
        os.close(fd)
    text = content.decode("ascii", "replace")
    if len(text) != _ID_HEX_DIGITS + 1 or not text.endswith("\n") or not set(text[:-1]) <= _HEX:
        raise SegqError(
            f"{id_path}: not a queue id (expected {_ID_HEX_DIGITS} hex digits and a newline, "
            f"found {content[:40]!r}); remove the file only if nothing was forwarded from this queue yet"
        )
    return text[:-1]
