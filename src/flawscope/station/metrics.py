"""Prometheus metrics of one service (prometheus-client, a registry of its own).

``flawscope_requests_total{method,route,status}``, ``flawscope_request_seconds{route}``,
``flawscope_verdicts_total{model,verdict}``, ``flawscope_queue_depth`` (requests waiting or
running), ``flawscope_record_queue_depth`` (batches waiting for the record writer),
``flawscope_db_write_seconds`` (one commit), ``flawscope_records_total``,
``flawscope_images_kept_total`` / ``flawscope_images_kept_bytes_total`` (new files).
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

__all__ = ["CONTENT_TYPE_LATEST", "ServiceMetrics"]

_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_DB = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 5)


class ServiceMetrics:
    """The metrics of one app; :meth:`render` is the ``/metrics`` body."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("flawscope_requests", "HTTP requests answered",
                                ["method", "route", "status"], registry=r)
        self.latency = Histogram("flawscope_request_seconds", "HTTP request latency",
                                 ["route"], buckets=_LATENCY, registry=r)
        self.verdicts = Counter("flawscope_verdicts", "verdicts answered",
                                ["model", "verdict"], registry=r)
        self.queue_depth = Gauge("flawscope_queue_depth",
                                 "inspection requests waiting or running", registry=r)
        self.record_queue = Gauge("flawscope_record_queue_depth",
                                  "request batches waiting for the record writer", registry=r)
        self.db_write = Histogram("flawscope_db_write_seconds",
                                  "one record commit (several requests each)",
                                  buckets=_DB, registry=r)
        self.records = Counter("flawscope_records", "inspection records committed",
                               registry=r)
        self.images = Counter("flawscope_images_kept", "image files kept (new)", registry=r)
        self.image_bytes = Counter("flawscope_images_kept_bytes",
                                   "bytes of image files kept (new)", registry=r)

    def watch_queues(self, pending: Callable[[], float],
                     records: Callable[[], float] | None = None) -> None:
        self.queue_depth.set_function(pending)
        if records is not None:
            self.record_queue.set_function(records)

    def on_write(self, seconds: float, rows: int) -> None:
        self.db_write.observe(seconds)
        self.records.inc(rows)

    def on_image(self, nbytes: int) -> None:
        self.images.inc()
        self.image_bytes.inc(nbytes)

    def render(self) -> bytes:
        return generate_latest(self.registry)
