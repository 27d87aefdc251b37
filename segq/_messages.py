"""Received messages' fields, and building many of them from a read buffer in one call.

A message is five fields: ``data``, ``_headers`` (unset for a record without
headers), ``_receiver`` (who settles it), and ``_start``/``_end``, the
position words of its record.  ``MessageFields`` holds them; the class with
the methods (``segq.receiver.Message``) subclasses it.  With the C speedups
it is a C type and ``decode_messages`` walks a buffer and builds the messages
in C, about 40 ns a record instead of a Python ``__init__`` each; the Python
twins below behave the same (SEGQ_PURE_PYTHON=1 forces them).
"""

from __future__ import annotations

import importlib
import os
from typing import TYPE_CHECKING, Any, Callable

from ._format import HEADER_SIZE, read_record

__all__ = ["MessageFields", "new_message", "decode_messages"]


class _PyMessageFields:
    __slots__ = ("data", "_headers", "_receiver", "_start", "_end")

    data: bytes
    _headers: dict[str, bytes]
    _receiver: Any
    _start: int
    _end: int


def _new_message(cls: type, owner: object, data: bytes, start: int, end: int) -> Any:
    """Return a ``cls`` with its fields set (``_headers`` left unset); no ``__init__`` runs."""
    message: Any = object.__new__(cls)
    message.data = data
    message._receiver = owner
    message._start = start
    message._end = end
    return message


def _decode_messages(
    buffer: bytes, offset: int, max_count: int, cls: type, owner: object, base_word: int
) -> tuple[list[Any], int, int]:
    """Return messages of up to ``max_count`` intact records from ``offset``, the offset after them, and how many have headers."""
    messages: list[Any] = []
    framed = 0
    while len(messages) < max_count:
        payload = read_record(buffer, offset)
        if payload is None:
            break
        if type(payload) is not bytes:
            framed += 1
        end = offset + HEADER_SIZE + len(payload)
        messages.append(_new_message(cls, owner, payload, base_word + offset, base_word + end))
        offset = end
    return messages, offset, framed


MessageFields = _PyMessageFields
new_message: Callable[[type, object, bytes, int, int], Any] = _new_message
decode_messages: Callable[[bytes, int, int, type, object, int], tuple[list[Any], int, int]] = _decode_messages
# mypy checks the Python twin (the C type has the same fields).
if not TYPE_CHECKING and not os.environ.get("SEGQ_PURE_PYTHON"):
    try:
        _speedups = importlib.import_module(f"{__package__}._speedups")
    except ImportError:
        pass
    else:
        MessageFields = _speedups.MessageFields
        new_message = _speedups.new_message
        decode_messages = _speedups.decode_messages
