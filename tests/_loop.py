"""Helpers shared by the asyncio tests (test_aio.py, test_aio_workqueue.py)."""

from __future__ import annotations

import asyncio
import os
import pathlib
import subprocess
import sys
from collections.abc import Callable

from segq._control import DATA_WAITERS, SLOT_COUNT

REPO = pathlib.Path(__file__).resolve().parent.parent
PATIENCE = 30.0  # seconds: how long a test waits for something that should take microseconds


def child(script: str, *args: object, stdout: int | None = None) -> subprocess.Popen[bytes]:
    """Run ``script`` in a fresh interpreter that imports this checkout's segq."""
    environment = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.Popen([sys.executable, "-c", script, *map(str, args)], env=environment, stdout=stdout)


async def eventually(condition: Callable[[], bool], what: str) -> None:
    """Let the loop run until ``condition()`` holds; fail after PATIENCE seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + PATIENCE
    while not condition():
        if loop.time() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        await asyncio.sleep(0.002)


def count_raised(control_map: object, region: int = DATA_WAITERS) -> int:
    """Count the waiter flags raised on ``region`` of a control map."""
    return sum(control_map[region : region + SLOT_COUNT])  # type: ignore[index]
