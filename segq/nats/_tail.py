"""Find the newest record a puller sent into a queue: where ``pull`` resumes.

The queue is read newest segment first, each segment from its start to its
end (records are only linked forwards), keeping the last record whose
headers name the stream.  Usually the newest segment holds it, so this
reads at most one segment; it reads older ones only when other senders
filled whole segments since.  Segments the queue's receivers consumed are
deleted, but never the one holding the tail, so the newest pulled record
is there unless other senders' records filled a segment after it and every
receiver consumed that.
"""

from __future__ import annotations

import logging

from .._control import Control
from .._headers import split_body
from .._reader import RecordReader
from .._segment import list_segments
from .._state import Position, word_segment
from ..errors import SegqError

__all__ = ["last_pulled"]

log = logging.getLogger("segq.nats")


def last_pulled(queue_dir: str, stream: str, stream_header: str, sequence_header: str) -> int:
    """Return the stream sequence of the newest record pulled from ``stream`` into the queue, 0 if none."""
    control = Control(queue_dir)
    try:
        wanted = stream.encode()
        for number in reversed(list_segments(queue_dir)):
            reader = RecordReader(control, Position.bottom(number).word, consumer="pull")
            found: int | None = None
            try:
                while word_segment(reader.position) == number:
                    record = _next_with_headers(reader)
                    if record is None:
                        break
                    headers = record[1]
                    if headers.get(stream_header) == wanted and headers.get(sequence_header, b"").isdigit():
                        found = int(headers[sequence_header])
            except SegqError as error:
                # A segment deleted meanwhile was consumed and older than what we look for.
                log.debug("pull: reading %s for the last pulled record: %s", queue_dir, error)
            finally:
                reader.close()
            if found is not None:
                return found
        return 0
    finally:
        control.close()


def _next_with_headers(reader: RecordReader) -> tuple[bytes, dict[str, bytes]] | None:
    """Return the next record's data and headers, or None at the end of what is there."""
    start = reader.position
    body = reader.next()
    if body is None:
        return None
    if type(body) is bytes:
        return body, {}
    return split_body(body, reader.path, start)
