"""Shared fixtures: a fresh queue directory per test."""

from __future__ import annotations

import pathlib

import pytest


@pytest.fixture
def queue_dir(tmp_path: pathlib.Path) -> pathlib.Path:
    """Return a path for a queue that does not exist yet."""
    return tmp_path / "queue"
