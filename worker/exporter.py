"""``ferry exporter``: Ferry's Prometheus metrics, read from Redis at every scrape.

Workers count into Redis (``worker.telemetry``), so one exporter serves the totals of every worker and
every pool process, and a worker restart loses nothing. Run one exporter per Redis; scraping two gives the
same numbers twice. Each series is described in docs/operations.md ("Prometheus metrics").
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Iterator
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import redis
from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from worker import telemetry

log = logging.getLogger("ferry.exporter")

#: counter name (as workers count it) -> (help text, label names)
COUNTERS: dict[str, tuple[str, tuple[str, ...]]] = {
    "transferred_bytes": (
        "Blob bytes streamed from a source registry to a destination registry, counted while they stream "
        "(a retried upload's bytes count again)",
        ("source_registry", "destination_registry"),
    ),
    "blobs": (
        "Blob tasks ended, by outcome: transferred, mounted, skipped (already there), failed, cancelled",
        ("outcome", "destination_registry"),
    ),
    "images": ("Images ended, by outcome: done, up-to-date, failed, cancelled", ("outcome",)),
    "blob_retries": (
        "Blob tasks re-queued after a temporary error, by destination registry and error class",
        ("registry", "reason"),
    ),
    "registry_throttled": ("HTTP 429 responses, by registry host", ("registry",)),
    "jobs": ("Jobs ended, by kind (copy, sync) and final state", ("kind", "state")),
}


class FerryCollector(Collector):
    """Builds every Ferry series from Redis when Prometheus scrapes."""

    def __init__(self, r: redis.Redis, queues: tuple[str, ...]) -> None:
        self.r = r
        self.queues = queues

    def collect(self) -> Iterator[Metric]:
        families = {
            name: CounterMetricFamily(f"ferry_{name}", help_text, labels=labels)
            for name, (help_text, labels) in COUNTERS.items()
        }
        buckets: dict[str, dict[str, float]] = defaultdict(dict)
        sums: dict[str, float] = defaultdict(float)
        for metric, labels, value in telemetry.counters(self.r):
            if metric in families:
                names = COUNTERS[metric][1]
                families[metric].add_metric([labels.get(n, "") for n in names], value)
            elif metric == "job_duration_bucket":
                buckets[labels.get("kind", "")][labels.get("le", "+Inf")] = value
            elif metric == "job_duration_sum":
                sums[labels.get("kind", "")] = value
        yield from families.values()
        yield self._durations(buckets, sums)
        yield from self._gauges()

    @staticmethod
    def _durations(buckets: dict[str, dict[str, float]], sums: dict[str, float]) -> Metric:
        hist = HistogramMetricFamily(
            "ferry_job_duration_seconds", "Seconds from a job's creation to its end", labels=("kind",)
        )
        for kind in sorted(set(buckets) | set(sums)):
            cumulative = 0.0
            rows: list[tuple[str, float]] = []
            for bound in [*(f"{b:g}" for b in telemetry.DURATION_BUCKETS), "+Inf"]:
                cumulative += buckets[kind].get(bound, 0.0)
                rows.append((bound, cumulative))
            hist.add_metric([kind], rows, sum_value=sums.get(kind, 0.0))
        return hist

    def _gauges(self) -> Iterator[Metric]:
        running = GaugeMetricFamily(
            "ferry_transfers_in_flight", "Blob transfers streaming now", labels=("destination_registry",)
        )
        inflight_bytes = GaugeMetricFamily(
            "ferry_transfer_bytes_in_flight",
            "Bytes of the current attempt of every running transfer",
            labels=("destination_registry",),
        )
        by_host: dict[str, list[int]] = defaultdict(lambda: [0, 0])
        for rec in telemetry.inflight(self.r):
            row = by_host[str(rec.get("destination_registry", ""))]
            row[0] += 1
            row[1] += int(rec.get("bytes", 0))
        for host, (n, nbytes) in sorted(by_host.items()):
            running.add_metric([host], n)
            inflight_bytes.add_metric([host], nbytes)
        yield running
        yield inflight_bytes
        pipe = self.r.pipeline(transaction=False)
        for q in self.queues:
            pipe.llen(q)
        pipe.hlen("unacked")
        lengths: list[Any] = pipe.execute()
        depth = GaugeMetricFamily("ferry_queue_length", "Tasks waiting in a Celery queue", labels=("queue",))
        for q, n in zip(self.queues, lengths, strict=False):
            depth.add_metric([q], float(n))
        yield depth
        yield GaugeMetricFamily(
            "ferry_tasks_unacknowledged",
            "Tasks delivered to a worker and not yet acknowledged (running, reserved or on a dead worker)",
            value=float(lengths[-1]),
        )


def make_registry(r: redis.Redis, queues: tuple[str, ...]) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(FerryCollector(r, queues))
    return registry


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # one line per scrape is noise
        log.debug(format, *args)


def serve(r: redis.Redis, queues: tuple[str, ...], address: str, port: int) -> None:
    """Serve ``/metrics`` (any path answers) until interrupted."""
    app = make_wsgi_app(make_registry(r, queues))
    server: WSGIServer = make_server(address, port, app, handler_class=_QuietHandler)
    log.info("serving Ferry metrics on http://%s:%d/metrics", address, port)
    try:
        server.serve_forever()
    finally:
        server.server_close()


__all__ = ["FerryCollector", "make_registry", "serve"]
