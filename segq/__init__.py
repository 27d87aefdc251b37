"""segq: a durable, append-only, segmented file queue.

Senders append checksummed records to size-bounded segment files; receivers
keep their position in a small metadata file and commit what they handled.
See ``README.md`` for the guarantees and ``docs/format.md`` for the bytes.
"""

from ._state import Position
from .errors import (
    ClaimLost,
    Closed,
    CorruptionError,
    DuplicateJobId,
    InvalidArgument,
    Empty,
    Full,
    Locked,
    RecordTooLarge,
    SegqError,
    UnsupportedFormat,
    UsageError,
)
from .receiver import Batch, Message, Receiver
from .sender import Sender
from .workqueue import DeadLetter, GroupStats, Job, JobBatch, WorkQueue
from ._options import Enqueued
from .aio import AsyncBatch, AsyncJob, AsyncJobBatch, AsyncMessage, AsyncReceiver, AsyncSender, AsyncWorkQueue

__all__ = [
    "Sender",
    "Receiver",
    "Message",
    "Batch",
    "Position",
    "SegqError",
    "Empty",
    "Full",
    "Locked",
    "RecordTooLarge",
    "CorruptionError",
    "UnsupportedFormat",
    "UsageError",
    "Closed",
    "ClaimLost",
    "InvalidArgument",
    "DuplicateJobId",
    "Enqueued",
    "GroupStats",
    "WorkQueue",
    "Job",
    "JobBatch",
    "DeadLetter",
    "recovery",
    "AsyncSender",
    "AsyncReceiver",
    "AsyncMessage",
    "AsyncBatch",
    "AsyncWorkQueue",
    "AsyncJob",
    "AsyncJobBatch",
]

__version__ = "0.1.0"

from . import recovery  # noqa: E402  (segq.recovery, the public recovery module)
