"""segq: a durable, append-only, segmented file queue.

Senders append checksummed records to size-bounded segment files; receivers
keep their position in a small metadata file and commit what they handled.
See ``README.md`` for the guarantees and ``docs/format.md`` for the bytes.
"""

from . import errors
from ._state import Position
from .errors import (
    ClaimLost,
    Closed,
    CorruptionError,
    DuplicateJobId,
    Empty,
    Full,
    InvalidArgument,
    Locked,
    RecordTooLarge,
    SegqError,
    UnsupportedFormat,
    UsageError,
)
from .receiver import Batch, Message, Receiver
from .sender import Sender

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from . import recovery
    from .aio import AsyncBatch, AsyncJob, AsyncJobBatch, AsyncMessage, AsyncReceiver, AsyncSender, AsyncWorkQueue
    from ._followups import Enqueue
    from ._options import Enqueued
    from .worker import arun_worker, run_worker
    from .workqueue import DeadLetter, GroupStats, Job, JobBatch, WorkQueue

__all__ = [
    "Sender",
    "Receiver",
    "Message",
    "Batch",
    "Position",
]
__all__ += errors.__all__  # every error class, as errors.py lists them
__all__ += [
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
    "Enqueue",
    "run_worker",
    "arun_worker",
]

__version__ = "0.1.0"

# Loaded on first use, so `import segq` costs no asyncio, work queue or
# recovery code (issue 14): name -> the submodule that defines it.
_LAZY = {
    "WorkQueue": "workqueue",
    "Job": "workqueue",
    "JobBatch": "workqueue",
    "DeadLetter": "workqueue",
    "GroupStats": "workqueue",
    "Enqueued": "_options",
    "recovery": "recovery",
    "nats": "nats",  # the NATS JetStream bridge; needs the nats extra only when a bridge starts
    "AsyncSender": "aio",
    "AsyncReceiver": "aio",
    "AsyncMessage": "aio",
    "AsyncBatch": "aio",
    "AsyncWorkQueue": "aio",
    "AsyncJob": "aio",
    "AsyncJobBatch": "aio",
    "Enqueue": "_followups",
    "run_worker": "worker",
    "arun_worker": "worker",
}


def __getattr__(name: str) -> Any:
    """Import a lazily loaded public name on first access, then keep it."""
    module_name = _LAZY.get(name)
    if module_name is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    module = importlib.import_module(f"{__name__}.{module_name}")
    value = module if name == module_name else getattr(module, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
