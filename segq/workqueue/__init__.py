"""The work queue: competing consumers with leases, retries and dead letters (``docs/workqueue.md``).

Modules, each importing only from those above it:

- ``_journal``: the group journal's bytes (header, entries, compaction files);
- ``_claims``: a group's state as data (``GroupState``, ``TRANSITIONS``) and journal replay;
- ``_grouplock``: the group's directory and its cross-process lock;
- ``_group``: ``GroupHandle``, the group transaction (lock, catch up, append, compact, cursor);
- ``_deadletter``: the dead-letter envelope and ``DeadLetterSender``;
- ``_index``: ``ClaimIndex``, which record a claim takes next (priority, run_at), per process;
- ``_stats``: ``GroupStats``;
- ``_jobs``: ``Job`` and ``JobBatch`` as a worker holds them (``JOB_TRANSITIONS``);
- ``_admin``: groups from the outside (list, info, recover, requeue dead letters, remove);
- ``_queue``: ``WorkQueue``, the claim and settle policy.
"""

from ._admin import (
    GroupRecovery,
    group_info,
    list_groups,
    read_group_stats,
    recover_group,
    recover_groups,
    remove_group,
    requeue_dead,
)
from ._claims import TRANSITIONS, Event, RecordState
from ._deadletter import DeadLetter, dead_letter_path
from ._jobs import JOB_TRANSITIONS, Job, JobBatch, JobState
from ._queue import WorkQueue
from ._stats import GroupStats

__all__ = [
    "WorkQueue",
    "GroupStats",
    "Job",
    "JobBatch",
    "JobState",
    "JOB_TRANSITIONS",
    "RecordState",
    "Event",
    "TRANSITIONS",
    "DeadLetter",
    "GroupRecovery",
    "dead_letter_path",
    "list_groups",
    "group_info",
    "read_group_stats",
    "recover_group",
    "recover_groups",
    "remove_group",
    "requeue_dead",
]
