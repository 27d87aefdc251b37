"""segq.metrics: the prometheus_client collector, scraped through a real registry."""

from __future__ import annotations

import pathlib

import pytest

import segq
import segq.metrics

prometheus_client = pytest.importorskip("prometheus_client")


def test_one_register_call_exposes_backlogs_group_stats_and_dead_letters(tmp_path: pathlib.Path) -> None:
    jobs, mail = tmp_path / "jobs", tmp_path / "mail"
    with segq.Sender(jobs, segment_size=1 << 16) as tx:
        for index in range(5):
            tx.enqueue(b"job %d" % index, priority=index)
        tx.enqueue(b"later", delay=3600)
    with segq.Sender(mail, segment_size=1 << 16) as tx:
        tx.send(b"hello")
    with segq.Receiver(mail, name="mailer"):
        pass
    with segq.WorkQueue(jobs, max_attempts=1) as wq:
        wq.claim(timeout=1).ack()
        wq.claim(timeout=1).nack(reason="poison")
        held = wq.claim(timeout=1)
        registry = prometheus_client.CollectorRegistry()
        collector = segq.metrics.register(jobs, mail, tmp_path / "missing", registry=registry)
        value = registry.get_sample_value
        labels = {"queue": str(jobs), "group": "default"}
        assert value("segq_group_jobs", {**labels, "state": "pending"}) == 2
        assert value("segq_group_jobs", {**labels, "state": "scheduled"}) == 1
        assert value("segq_group_jobs", {**labels, "state": "claimed"}) == 1
        assert value("segq_group_jobs_done_total", labels) == 1
        assert value("segq_group_jobs_dead_total", labels) == 1
        assert value("segq_dead_letters_pending", labels) == 1
        assert value("segq_backlog_records", {"queue": str(mail), "kind": "receiver", "consumer": "mailer"}) == 1
        assert value("segq_backlog_bytes", {"queue": str(mail), "kind": "receiver", "consumer": "mailer"}) > 0
        assert value("segq_scrape_errors", {"queue": str(tmp_path / "missing")}) == 1
        assert b"segq_group_jobs{" in prometheus_client.generate_latest(registry)
        registry.unregister(collector)
        held.ack()
