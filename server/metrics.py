"""Prometheus metrics of one process, in a registry of its own (so tests can build many apps)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# What an archive worker process exports; the API process exports the rest.
ARCHIVE_METRICS = (
    "archives",
    "archive_failures",
    "archive_seconds",
    "bytes_downloaded",
    "bytes_uploaded",
    "runs_in_flight",
    "tasks_waiting",
)
WORKER_METRICS = ("worker_up", "worker_restarts")


class Metrics:
    """Every metric Satchel exports."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        labels = ("route", "method", "status")
        self.requests = Counter(
            "satchel_http_requests", "HTTP requests answered.", labels, registry=self.registry
        )
        self.latency = Histogram(
            "satchel_http_request_duration_seconds",
            "Time to answer an HTTP request.",
            labels,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=self.registry,
        )
        self.db_up = Gauge(
            "satchel_database_up", "1 while the database answers.", registry=self.registry
        )

        self.ws_connections = Gauge(
            "satchel_ws_connections", "Open websocket connections.", registry=self.registry
        )
        self.ws_messages = Counter(
            "satchel_ws_messages_sent", "Websocket messages sent.", registry=self.registry
        )
        self.ws_dropped = Counter(
            "satchel_ws_clients_dropped",
            "Websocket clients closed for falling behind.",
            registry=self.registry,
        )
        self.listener_reconnects = Counter(
            "satchel_event_listener_reconnects",
            "Times the LISTEN connection was re-established.",
            registry=self.registry,
        )
        self.event_lag = Histogram(
            "satchel_event_lag_seconds",
            "Time from an event's commit to its delivery by this instance.",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
            registry=self.registry,
        )
        self.archives = Counter(
            "satchel_archives", "Archive runs by outcome.", ("outcome",), registry=self.registry
        )
        self.archive_failures = Counter(
            "satchel_archive_failures",
            "Failed archive runs by reason.",
            ("reason",),
            registry=self.registry,
        )
        self.archive_seconds = Histogram(
            "satchel_archive_duration_seconds",
            "Time to form, upload and verify an archive.",
            buckets=(0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600),
            registry=self.registry,
        )
        self.bytes_downloaded = Counter(
            "satchel_archive_bytes_downloaded",
            "Bytes received from origins.",
            registry=self.registry,
        )
        self.bytes_uploaded = Counter(
            "satchel_archive_bytes_uploaded", "Archive bytes sent to S3.", registry=self.registry
        )
        self.runs_in_flight = Gauge(
            "satchel_archive_runs_in_flight",
            "Archive runs on this instance.",
            registry=self.registry,
        )
        self.tasks_waiting = Gauge(
            "satchel_tasks_waiting",
            "Tasks waiting for an archive run (all instances).",
            registry=self.registry,
        )

        self.worker_up = Gauge(
            "satchel_archive_worker_up",
            "1 while this instance's archive worker process answers.",
            registry=self.registry,
        )
        self.worker_restarts = Counter(
            "satchel_archive_worker_restarts",
            "Times the archive worker process ended unasked and was started again.",
            registry=self.registry,
        )

    def drop(self, *names: str) -> None:
        """Stop exporting the named metrics (another process of the instance exports them)."""
        for name in names:
            self.registry.unregister(getattr(self, name))

    def keep(self, *names: str) -> None:
        """Export only the named metrics."""
        kinds = (Counter, Gauge, Histogram)
        self.drop(*(n for n, v in vars(self).items() if isinstance(v, kinds) and n not in names))

    def observe_request(self, *, route: str, method: str, status: int, seconds: float) -> None:
        """Count one answered request and its duration."""
        key = (route, method, str(status))
        self.requests.labels(*key).inc()
        self.latency.labels(*key).observe(seconds)
