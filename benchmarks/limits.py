"""Measure the raw-file baselines ("limits") that queue rates are compared with.

Each function writes or reads the same bytes a queue would for ``n`` records of
``size`` bytes, and returns the elapsed seconds of the timed part only.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from .config import CHUNK

#: Report names of the limits, used as the "library" of limit rows.
WRITE_LOOP = "os.write loop"
READ_LOOP = "os.read loop"
WRITE_CHUNKS = "os.write 1 MiB"
READ_CHUNKS = "os.read 1 MiB"
FDATASYNC_LOOP = "os.write+fdatasync loop"
CREATE_FILE = "os.open(O_CREAT)+write"
BARE_PYTHON = "python -c pass"

_FILE = "limit.dat"


def write_loop(directory: Path, n: int, size: int, *, fdatasync: bool = False) -> float:
    """Time ``n`` ``os.write`` calls of one record each (each followed by fdatasync if asked)."""
    payload = b"x" * size
    fd = os.open(directory / _FILE, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    write, sync = os.write, os.fdatasync
    try:
        start = time.perf_counter()
        if fdatasync:
            for _ in range(n):
                write(fd, payload)
                sync(fd)
        else:
            for _ in range(n):
                write(fd, payload)
        return time.perf_counter() - start
    finally:
        os.close(fd)


def create_and_write(directory: Path, n: int, size: int) -> list[float]:
    """Time creating ``n`` new files and writing one record to each; return the seconds of each."""
    payload = b"x" * size
    times = []
    for i in range(n):
        start = time.perf_counter()
        fd = os.open(directory / f"{_FILE}.{i}", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            os.write(fd, payload)
            times.append(time.perf_counter() - start)
        finally:
            os.close(fd)
    return times


def read_loop(directory: Path, n: int, size: int) -> float:
    """Time ``n`` ``os.read`` calls of one record each from the file ``write_loop`` made."""
    fd = os.open(directory / _FILE, os.O_RDONLY)
    read = os.read
    try:
        start = time.perf_counter()
        for _ in range(n):
            read(fd, size)
        return time.perf_counter() - start
    finally:
        os.close(fd)


def write_chunks(directory: Path, n: int, size: int) -> float:
    """Time writing ``n * size`` bytes in ``CHUNK``-sized ``os.write`` calls."""
    total = n * size
    chunk = b"x" * CHUNK
    fd = os.open(directory / _FILE, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        start = time.perf_counter()
        left = total
        while left > 0:
            left -= os.write(fd, chunk if left >= CHUNK else chunk[:left])
        return time.perf_counter() - start
    finally:
        os.close(fd)


def read_chunks(directory: Path) -> float:
    """Time reading the whole file ``write_chunks`` made in ``CHUNK``-sized ``os.read`` calls."""
    fd = os.open(directory / _FILE, os.O_RDONLY)
    try:
        start = time.perf_counter()
        while os.read(fd, CHUNK):
            pass
        return time.perf_counter() - start
    finally:
        os.close(fd)
