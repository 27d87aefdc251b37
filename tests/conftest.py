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
