"""Shared fixtures: a fresh queue directory per test."""

from __future__ import annotations

import pathlib

import pytest


@pytest.fixture
def queue_dir(tmp_path: pathlib.Path) -> pathlib.Path:
    """Return a path for a queue that does not exist yet."""
    return tmp_path / "queue"


@pytest.fixture
def no_safety_net(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make a lost wake-up hang instead of costing a second: only a real wake-up can end an async wait."""
    import segq.aio

    monkeypatch.setattr(segq.aio, "_SAFETY_SECONDS", 3600.0)


# -- leaving /tmp and /dev/shm as we found them -------------------------------------
#
# pytest's tmp_path and every child process's temporary files (they inherit
# TMPDIR) go under one run directory, removed at the end: /tmp keeps no trace
# of the run.  This process keeps its own tempfile directory (fixed below,
# before TMPDIR changes): multiprocessing removes its files there at exit,
# after the run directory is gone.  Append semaphores are named for their
# queue directory's device and inode (segq._control.semaphore_prefix), so a
# leak of *this* run is told apart from other runs on the machine by the
# prefixes of the queues this run used: those opened in this process, and
# every directory under the run directory at the end (children's queues).

import os as _os
import shutil as _shutil
import tempfile as _tempfile

_tempfile.gettempdir()  # cached now, so TMPDIR below only reaches pytest's basetemp and the children
_RUN_DIR = ""
_USED_PREFIXES: set[str] = set()


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    global _RUN_DIR
    _RUN_DIR = _tempfile.mkdtemp(prefix="segq-tests-")
    _os.chmod(_RUN_DIR, 0o755)  # tests running a child as another user must reach their queues
    _os.environ["TMPDIR"] = _RUN_DIR
    if config.option.basetemp is None:
        config.option.basetemp = _os.path.join(_RUN_DIR, "pytest")


def pytest_unconfigure(config: pytest.Config) -> None:
    if _RUN_DIR:
        _shutil.rmtree(_RUN_DIR, ignore_errors=True)


def _shm_names() -> set[str]:
    try:
        return {name for name in _os.listdir("/dev/shm") if name.startswith("sem.segq-")}
    except OSError:
        return set()


@pytest.fixture(scope="session", autouse=True)
def _no_leaks_in_tmp_or_shm() -> object:
    """Fail the run if it leaves append semaphores of its queues in /dev/shm; remove the run directory."""
    from segq import _control

    original = _control.semaphore_prefix

    def recording_prefix(queue_dir: object) -> str:
        prefix = original(queue_dir)  # type: ignore[arg-type]
        _USED_PREFIXES.add(prefix[1:])
        return prefix

    before = _shm_names()
    _control.semaphore_prefix = recording_prefix  # type: ignore[assignment]
    try:
        yield
    finally:
        _control.semaphore_prefix = original
    for directory, _, _ in _os.walk(_RUN_DIR):
        info = _os.stat(directory)
        _USED_PREFIXES.add(f"segq-{info.st_dev:x}.{info.st_ino:x}-")
    leaked = sorted(
        name for name in _shm_names() - before if any(name[len("sem.") :].startswith(p) for p in _USED_PREFIXES)
    )
    if leaked:
        pytest.fail(f"the run left {len(leaked)} append semaphore(s) of its queues in /dev/shm: {leaked[:5]}")
