"""Which workers holding claims are dead: pidfds on Linux, PID polling elsewhere.

Theory of operation
-------------------
A claim's owner is ``(PID, process start time)``: a PID reused by a newer
process is a different owner, which is dead.  On Linux a claimer opens a
pidfd for each owner it sees (and checks the start time once, right after,
so the pidfd names the owner and not a newcomer on its PID).  A pidfd becomes
readable when its process ends, so one ``poll`` with a zero timeout tells of
every death at once, and a waiting claimer polls the same descriptors to
wake the instant a holder dies.  Without pidfds each owner is checked with
psutil at most every 0.2 s.
"""

from __future__ import annotations

import math
import os
import select
import time
from typing import Collection, Iterable

from ._lock import process_is_alive, process_start_time

__all__ = ["Owner", "Liveness", "my_owner"]

Owner = tuple[int, float]  # PID and process start time: a reused PID is another owner
_POLL_INTERVAL = 0.2


def my_owner() -> Owner:
    """Return this process's owner identity."""
    pid = os.getpid()
    return pid, process_start_time(pid) or 0.0


class Liveness:
    """Watches owners' processes; not thread-safe (use under the group's thread lock)."""

    def __init__(self) -> None:
        self._fds: dict[Owner, int] = {}
        self._owner_of: dict[int, Owner] = {}
        self._dead: set[Owner] = set()
        self._checked: dict[Owner, float] = {}  # without pidfds: when each owner was last checked
        self._poll = select.poll()
        self._pidfd = hasattr(os, "pidfd_open")

    def _watch(self, owner: Owner) -> None:
        pid, started = owner
        try:
            fd = os.pidfd_open(pid)
        except ProcessLookupError:
            self._dead.add(owner)
            return
        except OSError:
            self._pidfd = False  # no pidfds here (old kernel, seccomp): poll PIDs instead
            return
        if not process_is_alive(pid, started or None):  # 0.0: its start time was unknown
            os.close(fd)
            self._dead.add(owner)
            return
        self._fds[owner] = fd
        self._owner_of[fd] = owner
        self._poll.register(fd, select.POLLIN)

    def dead_among(self, owners: Iterable[Owner], me: Owner) -> set[Owner]:
        """Return the owners among ``owners`` (``me`` excepted) whose process has ended."""
        owners = list(owners)
        for owner in owners:
            if owner == me or owner in self._fds or owner in self._dead:
                continue
            if self._pidfd:
                self._watch(owner)
            if not self._pidfd:
                now = time.monotonic()
                if now - self._checked.get(owner, -math.inf) >= _POLL_INTERVAL:
                    self._checked[owner] = now
                    if not process_is_alive(owner[0], owner[1] or None):
                        self._dead.add(owner)
        if self._fds:
            for fd, _ in self._poll.poll(0):
                self._bury(fd)
        return {owner for owner in owners if owner in self._dead}

    def _bury(self, fd: int) -> None:
        owner = self._owner_of.pop(fd)
        del self._fds[owner]
        self._poll.unregister(fd)
        os.close(fd)
        self._dead.add(owner)

    def forget(self, keep: Collection[Owner]) -> None:
        """Stop watching owners not in ``keep`` (they hold no claim any more)."""
        for owner in [owner for owner in self._fds if owner not in keep]:
            fd = self._fds.pop(owner)
            del self._owner_of[fd]
            self._poll.unregister(fd)
            os.close(fd)
        self._dead = {owner for owner in self._dead if owner in keep}
        self._checked = {owner: at for owner, at in self._checked.items() if owner in keep}

    def fds(self) -> list[int]:
        """Return the pidfds being watched (readable when their process ends)."""
        return list(self._fds.values())

    def close(self) -> None:
        self.forget(())
