"""Prometheus metrics for segq queues and work-queue groups (``pip install 'segq[metrics]'``).

One call exposes them::

    import prometheus_client, segq.metrics
    segq.metrics.register("/var/spool/jobs", "/var/spool/mail")
    prometheus_client.start_http_server(9108)

Each scrape takes a read-only snapshot of every queue (``segq.recovery.info``
and the groups' ``GroupStats``), as ``segq info`` does, while senders,
receivers and workers run.  A queue that cannot be read is skipped and
counted in ``segq_scrape_errors``; the scrape never raises.

=================================== ====== ==========================================
metric                              type   labels
=================================== ====== ==========================================
``segq_backlog_bytes``              gauge  queue, kind (receiver/group), consumer
``segq_backlog_records``            gauge  queue, kind, consumer
``segq_segments``                   gauge  queue
``segq_bytes_on_disk``              gauge  queue
``segq_group_jobs``                 gauge  queue, group, state (pending/scheduled/claimed/retrying)
``segq_group_jobs_done_total``      counter queue, group
``segq_group_jobs_dead_total``      counter queue, group (dead-lettered)
``segq_dead_letters_pending``       gauge  queue, group (letters not yet read back)
``segq_group_oldest_pending_age``   gauge  queue, group (seconds; absent when none is pending)
``segq_scrape_errors``              gauge  queue (1 when the last scrape of it failed)
=================================== ====== ==========================================

The core never imports this module (nor ``prometheus_client``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import REGISTRY, CollectorRegistry

from ._segment import StrPath
from ._inspect import info
from .errors import SegqError

__all__ = ["SegqCollector", "register"]

log = logging.getLogger(__name__)


class SegqCollector:
    """A prometheus_client collector for the queues at ``paths`` (and every group of each).

    ``count_records`` (default True) counts each consumer's backlog records
    with a checksummed scan of the backlog at every scrape (``segq info
    --scan``); False keeps a scrape O(segments) and leaves
    ``segq_backlog_records`` out.
    """

    def __init__(self, paths: Iterable[StrPath], *, count_records: bool = True) -> None:
        self.paths = [os.fspath(path) for path in paths]
        self.count_records = count_records

    def describe(self) -> list[Metric]:
        """Return nothing: the metrics are only known at scrape time (no collection at registration)."""
        return []

    def collect(self) -> Iterator[Metric]:
        """Take a snapshot of every queue and yield its metrics."""
        backlog_bytes = GaugeMetricFamily(
            "segq_backlog_bytes", "Bytes a consumer has not committed.", labels=["queue", "kind", "consumer"]
        )
        backlog_records = GaugeMetricFamily(
            "segq_backlog_records", "Records a consumer has not committed.", labels=["queue", "kind", "consumer"]
        )
        segments = GaugeMetricFamily("segq_segments", "Segment files of the queue.", labels=["queue"])
        disk = GaugeMetricFamily("segq_bytes_on_disk", "Bytes the queue directory takes on disk.", labels=["queue"])
        jobs = GaugeMetricFamily(
            "segq_group_jobs", "Jobs of a work-queue group by state.", labels=["queue", "group", "state"]
        )
        done = CounterMetricFamily("segq_group_jobs_done", "Jobs acked by a work-queue group.", labels=["queue", "group"])
        dead = CounterMetricFamily(
            "segq_group_jobs_dead", "Jobs a work-queue group sent to its dead-letter queue.", labels=["queue", "group"]
        )
        letters = GaugeMetricFamily(
            "segq_dead_letters_pending", "Dead letters not yet read back.", labels=["queue", "group"]
        )
        age = GaugeMetricFamily(
            "segq_group_oldest_pending_age", "Seconds the oldest pending job has waited.", labels=["queue", "group"]
        )
        errors = GaugeMetricFamily("segq_scrape_errors", "1 if the last scrape of the queue failed.", labels=["queue"])
        for path in self.paths:
            try:
                snapshot = info(path, scan=self.count_records)
            except (SegqError, OSError) as error:
                log.warning("segq metrics: cannot read %s: %s", path, error)
                errors.add_metric([path], 1)
                continue
            errors.add_metric([path], 0)
            segments.add_metric([path], len(snapshot.segments))
            disk.add_metric([path], snapshot.bytes_on_disk)
            for consumer in snapshot.consumers:
                labels = [path, consumer.kind, consumer.name]
                backlog_bytes.add_metric(labels, consumer.backlog_bytes)
                if consumer.backlog_records is not None:
                    backlog_records.add_metric(labels, consumer.backlog_records)
            for group in snapshot.groups:
                name = str(group["group"])
                stats = group.get("stats") or {}
                for state in ("pending", "scheduled", "claimed", "retrying"):
                    jobs.add_metric([path, name, state], stats.get(state, 0))
                done.add_metric([path, name], stats.get("done", 0))
                dead.add_metric([path, name], stats.get("dead", 0))
                letters.add_metric([path, name], group.get("dead_letters_pending", 0))
                if stats.get("oldest_pending_age") is not None:
                    age.add_metric([path, name], stats["oldest_pending_age"])
        yield from (backlog_bytes, backlog_records, segments, disk, jobs, done, dead, letters, age, errors)


def register(*paths: StrPath, registry: CollectorRegistry = REGISTRY, count_records: bool = True) -> SegqCollector:
    """Expose the metrics of the queues at ``paths`` through ``registry`` (default: the global one).

    Returns the collector; ``registry.unregister(collector)`` removes it.
    ``count_records``: see :class:`SegqCollector`.
    """
    collector = SegqCollector(paths, count_records=count_records)
    registry.register(collector)
    return collector
