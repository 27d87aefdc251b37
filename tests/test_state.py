"""Cursor files: two checksummed slots, written alternately; a torn slot falls back."""

from __future__ import annotations

import pathlib

import pytest

import segq
from segq._state import CursorFile, Position


def test_a_cursor_round_trips_and_alternates_slots(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "cursors" / "r.x.pos"
    cursor = CursorFile(path, initial=Position(0, 32))
    for offset in range(33, 40):
        cursor.write(Position(1, offset))
    cursor.close()
    assert CursorFile(path).position == Position(1, 39)


@pytest.mark.parametrize("damaged_slot", [0, 1])
def test_a_damaged_slot_falls_back_to_the_other(tmp_path: pathlib.Path, damaged_slot: int) -> None:
    path = tmp_path / "r.x.pos"
    cursor = CursorFile(path, initial=Position(0, 32))
    cursor.write(Position(0, 100))  # sequence 2: slot 0
    cursor.write(Position(0, 200))  # sequence 3: slot 1
    cursor.close()
    data = bytearray(path.read_bytes())
    data[damaged_slot * 512 + 30] ^= 0xFF
    path.write_bytes(bytes(data))
    expected = Position(0, 200) if damaged_slot == 0 else Position(0, 100)
    assert CursorFile(path).position == expected


def test_every_torn_write_leaves_the_old_or_the_new_position(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "r.x.pos"
    cursor = CursorFile(path, initial=Position(0, 32))
    cursor.write(Position(0, 100))
    cursor.close()
    before = path.read_bytes()
    cursor = CursorFile(path)
    cursor.write(Position(5, 999))
    cursor.close()
    after = path.read_bytes()
    for cut in range(len(before) + 1):
        path.write_bytes(after[:cut] + before[cut:])  # the write got only so far
        assert CursorFile(path).position in (Position(0, 100), Position(5, 999))


def test_a_wrong_sized_cursor_is_a_corruption_error(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "r.x.pos"
    path.write_bytes(b"\0" * 100)
    with pytest.raises(segq.CorruptionError, match="100 bytes"):
        CursorFile(path)
